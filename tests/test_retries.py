"""Retries through the real data path: which requests go to another backend, and how far."""
import asyncio
import collections
import socket
import struct
import threading

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    HANG,
    HOST,
    LoopThread,
    active_core,
    backend_loop,
    echo_response,
    free_dead_port,
    make_backend,
    make_lb,
    raw_connect,
    stop_servers,
    wait_for,
)
from fastlb.health import HealthConfig
from fastlb.selection import ALGORITHMS

pytestmark = pytest.mark.usefixtures("active_core")


class ClosingBackend:
    """Reads a request head, waits ``delay``, then closes without answering."""

    def __init__(self, delay):
        self.lt = LoopThread("closing-backend")
        self.heads = []

        async def start():
            async def handle(reader, writer):
                try:
                    self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                    await asyncio.sleep(delay)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
                writer.transport.abort()

            return await asyncio.start_server(handle, HOST, 0)

        self.server = self.lt.call(start())
        self.addr = (HOST, self.server.sockets[0].getsockname()[1])

    def stop(self):
        stop_servers(self.lt, [self.server])


@pytest.fixture
def closing_backend():
    made = []

    def make(delay=0.0):
        be = ClosingBackend(delay)
        made.append(be)
        return be

    yield make
    for be in made:
        be.stop()


def test_connect_failure_goes_to_next_backend_for_any_method(make_backend, make_lb):
    good = make_backend("good")
    lb = make_lb([(HOST, free_dead_port()), good.addr])
    with httpx.Client(timeout=10) as c:
        for _ in range(4):
            r = c.post(lb.url + "/p", content=b"payload")
            assert r.status_code == 200 and r.json()["body"] == "payload"


def test_retries_zero_gives_502_at_once(make_backend, make_lb):
    good = make_backend("good")
    lb = make_lb([(HOST, free_dead_port()), good.addr], retries=0)
    with httpx.Client(timeout=10) as c:
        statuses = [c.get(lb.url + "/").status_code for _ in range(4)]
    assert collections.Counter(statuses) == {200: 2, 502: 2}


def test_idempotent_request_retried_after_backend_closes(make_backend, make_lb, closing_backend):
    bad = closing_backend()
    good = make_backend("good")
    lb = make_lb([bad.addr, good.addr])
    with httpx.Client(timeout=10) as c:
        for _ in range(4):
            r = c.get(lb.url + "/g")
            assert r.status_code == 200 and r.headers["x-backend"] == "good"
    assert bad.heads  # the bad backend did get the requests first


def test_non_idempotent_request_never_replayed(make_backend, make_lb, closing_backend):
    bad = closing_backend()
    good = make_backend("good")
    lb = make_lb([bad.addr, good.addr])
    with httpx.Client(timeout=10) as c:
        statuses = [c.post(lb.url + "/p", content=b"x").status_code for _ in range(4)]
    assert collections.Counter(statuses) == {200: 2, 502: 2}
    assert all(r.method == "POST" for r in good.requests)
    assert len(good.requests) == 2   # the POSTs the bad backend got were not sent again


def test_no_new_try_after_retry_timeout(make_backend, make_lb, closing_backend):
    slow_bad = closing_backend(delay=0.8)
    good = make_backend("good")
    lb = make_lb([slow_bad.addr, good.addr], retry_timeout=0.3)
    with httpx.Client(timeout=10) as c:
        statuses = [c.get(lb.url + "/").status_code for _ in range(2)]
    assert sorted(statuses) == [200, 502]
    lb2 = make_lb([slow_bad.addr, good.addr])  # default 10 s: retried
    with httpx.Client(timeout=10) as c:
        assert [c.get(lb2.url + "/").status_code for _ in range(2)] == [200, 200]


# ---------------------------------------------------------------- retries under every algorithm

def _hold_or_echo(be, req):
    """A backend that keeps ``/hold`` requests in flight (never answers them) and echoes the rest."""
    return HANG if req.target.startswith("/hold") else echo_response(be, req)


@pytest.mark.parametrize("dead_kind", ["refused", "reset"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retry_skips_the_failed_backend_under_every_algorithm(
        make_backend, make_lb, closing_backend, algorithm, dead_kind):
    """3 backends, one dead, --retries 2: every request gets 200, and never from the dead one.

    The dead backend refuses connections, or accepts and resets after the request
    head. It has weight 4 (the others 1), so the weighted algorithms pick it first
    most of the time, and passive ejection is off, so it stays in rotation. One
    request parked on each live backend keeps them loaded: the dead one, released
    the moment it fails, is the least loaded backend whenever a retry picks. A
    retry that picked "again, then skipped what was tried" got the dead backend
    back each time under least-conn, p2c and random, and ran out of picks (502).
    """
    if dead_kind == "refused":
        dead = (HOST, free_dead_port())
    else:
        dead = closing_backend()
    b = make_backend("B", handler=_hold_or_echo)
    c = make_backend("C", handler=_hold_or_echo)
    lb = make_lb([dead, b, c], algorithm=algorithm, weights=(4, 1, 1), retries=2,
                 hash_key="path", health=HealthConfig(eject_after=0))
    proxy = lb.proxy
    n = 40
    holds = []
    try:
        for i in range(2):
            s = raw_connect(lb.port)
            holds.append(s)
            s.sendall(b"GET /hold/%d HTTP/1.1\r\nHost: lb\r\n\r\n" % i)
            assert wait_for(lambda: len(b.requests) + len(c.requests) == i + 1)
        with httpx.Client(timeout=10) as client:
            for i in range(n):
                r = client.get(f"{lb.url}/r/{i}")
                assert r.status_code == 200, (i, r.status_code, r.text)
                assert r.headers["x-backend"] in ("B", "C")
                assert r.json()["target"] == f"/r/{i}"
        answered = [q.target for q in b.requests + c.requests if q.target.startswith("/r/")]
        assert sorted(answered) == sorted(f"/r/{i}" for i in range(n))
        # the dead backend was tried (the scenario happened), at most once per request
        assert proxy.backends[0].failures > 0
        if dead_kind == "reset":
            tried = collections.Counter(h.split(b" ")[1] for h in dead.heads)
            assert tried and max(tried.values()) == 1, tried
            assert sum(tried.values()) == proxy.backends[0].failures
    finally:
        for s in holds:  # reset: the parked requests end (a FIN would wait for their answers)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def in_flight():
        sels = [proxy.balancer] + ([proxy.fallback] if proxy.fallback is not None else [])
        return [sel.in_flight(i) for sel in sels for i in range(3)]

    # every pick, first or retry, was released: nothing left counted in flight
    assert wait_for(lambda: not any(lb.lt.call_soon(in_flight))), lb.lt.call_soon(in_flight)


class SlammingBackend:
    """Accepts every connection and resets it at once (SO_LINGER 0), before
    any byte: a backend dying as connections reach it. The reset often
    arrives before fastlb's connect has handed the new connection over."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(512)
        self.addr = self.sock.getsockname()
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    def stop(self):
        self.sock.close()


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_connection_reset_as_it_opens_never_leaves_the_request_hanging(
        make_backend, make_lb, algorithm):
    """A fresh upstream connection that the backend resets before the request
    is written on it fails like a refused connect: the request goes to the
    next backend (nothing reached the first), and fastlb never writes it into
    a connection that is already gone and waits there for an answer."""
    slam = SlammingBackend()
    good = make_backend("G", handler=lambda be, req: echo_response(be, req))
    try:
        lb = make_lb([slam.addr, good.addr], algorithm=algorithm, response_timeout=30.0)
        with httpx.Client(timeout=3.0) as c:
            for i in range(60):
                # a fresh client connection each time: keys and rotation move
                r = c.get(lb.url + f"/{i}", headers={"Connection": "close"})
                assert r.status_code == 200, (i, r.status_code)
        # (maglev keys on the client address: every request may go to G)
        assert slam.accepted > 0 or algorithm == "maglev"
        # with the slamming backend alone: a quick 502/503, never a hang
        lb1 = make_lb([slam.addr], algorithm=algorithm, response_timeout=30.0)
        with httpx.Client(timeout=3.0) as c:
            for i in range(30):
                r = c.get(lb1.url + f"/{i}", headers={"Connection": "close"})
                assert r.status_code in (502, 503), (i, r.status_code)
        assert slam.accepted > 0
    finally:
        slam.stop()
