"""Traffic counters in the shared-memory table (``fastlb.runtime.shm``).

Known traffic goes through a real balancer to real backends; what was sent
and received is counted again at the client and at the backends, and the
counters the data path wrote into its table (read from the table itself, on
the balancer's loop) must equal those counts exactly. The last test does the
same with ``--workers 2``, reading the master's table through its memfd.
"""
import collections
import logging
import os
import select
import signal
import socket
import struct
import time
import types

import httpx
import pytest

from fastlb import server
from fastlb.config import loads
from fastlb.health import HealthConfig
from fastlb.proxy import Backend
from fastlb.runtime.control import ProcessController
from fastlb.runtime.shm import (B_LAT, B_LAT_SUM_US, B_NAMES, L_NAMES, LAT_BOUNDS, NB, Layout,
                                TableFull, Tables)
from fastlb.selection import ALGORITHMS
from helpers import (HANG, HOST, Reader, Reply, exchange, free_dead_port, raw_connect, recv_until_close,
                     send_raw, wait_for)
from helpers import active_core, backend_loop, make_backend, make_config_lb, make_lb  # noqa: F401
from test_retries import closing_backend  # noqa: F401  (a fixture, used by name)
from test_workers import owner
from test_workers import serve as serve_workers
from test_workers import stop as stop_workers

pytestmark = pytest.mark.usefixtures("active_core")


# ---------------------------------------------------------------- reading the table

def _address(be):
    host, port = be.addr if hasattr(be, "addr") else be
    return f"{host}:{port}"


def backend_counts(lb, be, pool="default"):
    """Backend ``be``'s counters in the balancer's table, by name."""
    def read():
        p = lb.proxy
        row = p.layout.backends[(pool, _address(be))]
        return dict(zip(B_NAMES, p.tables.backend_counters(p.slot, row)))
    return lb.lt.call_soon(read)


def listener_counts(lb, name="default"):
    def read():
        p = lb.proxy
        row = p.layout.listeners[name]
        return dict(zip(L_NAMES, p.tables.listener_counters(p.slot, row)))
    return lb.lt.call_soon(read)


def bexp(**kw):
    """Expected backend counters: the ones named, every other one 0."""
    assert set(kw) <= set(B_NAMES), set(kw) - set(B_NAMES)
    return {n: kw.get(n, 0) for n in B_NAMES}


def lexp(**kw):
    assert set(kw) <= set(L_NAMES), set(kw) - set(L_NAMES)
    return {n: kw.get(n, 0) for n in L_NAMES}


def by_class(statuses, prefix="responses_"):
    """``{"responses_2xx": n, ...}`` of a list of statuses."""
    out = collections.Counter(f"{prefix}{s // 100}xx" for s in statuses)
    return dict(out)


def settle(lb, be=None, pool="default", listener="default"):
    """Wait until nothing is in flight and every client connection is closed."""
    if be is not None:
        assert wait_for(lambda: backend_counts(lb, be, pool)["active"] == 0)
    assert wait_for(lambda: listener_counts(lb, listener)["active"] == 0)


class CountingReader(Reader):
    """A Reader that counts every byte it receives."""

    received = 0

    def _fill(self, deadline):
        before = len(self.buf)
        ok = super()._fill(deadline)
        self.received += len(self.buf) - before
        return ok


class Scripted:
    """A backend handler: ``/STATUS/...`` answers STATUS (a body unless HEAD,
    204 or 304; chunked for ``/STATUS/chunked``), and it counts every byte and
    status it sends."""

    def __init__(self):
        self.sent = collections.Counter()       # backend name -> bytes written
        self.statuses = collections.defaultdict(list)

    def __call__(self, be, req):
        if (req.get("expect") or "").lower() == "100-continue":
            # the test backend wrote this interim response when the head came
            self.sent[be.name] += len(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.statuses[be.name].append(100)
        status = int(req.target.split("/")[1])
        body = b"" if status in (204, 304) else b"%s said %d" % (be.name.encode(), status)
        length = b"" if status in (204, 304) else b"Content-Length: %d\r\n" % len(body)
        if req.target.endswith("/chunked"):
            length = b"Transfer-Encoding: chunked\r\n"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        out = b"HTTP/1.1 %d Whatever\r\n%s\r\n" % (status, length)
        if req.method != "HEAD":
            out += body
        self.sent[be.name] += len(out)
        self.statuses[be.name].append(status)
        return out


# (method, target, extra header lines, body): every class, bodies framed both ways
TRAFFIC = [
    ("GET", "/200/a", b"", b""),
    ("POST", "/201/b", b"Content-Length: 5\r\n", b"hello"),
    ("GET", "/301/c", b"", b""),
    ("GET", "/404/d", b"", b""),
    ("HEAD", "/200/e", b"", b""),
    ("GET", "/204/f", b"", b""),
    ("GET", "/500/g", b"", b""),
    ("POST", "/200/h", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ("GET", "/503/i", b"", b""),
    ("POST", "/200/j", b"Expect: 100-continue\r\nContent-Length: 10\r\n", b"x" * 10),
    ("GET", "/302/k", b"", b""),
    ("GET", "/200/chunked", b"", b""),
    ("GET", "/404/chunked", b"", b""),
]


@pytest.mark.parametrize("split", [None, "bytes"], ids=["whole", "byte-by-byte"])
def test_requests_responses_and_bytes_per_backend_and_listener(make_backend, make_lb, split):
    """Every class of response through two backends on one keep-alive
    connection, then a malformed request fastlb answers itself: the counters
    of each backend and of the listener equal what the backends and the
    client sent and received."""
    script = Scripted()
    a = make_backend("A", handler=script)
    b = make_backend("B", handler=script)
    lb = make_lb([a, b])
    client_sent = 0
    statuses = []
    with raw_connect(lb.port) as s:
        reader = CountingReader(s)
        for method, target, extra, body in TRAFFIC:
            data = f"{method} {target} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n" + body
            # the interim 100 comes back while the body is being sent: whole
            assert send_raw(s, data, None if b"Expect" in extra else split) is not False
            client_sent += len(data)
            if b"Expect" in extra:
                statuses.append(reader.read_response().status)
            statuses.append(reader.read_response(method=method).status)
        client_received = reader.received
    bad = b"GET /x HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n"
    with raw_connect(lb.port) as s:
        s.sendall(bad)
        out, closed = recv_until_close(s)
    assert closed and out.startswith(b"HTTP/1.1 400 ")
    client_sent += len(bad)
    client_received += len(out)
    statuses.append(400)
    assert statuses == [200, 201, 301, 404, 200, 204, 500, 200, 503, 100, 200, 302, 200, 404,
                        400]
    settle(lb, a)
    settle(lb, b)
    for be in (a, b):
        sent = script.statuses[be.name]
        assert len(be.requests) > 3                 # round robin: both served
        assert backend_counts(lb, be) == bexp(
            requests=len(be.requests), bytes_in=script.sent[be.name],
            bytes_out=len(be.received), **by_class(sent)), be.name
    assert sum(len(be.requests) for be in (a, b)) == len(TRAFFIC)
    assert listener_counts(lb) == lexp(
        connections=2, requests=len(TRAFFIC) + 1, bytes_in=client_sent,
        bytes_out=client_received, **by_class(statuses))


def test_an_invalid_response_counts_its_status_at_the_backend_and_the_502_at_the_listener(
        make_backend, make_lb):
    junk = b"HTTP/1.1 204 No Content\r\n\r\nJUNK"
    a = make_backend("A", handler=lambda be, req: Reply(junk, close=True))
    lb = make_lb([a])
    with httpx.Client(timeout=5) as c:
        r = c.get(lb.url + "/")
    assert r.status_code == 502
    settle(lb, a)
    assert backend_counts(lb, a) == bexp(requests=1, responses_2xx=1, bytes_in=len(junk),
                                         bytes_out=len(a.received), failures=1)
    counts = listener_counts(lb)
    assert (counts["responses_2xx"], counts["responses_5xx"], counts["requests"]) == (0, 1, 1)


# ---------------------------------------------------------------- failures and retries

def _park(lb, backends, count):
    """Open connections with a request that ``backends`` hold (``/hold``) until
    ``count`` are parked on them; the answers to the others (a 502 from a dead
    backend) are read. Returns (parked sockets, statuses of the others)."""
    parked, statuses = [], []
    for i in range(50):
        if len(parked) == count:
            break
        s = raw_connect(lb.port)
        s.sendall(b"GET /hold/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        target = f"/hold/{i}"

        def answered():
            return bool(select.select([s], [], [], 0)[0])

        assert wait_for(lambda: answered() or any(
            q.target == target for be in backends for q in be.requests))
        if answered():
            statuses.append(Reader(s).read_response().status)
            s.close()
        else:
            parked.append(s)
    assert len(parked) == count
    return parked, statuses


def _reset(socks):
    for s in socks:     # a reset: the parked requests end at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def _hold_or_echo(be, req):
    return HANG if req.target.startswith("/hold") else \
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_connect_errors_without_retries_are_the_502s(make_backend, make_lb, algorithm):
    """retries 0, a backend that refuses connections (weight 4) beside a live
    one: every request tried on it is a connect error and a 502, no retry."""
    dead = (HOST, free_dead_port())
    live = make_backend("L", handler=_hold_or_echo)
    lb = make_lb([dead, live], algorithm=algorithm, weights=(4, 1), retries=0,
                 hash_key="path", health=HealthConfig(eject_after=0))
    # one request parked on the live backend: the dead one is the least loaded
    parked, statuses = _park(lb, [live], 1)
    with httpx.Client(timeout=5) as c:
        statuses += [c.get(f"{lb.url}/r/{i}").status_code for i in range(16)]
    assert set(statuses) <= {200, 502} and statuses.count(502) > 0
    assert wait_for(lambda: backend_counts(lb, live)["active"] == 1)
    _reset(parked)
    settle(lb, live)
    n502 = statuses.count(502)
    assert backend_counts(lb, dead) == bexp(connect_errors=n502, failures=n502)
    assert backend_counts(lb, live) == bexp(
        requests=len(live.requests), responses_2xx=statuses.count(200),
        bytes_in=statuses.count(200) * 40, bytes_out=len(live.received))
    assert listener_counts(lb)["requests"] == len(statuses) + 1
    assert listener_counts(lb)["responses_5xx"] == n502


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retries_after_refused_connects_under_every_algorithm(make_backend, make_lb, caplog,
                                                              algorithm):
    """A refused backend (weight 4) and two live ones, retries 2: each try on
    the dead one is a connect error and a retry elsewhere; every client gets
    200. The connects that failed are counted again in the debug log."""
    caplog.set_level(logging.DEBUG, logger="fastlb")
    dead = (HOST, free_dead_port())
    b = make_backend("B", handler=_hold_or_echo)
    c = make_backend("C", handler=_hold_or_echo)
    lb = make_lb([dead, b, c], algorithm=algorithm, weights=(4, 1, 1), retries=2,
                 hash_key="path", health=HealthConfig(eject_after=0))
    parked, _ = _park(lb, [b, c], 2)      # the live ones loaded: the dead one is picked
    n = 20
    with httpx.Client(timeout=5) as client:
        assert [client.get(f"{lb.url}/r/{i}").status_code for i in range(n)] == [200] * n
    _reset(parked)
    settle(lb, b)
    settle(lb, c)
    refused = sum(1 for r in caplog.records
                  if r.getMessage().startswith(f"backend http://{_address(dead)}: "))
    assert refused > 0
    assert backend_counts(lb, dead) == bexp(connect_errors=refused, retries=refused,
                                            failures=refused)
    for be in (b, c):
        ok = sum(1 for q in be.requests if not q.target.startswith("/hold"))
        assert backend_counts(lb, be) == bexp(
            requests=len(be.requests), responses_2xx=ok, bytes_in=ok * 40,
            bytes_out=len(be.received))
    assert sum(len(be.requests) for be in (b, c)) == n + 2
    counts = listener_counts(lb)
    assert (counts["connections"], counts["requests"], counts["responses_2xx"],
            counts["responses_5xx"]) == (3, n + 2, n, 0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retries_after_a_backend_closes_under_every_algorithm(make_backend, make_lb,
                                                               closing_backend, algorithm):
    """A backend that reads the request head and closes (weight 4) and two live
    ones: each request it got is a retry elsewhere and a failure, and the bytes
    sent to it are the heads it read."""
    bad = closing_backend()
    b = make_backend("B", handler=_hold_or_echo)
    c = make_backend("C", handler=_hold_or_echo)
    lb = make_lb([bad, b, c], algorithm=algorithm, weights=(4, 1, 1), retries=2,
                 hash_key="path", health=HealthConfig(eject_after=0))
    parked, _ = _park(lb, [b, c], 2)
    n = 20
    with httpx.Client(timeout=5) as client:
        assert [client.get(f"{lb.url}/r/{i}").status_code for i in range(n)] == [200] * n
    _reset(parked)
    settle(lb, b)
    settle(lb, c)
    settle(lb, bad)
    tried = len(bad.heads)
    assert tried > 0
    assert backend_counts(lb, bad) == bexp(requests=tried, retries=tried, failures=tried,
                                           bytes_out=sum(len(h) for h in bad.heads))
    for be in (b, c):
        assert backend_counts(lb, be)["requests"] == len(be.requests)
    assert listener_counts(lb)["responses_2xx"] == n


# ---------------------------------------------------------------- gauges, fastlb's own answers

def test_active_gauges_follow_requests_in_flight_and_return_to_zero(make_backend, make_lb):
    """Requests held by the backend count as active on it and their connections
    on the listener; a client that leaves and a response timeout (504) end
    them; everything is back at 0 at the end."""
    a = make_backend("A", handler=_hold_or_echo)
    lb = make_lb([a], response_timeout=1.0)
    socks, _ = _park(lb, [a], 3)
    assert wait_for(lambda: backend_counts(lb, a)["active"] == 3)
    assert listener_counts(lb)["active"] == 3
    _reset(socks[:2])                                   # two clients go away
    assert wait_for(lambda: backend_counts(lb, a)["active"] == 1)
    assert wait_for(lambda: listener_counts(lb)["active"] == 1)
    reader = CountingReader(socks[2])
    assert reader.read_response().status == 504     # the last one times out
    assert wait_for(lambda: backend_counts(lb, a)["active"] == 0)
    socks[2].close()
    settle(lb, a)
    counts = listener_counts(lb)
    assert (counts["connections"], counts["requests"], counts["responses_5xx"]) == (3, 3, 1)
    assert counts["bytes_out"] == reader.received
    assert backend_counts(lb, a)["failures"] == 1       # the timeout is the backend's


def test_a_503_when_no_backend_is_up_is_counted_as_5xx(make_backend, make_lb):
    """The one backend fails its health check: requests get fastlb's 503. The
    checks themselves are not traffic: nothing is counted on the backend."""
    def handler(be, req):
        status = b"500 Down" if req.target == "/health" else b"200 OK"
        return b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok"

    a = make_backend("A", handler=handler)
    lb = make_lb([a], health=HealthConfig(path="/health", interval=0.2, fall=1))
    assert wait_for(lambda: lb.lt.call_soon(
        lambda: not lb.proxy.health.snapshot()[0]["eligible"]))
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    out, closed = exchange(lb.port, request)
    assert closed and out.startswith(b"HTTP/1.1 503 ")
    settle(lb)
    assert listener_counts(lb) == lexp(connections=1, requests=1, responses_5xx=1,
                                       bytes_in=len(request), bytes_out=len(out))
    assert backend_counts(lb, a) == bexp()
    assert any(q.target == "/health" for q in a.requests)


def test_response_times_are_in_the_histogram(make_backend, make_lb, backend_loop):
    """Each final response from a backend is one observation of the time from
    the request sent to the end of its head: its bucket counts it and its
    microseconds go into the sum (a relayed 100 Continue is not one);
    responses the backend holds 60 ms are above the 50 ms bound."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def on_head(conn, req):
        if req.target.startswith("/slow"):     # on the backends' loop: answer later
            backend_loop.loop.call_later(0.06, conn.transport.write, ok)

    a = make_backend("A", handler=lambda be, req: HANG if req.target.startswith("/slow") else ok,
                     on_head=on_head)
    lb = make_lb([a])
    slow, fast = 3, 6
    rtt = 0.0       # what the client waited: each observation lies within its request's
    with httpx.Client(timeout=5) as c:
        for i in range(slow + fast):
            path = "/slow" if i % 3 == 0 else "/fast"
            t0 = time.monotonic()
            assert c.get(lb.url + path).status_code == 200
            rtt += time.monotonic() - t0
            time.sleep(0.1)     # a pause between requests is no part of any response time
        t0 = time.monotonic()
        r = c.post(lb.url + "/fast", content=b"x", headers={"Expect": "100-continue"})
        rtt += time.monotonic() - t0
        assert r.status_code == 200
    settle(lb, a)

    def read():
        p = lb.proxy
        row = p.layout.backends[("default", _address(a))]
        return list(p.tables.backend_counters(p.slot, row))
    ctr = lb.lt.call_soon(read)
    buckets = ctr[B_LAT:B_LAT + len(LAT_BOUNDS) + 1]
    total_us = ctr[B_LAT_SUM_US]
    assert sum(buckets) == slow + fast + 1 == ctr[B_NAMES.index("responses_2xx")]
    assert ctr[B_NAMES.index("responses_1xx")] == 1
    first_above = next(i for i, b in enumerate(LAT_BOUNDS) if b > 0.06)
    assert sum(buckets[first_above:]) >= slow and total_us >= slow * 60000
    assert total_us <= rtt * 1e6 + len(buckets) * 10
    # the sum agrees with the buckets: each observation is above the bound
    # before its bucket and at most its own
    bounds_us = [0] + [round(b * 1e6) for b in LAT_BOUNDS]
    assert sum(n * bounds_us[i] for i, n in enumerate(buckets)) <= total_us
    assert buckets[-2:] == [0, 0]       # over 5 s: the client would have given up
    assert total_us <= sum(n * bounds_us[i + 1] for i, n in enumerate(buckets[:-1]))


# ---------------------------------------------------------------- reload

def _config_text(pools, routes=(), listeners=None):
    """``pools``: {name: [backend, ...]}; ``routes``: [(path prefix, pool)];
    ``listeners``: {name: bind} (default: ``web`` on a free port), every one
    with ``app`` as its default pool and the routes."""
    out = []
    for name, bind in (listeners or {"web": "127.0.0.1:0"}).items():
        out.append(f'[listeners.{name}]\nbind = "{bind}"\ndefault_pool = "app"\n')
        for prefix, pool in routes:
            out.append(f'[[listeners.{name}.routes]]\npath_prefix = "{prefix}"\npool = "{pool}"\n')
    for name, bes in pools.items():
        urls = ", ".join(f'"http://{_address(be)}"' for be in bes)
        out.append(f"[pools.{name}]\nbackends = [{urls}]\n")
    return "\n".join(out)


def _ok(be, req):
    return HANG if req.target.startswith("/hold") else \
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_reload_keeps_the_counters_of_kept_backends_and_starts_added_ones_at_zero(
        make_backend, make_config_lb, caplog):
    """A kept backend and the listener count on across reloads; a backend
    added on the row a removed one had starts at 0, and the removed one's
    request still in flight ends without touching that row."""
    caplog.set_level(logging.WARNING)
    a, b, c, d = (make_backend(n, handler=_ok) for n in "ABCD")
    lb = make_config_lb(_config_text({"app": [a], "hold": [b]}, routes=[("/hold", "hold")]))

    def count(be, pool="app"):
        def read():
            p = lb.proxy
            row = p.layout.backends[(pool, _address(be))]
            return dict(zip(B_NAMES, p.tables.backend_counters(p.slot, row)))
        return lb.lt.call_soon(read)

    def web():
        p = lb.proxy
        return lb.lt.call_soon(lambda: p.tables.listener_counters(
            p.slot, p.layout.listeners["web"])[L_NAMES.index("requests")])

    with httpx.Client(timeout=5) as client:
        for _ in range(3):
            assert client.get(lb.url("web") + "/").status_code == 200
    hold = raw_connect(lb.port("web"))
    hold.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
    assert wait_for(lambda: count(b, "hold")["active"] == 1)
    row_b = lb.proxy.layout.backends[("hold", _address(b))]
    old_b = next(x for x in lb.proxy.pools["hold"].backends)
    before = count(a)
    assert before["requests"] == 3 and web() == 4

    lb.reload(_config_text({"app": [a, c]}))          # B's pool goes, C comes
    assert count(a) == before                           # the same row, the same counts
    assert count(c) == bexp()
    assert web() == 4
    with httpx.Client(timeout=5) as client:
        for _ in range(2):
            assert client.get(lb.url("web") + "/").status_code == 200
    assert (count(a)["requests"], count(c)["requests"]) == (len(a.requests), len(c.requests))
    assert len(a.requests) + len(c.requests) == 5
    assert lb.proxy.pools["app"].backends[0].requests == len(a.requests)

    lb.reload(_config_text({"app": [a, c, d]}))       # D gets B's old row
    assert lb.proxy.layout.backends[("app", _address(d))] == row_b
    assert count(d) == bexp()
    _reset([hold])                                      # B's last request ends now
    assert wait_for(lambda: lb.lt.call_soon(lambda: old_b.active) == 0)
    assert count(d) == bexp()                           # not touched by B
    with httpx.Client(timeout=5) as client:
        for _ in range(3):
            assert client.get(lb.url("web") + "/").status_code == 200
    assert len(d.requests) > 0
    assert count(d) == bexp(requests=len(d.requests), responses_2xx=len(d.requests),
                            bytes_in=40 * len(d.requests), bytes_out=len(d.received))
    assert web() == 4 + 2 + 3
    # nothing went wrong on the way (in the pure build, a counter taken below 0 raises)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_reload_keeps_a_listeners_counters_by_name_and_a_removed_one_counts_apart(
        make_backend, make_config_lb, caplog):
    """A listener whose bind moved keeps its counters (by name); a removed
    one's connection still open ends in a row of its own, not in the row an
    added listener takes after it."""
    caplog.set_level(logging.WARNING)
    a = make_backend("A", handler=_ok)
    lb = make_config_lb(_config_text({"app": [a]}, listeners={
        "web": "127.0.0.1:0", "other": "127.0.0.1:0"}))

    def counts(name):
        def read():
            p = lb.proxy
            return dict(zip(L_NAMES, p.tables.listener_counters(p.slot, p.layout.listeners[name])))
        return lb.lt.call_soon(read)

    with httpx.Client(timeout=5) as client:
        for _ in range(2):
            assert client.get(lb.url("web") + "/").status_code == 200
    hold = raw_connect(lb.port("other"))
    request = b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n"
    hold.sendall(request)
    assert wait_for(lambda: len(a.requests) == 3)
    row_other = lb.proxy.layout.listeners["other"]
    other = lb.proxy.fronts["other"]
    assert counts("other") == lexp(connections=1, active=1, requests=1, bytes_in=len(request))
    web_before = counts("web")
    assert web_before["requests"] == 2

    port = free_dead_port()
    lb.reload(_config_text({"app": [a]}, listeners={"web": f"127.0.0.1:{port}"}))
    assert lb.port("web") == port and counts("web") == web_before     # moved, the same row
    with httpx.Client(timeout=5) as client:
        assert client.get(lb.url("web") + "/").status_code == 200
    assert wait_for(lambda: counts("web")["active"] == 0)
    assert counts("web")["requests"] == 3 and counts("web")["connections"] == 2

    lb.reload(_config_text({"app": [a]}, listeners={"web": f"127.0.0.1:{port}",
                                                    "third": "127.0.0.1:0"}))
    assert lb.proxy.layout.listeners["third"] == row_other
    assert counts("third") == lexp()
    _reset([hold])                              # the removed listener's last connection
    assert wait_for(lambda: lb.lt.call_soon(lambda: other.ctr[L_NAMES.index("active")]) == 0)
    assert counts("third") == lexp()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_reload_that_does_not_fit_the_table_is_refused_and_changes_nothing(
        make_backend, make_config_lb, caplog):
    """The table is sized at start (256 backends at least): a reload to 257, with
    a new listener, is refused by the SIGHUP path with one line; the running
    configuration, its counters and the new listener's port stay as they were."""
    a = make_backend("A", handler=_ok)
    text = _config_text({"app": [a]})
    lb = make_config_lb(text)
    with httpx.Client(timeout=5) as client:
        assert client.get(lb.url("web") + "/").status_code == 200
    proxy = lb.proxy
    config, pools, layout = proxy.config, dict(proxy.pools), dict(proxy.layout.backends)
    before = backend_counts(lb, a, "app")
    port = free_dead_port()
    many = [(HOST, 20000 + i) for i in range(256)]
    big = loads(_config_text({"app": [a], "more": many})
                + f'\n[listeners.extra]\nbind = "127.0.0.1:{port}"\ndefault_pool = "more"\n',
                "test.toml", resolve=False)
    with pytest.raises(TableFull):
        lb.lt.call(server.reload(proxy, big))
    caplog.set_level(logging.INFO, logger="fastlb")
    lb.lt.call(server._reload_from(ProcessController(proxy), lambda: big))
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused == ["reload refused, the running configuration is unchanged: "
                       "more than 256 backends (the table is sized at start: restart to "
                       "grow it)"]
    assert not any(r.exc_info for r in caplog.records)
    assert proxy.config is config and proxy.pools == pools and list(proxy.fronts) == ["web"]
    assert proxy.layout.backends == layout
    with socket.socket() as s:      # the new listener's socket was closed again
        s.bind((HOST, port))
    assert backend_counts(lb, a, "app") == before
    with httpx.Client(timeout=5) as client:
        assert client.get(lb.url("web") + "/").status_code == 200
    assert backend_counts(lb, a, "app")["requests"] == 2


# ---------------------------------------------------------------- the table and slot given

def test_a_proxy_given_a_table_counts_in_its_slot_only(make_backend, make_lb):
    """What a worker does: its master's table, layout and slot, used as given."""
    tables = Tables.create(backends=4, listeners=2, slots=3)
    shared = types.SimpleNamespace(tables=tables, layout=Layout(tables), slot=2)
    a = make_backend("A", handler=_ok)
    lb = make_lb([a], shared=shared)
    assert lb.proxy.tables is tables and lb.proxy.layout is shared.layout
    with httpx.Client(timeout=5) as client:
        assert client.get(lb.url + "/").status_code == 200
    settle(lb, a)
    row = shared.layout.backends[("default", _address(a))]
    assert tables.backend_counters(2, row)[B_NAMES.index("requests")] == 1
    assert list(tables.backend_counters(1, row)) == [0] * NB
    assert tables.backend_totals(row)[:len(B_NAMES)] == [bexp(
        requests=1, responses_2xx=1, bytes_in=40,
        bytes_out=len(a.received))[n] for n in B_NAMES]
    assert tables.listener_totals(shared.layout.listeners["default"])[
        L_NAMES.index("requests")] == 1


def test_a_backend_made_on_its_own_counts_in_a_row_of_its_own():
    b = Backend(0, HOST, 1)
    assert (b.row, b.requests, b.failures, b.active) == (-1, 0, 0, 0)
    assert len(b.ctr) == NB and list(b.ctr) == [0] * NB


# ---------------------------------------------------------------- workers

def _masters_table(pid):
    """The table of the master ``pid``, mapped here through its memfd."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "memfd:fastlb-tables" in os.readlink(path):
                return Tables.attach(os.open(path, os.O_RDWR))
        except OSError:
            pass
    raise AssertionError("the master has no table")


def test_workers_count_in_their_own_slots_and_a_killed_ones_counts_stay(make_backend):
    """Two workers: each counts its connections in its slot of the master's
    table; the totals are the traffic; a worker killed has its counts folded
    into the retired slot, so the totals stay."""
    be = make_backend("A", handler=_ok)
    lb, pids = serve_workers([be.addr], 2)
    try:
        tables = _masters_table(lb.proc.pid)
        by_pid = collections.Counter()
        sent = received = 0
        for _ in range(40):
            with raw_connect(lb.port) as s:
                data = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
                s.sendall(data)
                reader = CountingReader(s)
                assert reader.read_response().status == 200
                sent += len(data)
                received += reader.received
                by_pid[owner(pids, lb.port, s)] += 1
        assert len(by_pid) == 2 and sum(by_pid.values()) == 40
        (row,) = [r for r in range(tables.backends) if any(tables.backend_totals(r))]
        (lrow,) = [r for r in range(tables.listeners) if any(tables.listener_totals(r))]
        req, lreq, lact = (B_NAMES.index("requests"), L_NAMES.index("requests"),
                           L_NAMES.index("active"))
        assert wait_for(lambda: tables.listener_totals(lrow)[lact] == 0)
        totals = tables.listener_totals(lrow)
        assert totals[:len(L_NAMES)] == [lexp(connections=40, requests=40, responses_2xx=40,
                                              bytes_in=sent, bytes_out=received)[n]
                                         for n in L_NAMES]
        assert tables.backend_totals(row)[req] == len(be.requests) == 40
        per_slot = [tables.backend_counters(k, row)[req] for k in range(tables.slots)]
        assert sorted(n for n in per_slot if n) == sorted(by_pid.values())
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: tables.backend_counters(0, row)[req] == by_pid[victim])
        assert tables.backend_totals(row)[req] == 40
        assert tables.listener_totals(lrow)[lreq] == 40
    finally:
        assert stop_workers(lb) == 0


def test_monotonic_us_is_time_monotonic_in_microseconds(core):
    """The clock of response times, in both cores: time.monotonic's clock."""
    before = time.monotonic_ns() // 1000
    now = core.monotonic_us()
    after = time.monotonic_ns() // 1000
    assert isinstance(now, int) and before <= now <= after
