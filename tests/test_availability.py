"""Availability: failures blamed on the right party, dead connections closed,
bounded 1xx streams, graceful stop and drain, and a listener that survives
running out of file descriptors. Real sockets and processes throughout."""
import asyncio
import os
import resource
import select
import signal
import socket
import threading
import time

import pytest

from helpers import (
    ok_response,
    get,
    HANG,
    HOST,
    FastlbProcess,
    Reader,
    Reply,
    raw_connect,
    wait_for,
)
from helpers import active_core, backend_loop, make_backend, make_lb  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("active_core")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def kernel_sockets(port):
    """The TCP states (hex, as /proc/net/tcp gives them) of the sockets whose
    local port is ``port``, the listener left out: sockets the kernel still
    keeps, with their buffers, even after the process closed them."""
    states = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                states.append(fields[3])
    return states


# ---------------------------------------------------------------- blame

def test_keepalive_race_on_reused_connection_is_not_a_backend_failure(make_backend, make_lb):
    """A POST whose pooled connection the backend closed as it was reused gets a
    502 (it cannot be retried), but the backend is not blamed: no ejection."""
    held = []

    def handler(be, req):
        if req.index_on_conn >= 1:
            return Reply(None, close=True)     # closed as fastlb reused it
        # hold the first answers until four requests are in, so that the four
        # priming requests are on four connections (none is reused early)
        if len(held) >= 4:
            return ok_response()
        held.append(req.conn)
        if len(held) == 4:
            for conn in held:
                conn.transport.write(ok_response())
        return HANG

    be = make_backend("A", handler=handler, on_head=_remember_conn)
    lb = make_lb([be])      # passive checks: 3 failures in a row eject
    # prime the pool with several idle keep-alive connections
    socks = [raw_connect(lb.port) for _ in range(4)]
    for s in socks:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    for s in socks:
        assert Reader(s).read_response().status == 200
        s.close()
    assert wait_for(lambda: len(lb.proxy.backends[0].idle) == 4)
    statuses = [get(lb.port, method="POST", body=b"x" * 10).status for _ in range(4)]
    assert statuses == [502] * 4
    backend = lb.proxy.backends[0]
    assert backend.failures == 0 and backend.fail_streak == 0
    snap = lb.proxy.health.snapshot()[0]
    assert not snap["ejected"] and snap["eligible"]
    assert get(lb.port).status == 200


def test_fresh_connection_closed_before_responding_counts(make_backend, make_lb):
    """The same close on a fresh connection is the backend's fault."""
    be = make_backend("A", handler=lambda be, req: Reply(None, close=True))
    lb = make_lb([be])
    assert get(lb.port, method="POST", body=b"abc").status == 502
    assert lb.proxy.backends[0].failures == 1


def test_stalled_upload_is_a_gateway_timeout_blamed_on_the_backend(make_backend, make_lb):
    """A backend that stops reading an upload: 504 (not 408), and it counts."""
    def on_head(conn, req):
        conn.transport.pause_reading()

    be = make_backend("A", on_head=on_head, handler=lambda be, req: HANG)
    lb = make_lb([be], response_timeout=1.0)
    s = raw_connect(lb.port, timeout=10)
    s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
    stop = threading.Event()
    sent = [0]

    def pump():
        chunk = b"x" * 65536
        while not stop.is_set():
            try:
                sent[0] += s.send(chunk)
            except socket.timeout:
                continue        # fastlb stopped reading: it waits for the backend
            except OSError:
                break

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        resp = Reader(s, 8).read_response()
    finally:
        stop.set()
        t.join(5)
        s.close()
    assert resp.status == 504
    assert sent[0] < 1 << 30
    assert lb.proxy.backends[0].failures == 1


# ---------------------------------------------------------------- 1xx

def _early_hints_forever(conn, req):
    loop = asyncio.get_running_loop()

    def hint():
        if conn.closed:
            return
        conn.transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
        loop.call_later(0.01, hint)

    loop.call_soon(hint)


def test_interim_responses_are_bounded(make_backend, make_lb):
    be = make_backend("A", on_head=_early_hints_forever, handler=lambda be, req: HANG)
    lb = make_lb([be], max_interim=5, response_timeout=30)
    with raw_connect(lb.port, 5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        r = Reader(s, 5)
        hints = [r.read_response() for _ in range(5)]
        assert [h.status for h in hints] == [103] * 5
        final = r.read_response()
    assert final.status == 502
    assert lb.proxy.backends[0].failures == 1


def test_interim_responses_do_not_extend_the_response_timeout(make_backend, make_lb):
    be = make_backend("A", on_head=_early_hints_forever, handler=lambda be, req: HANG)
    lb = make_lb([be], max_interim=100000, response_timeout=1.0)
    t0 = time.monotonic()
    with raw_connect(lb.port, 10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        r = Reader(s, 10)
        while True:
            resp = r.read_response()
            if resp.status >= 200:
                break
    assert resp.status == 504
    assert time.monotonic() - t0 < 4.0


# ---------------------------------------------------------------- close what is dead

def test_idle_pooled_connection_that_speaks_leaves_the_pool_at_once(make_backend, make_lb):
    conns = []

    def on_head(conn, req):
        conns.append(conn)

    be = make_backend("A", on_head=on_head)
    lb = make_lb([be])
    assert get(lb.port).status == 200
    backend = lb.proxy.backends[0]
    assert wait_for(lambda: len(backend.idle) == 1)
    # the backend writes garbage on the idle connection, but keeps it open
    be.lt.call_soon(lambda: conns[0].transport.write(b"garbage"))
    assert wait_for(lambda: len(backend.idle) == 0, timeout=2)
    assert get(lb.port).status == 200


def test_clients_that_stop_reading_release_their_fds(make_backend):
    """After the response timeout, clients that stopped reading a large
    response are aborted: fds and memory go at once."""
    big = b"y" * (4 << 20)
    be = make_backend("A", handler=lambda be, req: ok_response(big))
    fl = FastlbProcess([be.addr], "--response-timeout", "1")
    try:
        assert get(fl.port).status == 200      # warm up (pool, imports)
        time.sleep(0.3)
        fds0 = open_fds(fl.proc.pid)
        socks = []
        for _ in range(30):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((HOST, fl.port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            socks.append(s)
        assert wait_for(lambda: open_fds(fl.proc.pid) >= fds0 + 30, timeout=5)
        # The clients never read; once their buffers stop shrinking for the
        # response timeout, they are cut. Any progress restarts the timeout
        # (nginx's send_timeout), and a full receive window can still open a
        # little at each zero-window probe (0.2 s, 0.4 s, ... apart), so the
        # last cuts may come a few seconds after the first ones.
        assert wait_for(lambda: open_fds(fl.proc.pid) <= fds0 + 1, timeout=25), \
            f"fds {open_fds(fl.proc.pid)} vs {fds0} at the start"
        # the cut is a reset: no orphaned socket keeps megabytes of unsent
        # response in the kernel (a plain close leaves them in FIN-WAIT-1)
        assert wait_for(lambda: not kernel_sockets(fl.port), timeout=2), \
            kernel_sockets(fl.port)
        for s in socks:
            s.close()
        assert get(fl.port).status == 200
    finally:
        fl.terminate()


# ---------------------------------------------------------------- fd shortage

def test_listener_survives_running_out_of_fds(make_backend):
    """accept() failing with EMFILE pauses accepting; it never kills the
    listener, and service is back as soon as fds are."""
    be = make_backend("A", handler=lambda be, req: ok_response())
    fl = FastlbProcess([be.addr], "--eject-after", "1")
    try:
        assert get(fl.port).status == 200
        pid = fl.proc.pid
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        low = open_fds(pid) + 8
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (low, hard))
        time.sleep(0.6)     # fastlb reads its fd limit every tick
        socks = []
        try:
            for _ in range(40):
                s = socket.create_connection((HOST, fl.port), timeout=5)
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                socks.append(s)
            time.sleep(1.0)
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
        # the connections that waited in the backlog are served now
        t0 = time.monotonic()
        statuses = []
        for s in socks:
            resp = Reader(s, 5).read_response()
            statuses.append(resp.status)
            s.close()
        assert set(statuses) <= {200, 503}, statuses
        assert time.monotonic() - t0 < 5
        # and new ones at once, with the backend not blamed
        assert get(fl.port).status == 200
        assert [get(fl.port).status for _ in range(5)] == [200] * 5
        assert fl.proc.poll() is None
    finally:
        fl.terminate()
    err = b"".join(fl.stderr_lines).decode()
    assert err.count("not accepting new connections") == 1, err
    assert "ejected" not in err, err


# ---------------------------------------------------------------- stop and drain

def _slow_handler(delay):
    def handler(be, req):
        conn = req.conn
        be.lt.loop.call_later(delay, lambda: conn.closed or conn.transport.write(
            ok_response(b"done " + req.target.encode())))
        return HANG
    return handler


def _remember_conn(conn, req):
    req.conn = conn


def _post_in_thread(port, results, i):
    try:
        with raw_connect(port, 10) as s:
            s.sendall(b"POST /%d HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi" % i)
            resp = Reader(s, 10).read_response()
            results[i] = (resp.status, resp.get("connection"), resp.body)
    except Exception as e:       # recorded, asserted below
        results[i] = e


def test_sigterm_drains_requests_in_flight(make_backend):
    be = make_backend("A", handler=_slow_handler(1.0), on_head=_remember_conn)
    fl = FastlbProcess([be.addr])
    try:
        idle = raw_connect(fl.port, 5)      # an idle keep-alive client
        idle.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        idle_reader = Reader(idle, 5)
        assert idle_reader.read_response().status == 200
        results = {}
        threads = [threading.Thread(target=_post_in_thread, args=(fl.port, results, i))
                   for i in range(20)]
        for t in threads:
            t.start()
        # every POST reached the backend, which answers each after 1 s
        assert wait_for(lambda: len(be.requests) == 21, timeout=5)
        t0 = time.monotonic()
        fl.proc.send_signal(signal.SIGTERM)
        # the idle client is closed at once, new connections are refused
        assert idle_reader.at_eof(timeout=1.0)
        assert wait_for(lambda: _refused(fl.port), timeout=1.0)
        for t in threads:
            t.join(10)
        assert fl.proc.wait(10) == 0
        elapsed = time.monotonic() - t0
    finally:
        fl.kill()
    for i in range(20):
        assert results[i] == (200, "close", b"done /%d" % i), results[i]
    assert elapsed < 3.0
    err = b"".join(fl.stderr_lines).decode()
    assert "SIGTERM: draining" in err and "drained" in err, err


def test_sigterm_answers_the_first_request_of_a_connection_just_accepted(make_backend):
    """A connection accepted but with no request yet when the drain starts
    (the client is sending it) is not closed like a reused idle one: its
    client has no reason to expect that. It gets that one request answered,
    with Connection: close, within a short wait; a connection that stays
    silent is closed after it, and the drain ends."""
    be = make_backend("A", handler=_slow_handler(1.0), on_head=_remember_conn)
    fl = FastlbProcess([be.addr], "--drain-timeout", "20")
    try:
        used = raw_connect(fl.port, 5)
        used.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        used_reader = Reader(used, 5)
        assert used_reader.read_response().status == 200
        busy = {}
        t = threading.Thread(target=_post_in_thread, args=(fl.port, busy, 0))
        t.start()       # keeps the drain going while the fresh connection speaks
        assert wait_for(lambda: len(be.requests) == 2, timeout=5)
        fresh = raw_connect(fl.port, 5)
        silent = raw_connect(fl.port, 5)
        # both accepted (the listener is polled): the proxy knows them
        assert wait_for(lambda: _accepted(fl, 4), 5)
        t0 = time.monotonic()
        fl.proc.send_signal(signal.SIGTERM)
        assert used_reader.at_eof(timeout=1.0)      # reused and idle: closed at once
        time.sleep(0.3)
        fresh.sendall(b"GET /fresh HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = Reader(fresh, 5).read_response()
        assert (resp.status, resp.get("connection"), resp.body) == (200, "close", b"done /fresh")
        assert Reader(silent, 5).at_eof(timeout=4.0)
        t.join(10)
        assert fl.proc.wait(10) == 0
        elapsed = time.monotonic() - t0
        for s in (used, fresh, silent):
            s.close()
    finally:
        fl.kill()
    assert busy[0] == (200, "close", b"done /0"), busy
    assert elapsed < 5.0


def _accepted(fl, n):
    """``n`` client connections accepted by the process (its TCP sockets that
    are not listening and not to the backend are counted by /proc)."""
    return _established_to(fl.proc.pid, fl.port) >= n


def _established_to(pid, port):
    """Established TCP sockets of ``pid`` whose local port is ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "01" and inode in inodes and int(local.split(":")[1], 16) == port:
                        n += 1
        except FileNotFoundError:
            pass
    return n


def _refused(port):
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except (ConnectionRefusedError, socket.timeout):
        return True
    return False


def test_second_sigint_stops_at_once(make_backend):
    be = make_backend("A", handler=lambda be, req: HANG)
    fl = FastlbProcess([be.addr], "--drain-timeout", "30")
    try:
        s = raw_connect(fl.port, 10)
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        assert wait_for(lambda: len(be.open_conns) == 1, timeout=5)
        fl.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert fl.proc.poll() is None          # still draining the hanging request
        t0 = time.monotonic()
        fl.proc.send_signal(signal.SIGINT)
        assert fl.proc.wait(5) == 0
        assert time.monotonic() - t0 < 2.0
        s.close()
    finally:
        fl.kill()
    err = b"".join(fl.stderr_lines).decode()
    assert "SIGINT again: stopping now" in err, err


def test_drain_timeout_bounds_the_stop(make_backend):
    be = make_backend("A", handler=lambda be, req: HANG)
    fl = FastlbProcess([be.addr], "--drain-timeout", "1")
    try:
        s = raw_connect(fl.port, 10)
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        assert wait_for(lambda: len(be.open_conns) == 1, timeout=5)
        t0 = time.monotonic()
        fl.proc.send_signal(signal.SIGTERM)
        assert fl.proc.wait(5) == 0
        assert 0.9 < time.monotonic() - t0 < 3.0
        s.close()
    finally:
        fl.kill()
    err = b"".join(fl.stderr_lines).decode()
    assert "still open" in err, err


def test_sighup_does_not_stop_the_process(make_backend):
    be = make_backend("A", handler=lambda be, req: ok_response())
    fl = FastlbProcess([be.addr])
    try:
        fl.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: any(b"SIGHUP" in ln for ln in fl.stderr_lines), timeout=3)
        assert fl.proc.poll() is None
        assert get(fl.port).status == 200
    finally:
        fl.terminate()


# ---------------------------------------------------------------- slow request bodies

def _trickle(port, total, piece, every, duration):
    """Send a POST whose body comes ``piece`` bytes every ``every`` seconds;
    returns the response (or None if fastlb closed without one)."""
    s = raw_connect(port, timeout=10)
    try:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % total)
        sent = 0
        t0 = time.monotonic()
        while sent < total and time.monotonic() - t0 < duration:
            n = min(piece, total - sent)
            try:
                s.sendall(b"z" * n)
            except OSError:
                break
            sent += n
            if select.select([s], [], [], every)[0]:
                break       # an answer came (before the body was complete)
        return Reader(s, 10).read_response()
    finally:
        s.close()


def test_trickled_body_gets_408_after_the_body_timeout(make_backend, make_lb):
    be = make_backend("A")
    lb = make_lb([be], body_timeout=1.0, body_min_rate=500.0)
    t0 = time.monotonic()
    resp = _trickle(lb.port, 1000, 1, 0.2, 6)
    assert resp.status == 408
    assert 0.9 < time.monotonic() - t0 < 3.0
    # the backend connection that carried the partial body is not reused
    assert wait_for(lambda: not be.open_conns, timeout=2)
    assert lb.proxy.backends[0].failures == 0
    assert get(lb.port).status == 200


def test_body_arriving_at_the_minimum_rate_is_not_cut(make_backend, make_lb):
    be = make_backend("A")
    lb = make_lb([be], body_timeout=1.0, body_min_rate=100.0)
    # 100 bytes every 0.25 s (400 B/s > 100 B/s) for about 2.5 s: past the
    # bare 1 s, within the extended deadline
    resp = _trickle(lb.port, 1000, 100, 0.25, 10)
    assert resp.status == 200
    assert resp.json()["body_len"] == 1000


def test_health_checks_that_meet_our_own_fd_shortage_do_not_take_backends_down(make_backend):
    be = make_backend("A", handler=lambda be, req: ok_response())
    fl = FastlbProcess([be.addr], "--health-path", "/h", "--health-interval", "0.2",
                       "--health-fall", "1", "--log-level", "debug")
    try:
        assert wait_for(lambda: any(b"/h" in r.target.encode() for r in be.requests), 5)
        pid = fl.proc.pid
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        # No check can get an fd: a new fd takes the lowest free number, and
        # one at or above the soft limit fails with EMFILE. A limit just below
        # the count of open fds would leave any hole in the table (a check's
        # socket just closed) free below it; with 3, only 0-2 are below it.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        time.sleep(1.2)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (4096, hard))
        assert get(fl.port).status == 200
    finally:
        fl.terminate()
    err = b"".join(fl.stderr_lines).decode()
    assert "not run: Too many open files" in err, err
    assert "is DOWN" not in err, err
