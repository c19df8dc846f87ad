"""Reload, routing and the CLI around them: cases the promises of README's
"Configuration" and "Reload" sections cover and the code does not yet keep.

Each test names the promise it checks. Real balancers (in process, or
``fastlb serve --config`` as a subprocess), real backends on 127.0.0.1.
"""
import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from fastlb import core
from fastlb.config import RouteConfig, loads
from fastlb.errors import ConfigError
from fastlb.runtime.routing import Router
from fastlb.selection import ALGORITHMS
from helpers import (HANG, HOST, REPO, FastlbProcess, Reader, Reply, fastlb_cmd,
                     free_dead_port, ok_response, raw_connect, wait_for)
from helpers import active_core, backend_loop, make_backend, make_config_lb  # noqa: F401

pytestmark = pytest.mark.usefixtures("active_core")


def _urls(bes):
    return ", ".join(f'"http://{HOST}:{b.port}"' if hasattr(b, "port") else f'"{b}"'
                     for b in bes)


def _one(bes, pool_extra="", top="", listener="web", bind="127.0.0.1:0", listener_extra=""):
    return (f'{top}[listeners.{listener}]\nbind = "{bind}"\ndefault_pool = "app"\n'
            f'{listener_extra}\n[pools.app]\nbackends = [{_urls(bes)}]\n{pool_extra}')


def _free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _algo_extra(algorithm):
    extra = f'algorithm = "{algorithm}"\n'
    if algorithm == "maglev":
        extra += 'hash_key = "header:X-Key"\n'     # keys vary per request: both backends
    return extra


# ---------------------------------------------------------------- health across a reload

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_reload_leaving_only_ejected_backends_keeps_the_pool_serving(
        make_backend, make_config_lb, algorithm):
    """README (Failures): passive ejection never empties the pool; the
    ejected backend whose back-off ends soonest is re-admitted on trial.
    A reload that removes the backends still in rotation must keep that
    promise: the kept, ejected one serves (it answers by now), rather than
    every request getting 503 for the rest of a 60 s back-off."""
    n = [0]

    def flaky(be, req):
        n[0] += 1
        return Reply(None, close=True) if n[0] <= 3 else ok_response(b"B")

    a = make_backend("A")
    b = make_backend("B", handler=flaky)
    health = "[pools.app.health]\neject_after = 3\neject_base = 60\n"
    lb = make_config_lb(_one([a, b], _algo_extra(algorithm) + health))
    with httpx.Client(timeout=5) as c:
        for i in range(60):
            r = c.get(lb.url("web") + "/", headers={"X-Key": str(i)})
            assert r.status_code == 200     # B's failures are retried on A
            if n[0] >= 3:
                break
    assert n[0] == 3
    snap = lb.proxy.pools["app"].health.snapshot()
    assert snap[1]["ejected"] and not snap[1]["eligible"]
    lb.reload(_one([b], _algo_extra(algorithm) + health))     # A leaves; B is all there is
    with httpx.Client(timeout=5) as c:
        r = c.get(lb.url("web") + "/", headers={"X-Key": "k"})
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.text == "B"


# ---------------------------------------------------------------- requests across a reload

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_retry_after_a_reload_never_goes_to_a_removed_backend(make_backend, make_config_lb,
                                                                algorithm):
    """README (Reload): a removed backend takes no new requests. A request
    in flight on A when the reload removes the dead B and adds C fails on A
    after the reload: its retry must not try B (refused, then 502 with the
    tries used up), it goes to a backend of the running pool (C)."""
    held = []
    a = make_backend("A", handler=lambda be, req: HANG if req.target == "/flaky"
                     else ok_response(b"A"),
                     on_head=lambda conn, req: held.append(conn))
    c_ = make_backend("C")
    dead = f"http://{HOST}:{free_dead_port()}"
    lb = make_config_lb(_one([a, dead], _algo_extra(algorithm)))
    s = raw_connect(lb.port("web"), 10)
    s.sendall(b"GET /flaky HTTP/1.1\r\nHost: t\r\nX-Key: 1\r\n\r\n")
    assert wait_for(lambda: len(a.requests) == 1)      # in flight on A (maybe after B refused)
    lb.reload(_one([a, c_], _algo_extra(algorithm)))
    # A closes the connection without answering: the GET is retried
    a.lt.call_soon(lambda: held[0].transport.close())
    resp = Reader(s, 10).read_response()
    s.close()
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.get("x-backend") == "C"


def test_least_conn_keeps_the_requests_in_flight_across_a_reload(make_backend, make_config_lb):
    """README (Reload): a kept backend keeps its counters. least-conn with
    two requests in flight on A and none on B: after a reload (the same
    file) new requests go to B, as before the reload; the new selector does
    not see A as idle."""
    a_held, b_held = [], []

    def hold(store, name):
        def handler(be, req):
            return HANG if req.target == "/slow" else ok_response(name.encode(),
                                                                  b"X-Backend: " + name.encode()
                                                                  + b"\r\n")
        return handler, (lambda conn, req: store.append(conn) if req.target == "/slow"
                         else None)

    ha, oa = hold(a_held, "A")
    hb, ob = hold(b_held, "B")
    a = make_backend("A", handler=ha, on_head=oa)
    b = make_backend("B", handler=hb, on_head=ob)
    text = _one([a, b], 'algorithm = "least-conn"\n')
    lb = make_config_lb(text)
    socks = []
    for _ in range(4):
        s = raw_connect(lb.port("web"), 10)
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        socks.append(s)
        n = len(socks)
        assert wait_for(lambda: len(a_held) + len(b_held) == n)
    assert (len(a_held), len(b_held)) == (2, 2)
    # B answers its two: A has 2 in flight, B none
    for conn in b_held:
        b.lt.call_soon(conn.transport.write, ok_response(b"slow B"))
    assert wait_for(lambda: all(bk.active == (2 if bk.port == a.port else 0)
                                for bk in lb.proxy.pools["app"].backends))
    lb.reload(text)
    with httpx.Client(timeout=5) as c:
        seen = [c.get(lb.url("web") + "/").headers["x-backend"] for _ in range(4)]
    for s in socks:
        s.close()
    assert seen == ["B"] * 4


def test_a_head_completed_after_its_listener_was_removed_is_not_sent_to_a_removed_backend(
        make_backend, make_config_lb):
    """README (Reload): new requests use the new pools at once, and a removed
    backend takes no new requests. A client of listener "two" (removed by
    the reload, which also replaces A by B) finishes its request head after
    the reload: the request is not sent to A."""
    a, b = make_backend("A"), make_backend("B")

    def text(bes, listeners):
        out = [f'[listeners.{li}]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
               for li in listeners]
        return "\n".join(out) + f"\n[pools.app]\nbackends = [{_urls(bes)}]\n"

    lb = make_config_lb(text([a], ("web", "two")))
    s = raw_connect(lb.port("two"), 10)
    s.sendall(b"GET /late HTTP/1.1\r\nHost: t\r\n")      # the head is under way
    assert wait_for(lambda: any(c.buf for c in lb.proxy.clients))
    lb.reload(text([b], ("web",)))
    s.sendall(b"\r\n")
    resp = Reader(s, 10).read_response()
    s.close()
    assert [r.target for r in a.requests] == [], "the removed backend A got a new request"
    assert resp.get("x-backend") != "A"


# ---------------------------------------------------------------- listeners

def test_a_listener_moved_from_a_name_to_its_address_on_the_same_port(make_backend,
                                                                      make_config_lb):
    """README (Reload): a changed bind is a removal plus an addition. From
    localhost:P to 127.0.0.1:P (the same socket address) the old socket is
    in the way of the new one unless the removal comes first: the reload is
    refused as "cannot listen" today, though the address is free once the
    old listener is gone."""
    a = make_backend("A")
    port = _free_port()
    lb = make_config_lb(_one([a], bind=f"localhost:{port}"))
    lb.reload(_one([a], bind=f"127.0.0.1:{port}"))
    assert lb.proxy.fronts["web"].config.bind == f"127.0.0.1:{port}"
    s = raw_connect(port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert Reader(s).read_response().status == 200
    s.close()


# ---------------------------------------------------------------- numbers the file accepts

@pytest.mark.parametrize("key", ["retries = 3000000000", "max_interim = 3000000000",
                                 "upstream_max_idle = 3000000000"])
def test_a_huge_integer_is_refused_or_run_never_half_applied(make_backend, make_config_lb, key):
    """A file that loads (check-config says OK) either runs or is refused with
    a ConfigError; it never fails half-way. On the compiled data path these
    values overflow C ints: the reload raises OverflowError (no "reload
    refused" line; SIGHUP's task dies with a traceback) and, for
    upstream_max_idle, the kept backend is left pointing at a pool that was
    never published (so its passive health checks are off)."""
    a = make_backend("A")
    lb = make_config_lb(_one([a]))
    bk = lb.proxy.pools["app"].backends[0]
    text = _one([a], key + "\n")
    try:
        loads(text, "test.toml", resolve=False)
    except ConfigError:
        return      # refused by the file's checks: fine
    try:
        lb.reload(text)
    except ConfigError:
        pass
    assert bk.pool is lb.proxy.pools["app"]
    assert bk.pool.health is not None     # eject_after = 3 by default
    with httpx.Client(timeout=5) as c:
        assert c.get(lb.url("web") + "/").status_code == 200


def test_serve_config_with_a_huge_backlog_is_an_error_not_a_traceback(tmp_path, make_backend):
    """README (check-config): a file that check-config passes is one serve
    runs (or refuses with "fastlb: error: ..."). backlog = 3000000000 passes
    the checks, then listen() overflows: a traceback on both paths."""
    a = make_backend("A")
    path = tmp_path / "lb.toml"
    path.write_text(_one([a], listener_extra="backlog = 3000000000\n"))
    checked = subprocess.run(fastlb_cmd("check-config", str(path)), capture_output=True,
                             text=True, cwd=REPO, timeout=30)
    p = subprocess.Popen(fastlb_cmd("serve", "--config", str(path)), cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            _, err = p.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            p.terminate()
            _, err = p.communicate(timeout=10)
            assert checked.returncode == 0      # it ran: the file was valid
            return
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    err = err.decode()
    assert "Traceback" not in err, err
    assert err.startswith("fastlb: error:"), err
    assert checked.returncode == 1, checked.stdout


# ---------------------------------------------------------------- the summary line

def test_the_summary_line_says_every_change(make_backend, make_config_lb):
    """README (Reload): one log line says what changed. A reload that only
    changes log_level and drain_timeout says "nothing changed"; one that
    adds a backend and changes retries says only the backend."""
    a, b = make_backend("A"), make_backend("B")
    lb = make_config_lb(_one([a]))
    summary = lb.reload(_one([a], top='log_level = "debug"\ndrain_timeout = 5\n'))
    assert summary != "nothing changed"
    assert "log_level" in summary and "drain_timeout" in summary, summary
    summary = lb.reload(_one([a, b], "retries = 0\n", top='log_level = "debug"\n'
                                                        'drain_timeout = 5\n'))
    assert lb.proxy.pools["app"].max_tries == 1
    assert "backends +1 -0" in summary and "settings" in summary, summary


# ---------------------------------------------------------------- routing vs the reference

class _P:
    def __init__(self, name):
        self.name = name


def _route(routes, host, headers=()):
    head = (f"GET / HTTP/1.1\r\nHost: {host}\r\n"
            + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n").encode("latin-1")
    req = core.parse_request_head(head)
    got = Router([(rc, _P(rc.pool)) for rc in routes], _P("default")).route(req, head)
    return got.pool.name


@pytest.mark.parametrize("host", [".a.example.com", "..example.com", ".x.b.example.com"])
def test_a_host_with_a_leading_dot_routes_as_the_reference_says(host):
    """RouteConfig.matches is the reference: "*.example.com" matches any name
    ending in ".example.com" with a label or more before it. A Host with a
    leading dot (valid reg-name bytes: fastlb accepts it) matches the
    wildcard there, and the compiled lookup must agree; it skips the suffix
    at position 0 and sends the request to the default pool."""
    routes = [RouteConfig(pool="wild", host="*.example.com"),
              RouteConfig(pool="other", host="*.b.example.com")]
    want = next((rc.pool for rc in routes if rc.matches(host, "/")), "default")
    assert want != "default"
    assert _route(routes, host) == want


def test_a_header_condition_is_not_met_by_one_of_two_repeated_fields():
    """README: a header condition holds when the header is present with
    exactly this value. "X-Canary: 0" then "X-Canary: 1" is the field value
    "0, 1" (RFC 9110 5.3), and its first value is 0 (as tests/test_routing.py's
    reference takes it): not "1" either way. The compiled lookup accepts any
    one of the repeated fields, so the order of two fields decides nothing
    and a client can add a field to reach the canary pool."""
    routes = [RouteConfig(pool="canary", headers={"x-canary": "1"})]
    assert _route(routes, "t", [("X-Canary", "1")]) == "canary"
    assert _route(routes, "t", [("X-Canary", "0"), ("X-Canary", "1")]) == "default"


# ---------------------------------------------------------------- the process and the CLI

def _write_config(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_sighup_while_draining_opens_no_listener(tmp_path, make_backend):
    """README (Stopping): a drain stops accepting at once. A SIGHUP during the
    drain must not reload: a listener the file now has would start accepting
    connections while the process is on its way out (as it did when SIGHUP
    reloaded whatever the state)."""
    a = make_backend("A", handler=lambda be, req: HANG if req.target == "/hang"
                     else ok_response())
    path = tmp_path / "lb.toml"
    _write_config(path, _one([a], top="drain_timeout = 10\n"))
    lb = FastlbProcess(None, "--config", str(path))
    s = None
    try:
        s = raw_connect(lb.port, 10)
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")     # keeps the drain going
        assert wait_for(lambda: len(a.requests) == 1)
        lb.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: any(b"draining" in ln for ln in lb.stderr_lines))
        port = _free_port()
        _write_config(path, _one([a], top="drain_timeout = 10\n")
                      + f'\n[listeners.extra]\nbind = "127.0.0.1:{port}"\n'
                        'default_pool = "app"\n')
        n = len(lb.stderr_lines)
        lb.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(b"SIGHUP" in ln for ln in lb.stderr_lines[n:]), timeout=3)
        time.sleep(0.5)
        assert lb.proc.poll() is None
        with pytest.raises(OSError):
            raw_connect(port, 2).close()
    finally:
        if s is not None:
            s.close()
        lb.kill()


def test_sighup_as_soon_as_the_pid_file_exists_does_not_kill_the_process(tmp_path):
    """--pid-file is for fastlb reload (SIGHUP). It is written before the
    SIGHUP handler is installed, so a reload sent as soon as the file
    appears (what a service manager does) kills the process: SIGHUP's
    default action."""
    path = tmp_path / "lb.toml"
    _write_config(path, _one([f"http://{HOST}:{free_dead_port()}"]))
    pid_file = tmp_path / "lb.pid"
    for attempt in range(3):
        if pid_file.exists():
            pid_file.unlink()
        p = subprocess.Popen(fastlb_cmd("serve", "--config", str(path), "--pid-file",
                                        str(pid_file)), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            text = ""
            while time.monotonic() < deadline and p.poll() is None:
                try:
                    text = pid_file.read_text().strip()
                except OSError:
                    text = ""
                if text:
                    break
                time.sleep(0.001)
            assert text == str(p.pid)
            os.kill(p.pid, signal.SIGHUP)
            time.sleep(0.5)
            assert p.poll() is None, f"killed by SIGHUP (exit status {p.returncode})"
            p.terminate()
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.mark.parametrize("content", [b"99999999999999999999999\n", "\u00b2\n".encode(),
                                     b"\xb2\xff\n"], ids=["huge", "superscript", "not-utf8"])
def test_fastlb_reload_with_a_bad_pid_file_is_an_error_not_a_traceback(tmp_path, content):
    """Bad input never yields a traceback: fastlb reload reads the pid file
    as text, takes str.isdigit() for a number and hands os.kill what int()
    made of it."""
    pid_file = tmp_path / "lb.pid"
    pid_file.write_bytes(content)
    p = subprocess.run(fastlb_cmd("reload", "--pid-file", str(pid_file)), capture_output=True,
                       text=True, cwd=REPO, timeout=30)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 1 and p.stderr.startswith("fastlb: error: --pid-file"), p.stderr
