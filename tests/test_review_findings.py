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


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_accepting_pauses_when_fds_are_already_short(make_backend):
    """The fd limit drops below what is open (or fds fastlb does not count
    use it up): no connection is ever accepted, so connection_made never runs
    the fd check, and uvloop retries accept() (EMFILE) on every loop
    iteration. The ticker, which reads the limit, must pause accepting."""
    be = make_backend("A", handler=lambda be, req: ok_response())
    fl = FastlbProcess([be.addr])
    try:
        assert get(fl.port).status == 200
        pid = fl.proc.pid
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) - 4, hard))
        try:
            with raw_connect(fl.port, 5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                paused = wait_for(lambda: any(b"not accepting" in ln for ln in fl.stderr_lines),
                                  timeout=2.0)
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
                assert Reader(s, 5).read_response().status == 200
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
        assert paused, b"".join(fl.stderr_lines).decode()
    finally:
        fl.terminate()


def test_listener_retries_in_one_chain_while_dup_fails():
    """While the listening socket cannot be served again (dup() fails with
    EMFILE), the retries stay one chain: each watchdog tick must not start
    another chain of retries that keeps going every ACCEPT_PAUSE."""
    lt = LoopThread("listener")
    socks = _listen_sockets(HOST, 0, 16)

    class FlakySock:
        def __init__(self, s):
            self.s = s
            self.calls = 0
            self.fail = False

        def dup(self):
            self.calls += 1
            if self.fail:
                raise OSError(errno.EMFILE, "Too many open files")
            return self.s.dup()

        def __getattr__(self, name):
            return getattr(self.s, name)

    async def go():
        listener = Listener(asyncio.get_running_loop(), socks, asyncio.Protocol)
        await listener.start()
        return listener

    listener = lt.call(go())
    try:
        flaky = FlakySock(listener.sockets[0])
        listener.sockets[0] = flaky

        def lose():
            flaky.fail = True
            listener._servers[0].close()    # uvloop lets go of its duplicate
        lt.call_soon(lose)
        time.sleep(3.0)
        before = flaky.calls
        time.sleep(1.0)
        per_second = flaky.calls - before
        flaky.fail = False
        assert wait_for(lambda: listener._servers[0] is not None, timeout=2)
        # one retry every ACCEPT_PAUSE (0.1 s) plus the watchdog's (0.25 s)
        assert per_second <= 20, per_second
    finally:
        lt.call_soon(listener.close)
        lt.stop()


def test_idle_pooled_connections_do_not_keep_accepting_paused(make_backend):
    """Near the fd limit, idle pooled backend connections are the fds to give
    up: a new client must not wait in the backlog until the pool's idle
    timeout while fastlb holds only idle pooled connections."""
    def make(name):
        def on_head(conn, req):
            req.conn = conn

        def handler(be, req):
            c = req.conn
            be.lt.loop.call_later(0.3, lambda: c.closed or c.transport.write(
                b"HTTP/1.1 200 OK\r\nX-Backend: " + name.encode()
                + b"\r\nContent-Length: 2\r\n\r\nok"))
            return HANG
        return make_backend(name, handler=handler, on_head=on_head)

    bes = [make(n) for n in "ABC"]
    fl = FastlbProcess([b.addr for b in bes], "--algorithm", "maglev", "--hash-key", "path")
    try:
        pid = fl.proc.pid
        fds0 = open_fds(pid)

        def req(s, path):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            return Reader(s, 10).read_response()

        paths = {}
        with raw_connect(fl.port, 10) as s:
            for i in range(200):
                paths.setdefault(req(s, f"/p{i}").get("x-backend"), f"/p{i}")
                if len(paths) == 3:
                    break
        assert len(paths) == 3
        clients = [raw_connect(fl.port, 10) for _ in range(12)]
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds0 + 59, hard))
            time.sleep(0.6)     # fastlb reads its fd limit every tick
            # 12 keep-alive clients, 12 requests at once to each backend in
            # turn: 36 pooled connections, 12 per backend
            for name in "ABC":
                ts = [threading.Thread(target=req, args=(c, paths[name])) for c in clients]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join(10)
            waiting = raw_connect(fl.port, 5)       # accepting pauses
            assert wait_for(lambda: any(b"not accepting" in ln for ln in fl.stderr_lines), 3)
            for c in clients:
                c.close()
            waiting.close()
            time.sleep(0.5)
            # no client left, only idle pooled connections: a new client is served
            with raw_connect(fl.port, 5) as s:
                s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                assert Reader(s, 5).read_response().status == 200
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
    finally:
        fl.terminate()


def test_connects_in_progress_count_towards_the_fd_budget():
    """Each request to a backend that is slow to accept holds an fd for its
    connect before the connection exists. Those fds must count: else accept()
    runs into EMFILE and libuv's EMFILE trick accepts and closes the clients
    waiting in the backlog (they get no answer at all)."""
    blackhole = socket.socket()
    blackhole.bind((HOST, 0))
    blackhole.listen(0)
    fill = []
    for _ in range(3):          # fill its accept queue: later SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(blackhole.getsockname())
        except BlockingIOError:
            pass
        fill.append(c)
    time.sleep(0.2)
    fl = FastlbProcess([blackhole.getsockname()], "--connect-timeout", "1",
                       "--eject-after", "0", "--retries", "0")
    results = []
    try:
        pid = fl.proc.pid
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 60, hard))
        time.sleep(0.6)     # fastlb reads its fd limit every tick

        def one():
            try:
                with raw_connect(fl.port, 20) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    results.append(Reader(s, 20).read_response().status)
            except (EOFError, OSError) as e:
                results.append(type(e).__name__)

        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        fl.terminate()
        blackhole.close()
        for c in fill:
            c.close()
    assert len(results) == 40
    # every client gets an answer (502: the connect timed out; 503: fastlb's own shortage)
    assert all(r in (502, 503) for r in results), results


def test_keepalive_race_after_a_refused_connect_gets_its_fresh_retry(make_backend, make_lb):
    """A's pooled connection is stale, and A now refuses connections, so the
    GET moves to B, whose pooled connection is stale too. B must get the
    request's fresh retry (it is B's first race), whatever path led to B: here
    a refused connect, not a close."""
    def a_handler(be, req):
        if req.index_on_conn >= 1:
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
    a.lt.call_soon(a.server.close)      # A refuses new connections; its pooled one stays
    resp = get(lb.port)
    assert resp.status == 200 and resp.body == b"B"
    assert lb.proxy.backends[1].failures == 0
