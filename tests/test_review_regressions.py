"""Reproductions of problems found in review of the availability change."""
import asyncio
import errno
import os
import resource
import socket
import threading
import time

import pytest

from helpers import (HANG, HOST, FastlbProcess, LoopThread, Reader, Reply, get, ok_response,
                     raw_connect, wait_for)
from helpers import active_core, backend_loop, make_backend, make_lb  # noqa: F401  (fixtures)
from fastlb.server import Listener, _listen_sockets

pytestmark = pytest.mark.usefixtures("active_core")


def _answer_after(delay):
    def on_head(conn, req):
        req.conn = conn

    def handler(be, req):
        conn = req.conn
        be.lt.loop.call_later(delay, lambda: conn.closed or conn.transport.write(ok_response()))
        return HANG
    return on_head, handler


def test_body_deadline_does_not_cut_the_wait_for_the_response(make_backend, make_lb):
    """A body that arrived whole with its head: the backend then has the whole
    --response-timeout to answer, not what is left of --body-timeout."""
    on_head, handler = _answer_after(1.5)
    be = make_backend("A", on_head=on_head, handler=handler)
    lb = make_lb([be], body_timeout=0.5, response_timeout=10.0)
    with raw_connect(lb.port, 10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        resp = Reader(s, 10).read_response()
    assert resp.status == 200
    assert lb.proxy.backends[0].failures == 0


def test_keepalive_race_on_the_second_backend_is_not_blamed(make_backend, make_lb):
    """The stale keep-alive race is never a backend's fault, on whichever try
    it happens: A's pooled connection is stale and A is down, so the GET moves
    to B, whose pooled connection turns out stale too. B must not be blamed,
    and the GET gets a fresh connection to B (it is idempotent)."""
    state = {"a_down": False}

    def a_handler(be, req):
        if state["a_down"]:
            return Reply(None, close=True)
        return ok_response(b"A")

    def b_handler(be, req):
        if req.index_on_conn >= 1:
            return Reply(None, close=True)      # B closed its idle connection
        return ok_response(b"B")

    a = make_backend("A", handler=a_handler)
    b = make_backend("B", handler=b_handler)
    lb = make_lb([a, b])    # round robin: A, B, A, ...
    assert get(lb.port).body == b"A"
    assert get(lb.port).body == b"B"
    assert wait_for(lambda: all(len(be.idle) == 1 for be in lb.proxy.backends))
    state["a_down"] = True
    resp = get(lb.port)
    assert resp.status == 200 and resp.body == b"B"
    assert lb.proxy.backends[1].failures == 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("flag", ["--max-interim", "--retries", "--upstream-max-idle"])
def test_huge_integer_flags_never_give_a_traceback(flag):
    """The compiled data path keeps these in C ints: a value that does not fit
    must be refused (or clamped) like any bad flag, on both paths alike."""
    import subprocess
    from helpers import fastlb_cmd, REPO
    proc = subprocess.Popen(fastlb_cmd("serve", "--listen", f"{HOST}:0", "--backend",
                                       f"http://{HOST}:9", flag, "99999999999"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    try:
        out = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in out and proc.poll() is None \
                and time.monotonic() < deadline:
            out += proc.stderr.read1(4096)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)
        out += proc.stderr.read()
        proc.stderr.close()
    err = out.decode()
    assert "Traceback" not in err, err
    assert b"listening on" in out or proc.returncode == 2, err


def test_pooled_connection_closed_by_the_backend_is_not_reused(make_backend, make_lb):
    """The backend closed a pooled connection (its FIN is read) just before a
    POST arrives, both in one turn of the event loop: the connection is dead
    and known to be, so it must leave the pool at its EOF (as it does on any
    byte), and the POST goes on a fresh connection instead of failing 502."""
    be = make_backend("A")
    lb = make_lb([be])
    backend = lb.proxy.backends[0]
    statuses = []
    for _ in range(3):
        with raw_connect(lb.port, 5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert Reader(c, 5).read_response().status == 200
            assert wait_for(lambda: len(backend.idle) == 1)
            # the balancer's loop is busy for a moment; meanwhile the backend
            # closes the idle connection, then the client sends a POST
            lb.lt.loop.call_soon_threadsafe(time.sleep, 0.3)
            time.sleep(0.05)
            be.close_idle_connections()
            time.sleep(0.05)
            c.sendall(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
            statuses.append(Reader(c, 5).read_response().status)
    assert statuses == [200] * 3
    assert sum(1 for q in be.requests if q.method == "POST") == 3

