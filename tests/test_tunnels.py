"""Upgrade tunnels (README, "Upgrade and WebSocket tunnels"), on the active core.

A real WebSocket server and client (the ``websockets`` package) through an
in-process fastlb: text and binary messages, a 10 MB message to a slow reader
with fastlb's buffers bounded, ping/pong, the close handshake from either
side, 500 tunnels held open while HTTP keeps being served, the idle timeout;
then raw sockets against a raw byte-echo backend for what needs exact bytes:
the counters, half-close both ways, bytes that come with the request or with
the 101, the access log, the pool, least-conn; backends that refuse the
upgrade, ``--no-upgrade``, RFC 9110 7.8's plain requests, and a drain with a
tunnel open (``fastlb serve`` as a process).
"""
import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve

from fastlb.runtime.shm import L_NAMES

from helpers import (HOST, FastlbProcess, Reader, Reply, access_log_lines, ok_response,
                     raw_connect, recv_until_close, send_raw, wait_for)
from helpers import (active_core, backend_loop, make_backend, make_config_lb,  # noqa: F401
                     make_lb)

pytestmark = pytest.mark.usefixtures("active_core")

MB = 1 << 20


# ---------------------------------------------------------------- backends

async def _ws_handler(ws):
    path = ws.request.path
    if path == "/headers":
        await ws.send(json.dumps([[k, v] for k, v in ws.request.headers.raw_items()]))
    if path == "/close":
        await ws.recv()
        await ws.close(4002, "server bye")
        return
    if path == "/ping":
        await ws.recv()
        waiter = await ws.ping(b"from-server")
        await asyncio.wait_for(waiter, 5)
        await ws.send("server got its pong")
    if path == "/slow":
        # a slow reader: the socket is read a little at a time
        task = asyncio.get_running_loop().create_task(_trickle(ws.transport))
        try:
            msg = await ws.recv()
        finally:
            task.cancel()
        ws.transport.resume_reading()
        await ws.send(f"{len(msg)}")
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass
    ws.server_closed = (ws.close_code, ws.close_reason)
    WS_CLOSED.append((path, ws.close_code, ws.close_reason))


WS_CLOSED = []


async def _trickle(transport, paused=0.02, running=0.002):
    """Read a little, then nothing for a while, until cancelled."""
    while True:
        transport.pause_reading()
        await asyncio.sleep(paused)
        transport.resume_reading()
        await asyncio.sleep(running)


@pytest.fixture
def ws_backend(backend_loop):
    """A websockets echo server (see ``_ws_handler`` for its paths)."""
    WS_CLOSED.clear()

    async def start():
        return await ws_serve(_ws_handler, HOST, 0, max_size=None, ping_interval=None)

    server = backend_loop.call(start())
    server.addr = (HOST, server.sockets[0].getsockname()[1])
    yield server

    async def stop():
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)

    backend_loop.call(stop())


class _TunnelConn(asyncio.Protocol):
    """Answers the first request head with 101 (``Upgrade: echo``), then echoes
    every byte. Path ``/early``: a few bytes of the new protocol in the same
    write as the 101. ``/server-eof``: says ``server-done`` and half-closes
    at once, then only records what comes. At EOF from fastlb it answers
    ``bye`` (unless it half-closed already) and closes."""

    def __init__(self, be):
        self.be = be
        self.buf = b""
        self.head = None
        self.received = bytearray()
        self.got_eof = False
        self.sent_eof = False
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        self.be.conns.append(self)

    def data_received(self, data):
        if self.head is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, data = self.buf[:end + 4], self.buf[end + 4:]
            path = self.head.split(b" ")[1]
            out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
            if path == b"/early":
                out += b"early"
            self.transport.write(out)
            if path == b"/server-eof":
                self.transport.write(b"server-done")
                self.transport.write_eof()
                self.sent_eof = True
            if not data:
                return
        self.received += data
        if not self.sent_eof:
            self.transport.write(data)

    def eof_received(self):
        self.got_eof = True
        if not self.sent_eof:
            self.transport.write(b"bye")
        self.transport.close()
        return True

    def connection_lost(self, exc):
        self.closed = True


class TunnelBackend:
    """``ssl``: an ``ssl.SSLContext``: the backend speaks TLS."""

    def __init__(self, lt, ssl=None):
        self.lt = lt
        self.conns = []

        async def go():
            return await asyncio.get_running_loop().create_server(
                lambda: _TunnelConn(self), HOST, 0, ssl=ssl)

        self.server = lt.call(go())
        self.addr = (HOST, self.server.sockets[0].getsockname()[1])

    def stop(self):
        def run():
            self.server.close()
            for c in self.conns:
                c.transport.abort()
        self.lt.call_soon(run)


@pytest.fixture
def tunnel_backend(backend_loop):
    be = TunnelBackend(backend_loop)
    yield be
    be.stop()


UPGRADE = b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"


def open_tunnel(port, path=b"/", extra=b""):
    """A raw socket through which the 101 has been read (returns it, and the
    bytes that came after the 101's head)."""
    s = raw_connect(port, 10)
    s.sendall(UPGRADE % path + extra)
    r = Reader(s, 10)
    head = r._until(b"\r\n\r\n", time.monotonic() + 10)
    assert head == SWITCHED, head
    return s, bytes(r.buf)


def recv_exactly(s, n, timeout=10):
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def on_loop(lb, fn):
    """``fn()`` run on the balancer's loop thread (its state is only touched there)."""
    return lb.lt.call_soon(fn)


def listener_counters(lb, name="default"):
    """The traffic counters of listener ``name`` (``fastlb.runtime.shm.L_NAMES``)."""
    return on_loop(lb, lambda: dict(zip(L_NAMES, lb.proxy.fronts[name].ctr)))


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ws_url(lb, path="/echo"):
    return f"ws://{HOST}:{lb.port}{path}"


# ---------------------------------------------------------------- WebSocket

def test_text_and_binary_messages(ws_backend, make_lb):
    lb = make_lb([ws_backend.addr])

    async def go():
        async with ws_connect(ws_url(lb), ping_interval=None) as ws:
            await ws.send("héllo, wörld")
            assert await ws.recv() == "héllo, wörld"
            blob = bytes(range(256)) * 300
            await ws.send(blob)
            assert await ws.recv() == blob
            for i in range(50):
                await ws.send(f"m{i}" if i % 2 else f"m{i}".encode())
            got = [await ws.recv() for _ in range(50)]
            assert got == [f"m{i}" if i % 2 else f"m{i}".encode() for i in range(50)]
            assert on_loop(lb, lambda: lb.proxy.tunnels) == 1
        await asyncio.sleep(0)

    run(go())
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.upstreams,
                                                 len(lb.proxy.clients))) == (0, 0, 0))
    assert listener_counters(lb)["tunnels_total"] == 1


def test_handshake_headers_reach_the_backend(ws_backend, make_lb):
    lb = make_lb([ws_backend.addr])

    async def go():
        async with ws_connect(ws_url(lb, "/headers"), ping_interval=None) as ws:
            return json.loads(await ws.recv()), ws.response

    headers, response = run(go())
    names = [k.lower() for k, _ in headers]
    got = {k.lower(): v for k, v in headers}
    assert got["upgrade"] == "websocket" and got["connection"] == "upgrade"
    assert "sec-websocket-key" in names and got["sec-websocket-version"] == "13"
    assert got["x-forwarded-for"] == "127.0.0.1" and got["via"] == "1.1 fastlb"
    assert response.status_code == 101
    assert response.headers["Upgrade"].lower() == "websocket"
    assert response.headers["Connection"] == "upgrade"


@pytest.mark.parametrize("slow", ["client", "backend"])
def test_10mb_message_to_a_slow_reader_keeps_buffers_bounded(ws_backend, make_lb, slow):
    """10 MB one way to a reader that reads a little at a time: fastlb's write
    buffers towards the slow side stay within a few high-water marks (the
    message never piles up in fastlb), and every byte arrives."""
    lb = make_lb([ws_backend.addr])
    stop = threading.Event()

    async def sample():
        peak, limit = 0, 0
        while not stop.is_set():
            for c in list(lb.proxy.clients):
                for t in (c.transport, c.up.transport if c.up is not None else None):
                    if t is not None and not t.is_closing():
                        peak = max(peak, t.get_write_buffer_size())
                        limit = max(limit, t.get_write_buffer_limits()[1])
            await asyncio.sleep(0.002)
        return peak, limit

    sampler = asyncio.run_coroutine_threadsafe(sample(), lb.lt.loop)
    msg = os.urandom(MB) * 10

    async def go():
        path = "/slow" if slow == "backend" else "/echo"
        async with ws_connect(ws_url(lb, path), max_size=None, ping_interval=None) as ws:
            await ws.send(msg)
            if slow == "backend":
                assert await ws.recv() == str(len(msg))
                return
            # the client reads the 10 MB echo slowly
            task = asyncio.get_running_loop().create_task(_trickle(ws.transport))
            try:
                got = await ws.recv()
            finally:
                task.cancel()
            ws.transport.resume_reading()
            assert got == msg

    try:
        run(go(), timeout=90)
    finally:
        stop.set()
    peak, high = sampler.result(10)
    assert high > 0
    # without backpressure the 10 MB would sit in fastlb's buffers
    assert peak <= 4 * high + 256 * 1024, (peak, high)


def test_ping_pong_both_ways(ws_backend, make_lb):
    lb = make_lb([ws_backend.addr])

    async def go():
        async with ws_connect(ws_url(lb, "/ping"), ping_interval=None) as ws:
            for _ in range(3):
                pong = await ws.ping(b"from-client")
                await asyncio.wait_for(pong, 5)
            await ws.send("go")     # the server pings now, and says so once it has its pong
            assert await ws.recv() == "server got its pong"

    run(go())


def test_close_handshake_from_the_client(ws_backend, make_lb):
    lb = make_lb([ws_backend.addr])

    async def go():
        ws = await ws_connect(ws_url(lb), ping_interval=None)
        await ws.send("x")
        assert await ws.recv() == "x"
        await ws.close(4001, "client bye")
        return ws.close_code, ws.close_reason

    assert run(go()) == (4001, "client bye")
    assert wait_for(lambda: WS_CLOSED == [("/echo", 4001, "client bye")])
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.upstreams)) == (0, 0))


def test_close_handshake_from_the_server(ws_backend, make_lb):
    lb = make_lb([ws_backend.addr])

    async def go():
        async with ws_connect(ws_url(lb, "/close"), ping_interval=None) as ws:
            await ws.send("close please")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return ws.close_code, ws.close_reason

    assert run(go()) == (4002, "server bye")
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.upstreams)) == (0, 0))


def test_500_tunnels_while_http_goes_on(ws_backend, make_backend, make_config_lb):
    """500 WebSocket tunnels held open through one listener; meanwhile 300
    plain requests on other connections to it all get their answers, and
    every tunnel still echoes."""
    http_be = make_backend("H")
    lb = make_config_lb(f"""\
[listeners.web]
bind = "127.0.0.1:0"
default_pool = "http"
[[listeners.web.routes]]
path_prefix = "/echo"
pool = "ws"
[pools.ws]
backends = ["http://{HOST}:{ws_backend.addr[1]}"]
[pools.http]
backends = ["http://{HOST}:{http_be.port}"]
""")
    port = lb.port("web")
    n = 500

    async def http_get(i):
        r, w = await asyncio.open_connection(HOST, port)
        w.write(b"GET /h%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % i)
        data = await r.read()
        w.close()
        return data.split(b"\r\n", 1)[0]

    async def go():
        sem = asyncio.Semaphore(50)

        async def opened(i):
            async with sem:
                ws = await ws_connect(f"ws://{HOST}:{port}/echo", ping_interval=None,
                                      open_timeout=30)
                await ws.send(f"hi {i}")
                assert await ws.recv() == f"hi {i}"
                return ws

        tunnels = await asyncio.gather(*(opened(i) for i in range(n)))
        assert on_loop(lb, lambda: lb.proxy.tunnels) == n
        lines = []
        for batch in range(0, 300, 30):
            lines += await asyncio.gather(*(http_get(i) for i in range(batch, batch + 30)))
            await tunnels[batch].send("still there")
            assert await tunnels[batch].recv() == "still there"
        assert lines == [b"HTTP/1.1 200 OK"] * 300
        assert len(http_be.requests) == 300
        for i, ws in enumerate(tunnels):
            await ws.send(f"again {i}")
        for i, ws in enumerate(tunnels):
            assert await ws.recv() == f"again {i}"
        await asyncio.gather(*(ws.close() for ws in tunnels))

    run(go(), timeout=120)

    def left():
        ws_b, http_b = lb.proxy.pools["ws"].backends[0], lb.proxy.pools["http"].backends[0]
        # every tunnel's upstream closed; only pooled HTTP connections remain
        return (lb.proxy.tunnels, ws_b.active, len(ws_b.idle),
                lb.proxy.upstreams - len(http_b.idle))

    assert wait_for(lambda: on_loop(lb, left) == (0, 0, 0, 0), timeout=10)
    assert listener_counters(lb, "web")["tunnels_total"] == n
    assert listener_counters(lb, "web")["tunnels"] == 0


def test_tunnel_idle_timeout(ws_backend, make_lb):
    """A tunnel with nothing either way for tunnel_timeout is closed; one that
    keeps talking is not (the timer runs from the last byte)."""
    lb = make_lb([ws_backend.addr], tunnel_timeout=0.6)

    async def go():
        idle = await ws_connect(ws_url(lb), ping_interval=None)
        busy = await ws_connect(ws_url(lb), ping_interval=None)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:      # over three timeouts of talking
            await busy.send("tick")
            assert await busy.recv() == "tick"
            await asyncio.sleep(0.15)
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(idle.recv(), 5)
        assert idle.close_code == 1006          # closed under it, no close frame
        await busy.send("still open")
        assert await busy.recv() == "still open"
        await busy.close()

    run(go())
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.upstreams)) == (0, 0))


# ---------------------------------------------------------------- raw tunnels: exact bytes

def test_tunnel_bytes_and_counters(tunnel_backend, make_lb):
    lb = make_lb([tunnel_backend.addr])
    s, after = open_tunnel(lb.port)
    assert after == b""
    with s:
        # one tunnel: a client and an upstream connection, as the fd budget counts them
        assert on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.backends[0].active,
                                    len(lb.proxy.clients), lb.proxy.upstreams)) == (1, 1, 1, 1)
        sent = 0
        for i in range(20):
            piece = b"%d:" % i + b"x" * (i * 1000)
            s.sendall(piece)
            sent += len(piece)
            assert recv_exactly(s, len(piece)) == piece
        s.shutdown(socket.SHUT_WR)
        assert recv_until_close(s, 5) == (b"bye", True)
    conn = tunnel_backend.conns[0]
    assert bytes(conn.received) == b"".join(b"%d:" % i + b"x" * (i * 1000) for i in range(20))
    assert wait_for(lambda: on_loop(lb, lambda: lb.proxy.tunnels) == 0)
    c = listener_counters(lb)
    assert (c["tunnel_bytes_in"], c["tunnel_bytes_out"], c["tunnels_total"], c["tunnels"]) == (
        sent, sent + 3, 1, 0)
    # the tunnel's backend connection is gone, not pooled
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.upstreams, len(lb.proxy.backends[0].idle),
                                                 lb.proxy.backends[0].active)) == (0, 0, 0))


def test_tunnel_in_the_traffic_counters(tunnel_backend, make_lb):
    """A tunnel's bytes count as the listener's and the backend's traffic; the
    101 is its one response (timed), and the backend and the listener are
    active for as long as it is open."""
    from fastlb.runtime.shm import B_LAT, LAT_BOUNDS
    from test_counters import _address, backend_counts, bexp, lexp, listener_counts

    lb = make_lb([tunnel_backend.addr])
    request = UPGRADE % b"/"
    s, _ = open_tunnel(lb.port)
    with s:
        open_b, open_l = backend_counts(lb, tunnel_backend), listener_counts(lb)
        s.sendall(b"z" * 5000)
        assert recv_exactly(s, 5000) == b"z" * 5000
        s.shutdown(socket.SHUT_WR)
        assert recv_until_close(s, 5) == (b"bye", True)
    assert (open_b["active"], open_l["active"], open_l["tunnels"]) == (1, 1, 1)
    conn = tunnel_backend.conns[0]
    wait_for(lambda: listener_counts(lb)["active"] == 0)
    def row():
        p = lb.proxy
        return list(p.tables.backend_counters(p.slot, p.layout.backends[
            ("default", _address(tunnel_backend))]))

    assert sum(on_loop(lb, row)[B_LAT:B_LAT + len(LAT_BOUNDS) + 1]) == 1   # the 101, timed
    assert backend_counts(lb, tunnel_backend) == bexp(requests=1, responses_1xx=1, bytes_out=len(conn.head) + 5000,
                       bytes_in=len(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                                    b"Connection: Upgrade\r\n\r\n") + 5000 + 3)
    assert listener_counts(lb) == lexp(connections=1, requests=1, responses_1xx=1,
                                       bytes_in=len(request) + 5000,
                                       bytes_out=len(SWITCHED) + 5000 + 3,
                                       tunnels_total=1, tunnel_bytes_in=5000,
                                       tunnel_bytes_out=5000 + 3)


@pytest.mark.parametrize("split", [None, "bytes"], ids=["whole", "bytes"])
def test_client_half_close_is_passed_on(tunnel_backend, make_lb, split):
    """The client's EOF reaches the backend, which still answers after it
    (the head fed whole or byte by byte; the EOF right behind the data)."""
    lb = make_lb([tunnel_backend.addr])
    s = raw_connect(lb.port, 10)
    with s:
        send_raw(s, UPGRADE % b"/", split=split)
        assert recv_exactly(s, len(SWITCHED)) == SWITCHED
        s.sendall(b"abc")
        s.shutdown(socket.SHUT_WR)
        data, closed = recv_until_close(s, 5)
    assert data == b"abcbye" and closed
    conn = tunnel_backend.conns[0]
    assert conn.got_eof and bytes(conn.received) == b"abc"


def test_backend_half_close_is_passed_on(tunnel_backend, make_lb):
    """The backend's EOF reaches the client, which can still send to it."""
    lb = make_lb([tunnel_backend.addr])
    s, after = open_tunnel(lb.port, b"/server-eof")
    with s:
        rest, closed = recv_until_close(s, 1)
        assert after + rest == b"server-done"
        assert closed       # the backend's half-close, passed on
        s.sendall(b"after the server's EOF")
        conn = tunnel_backend.conns[0]
        assert wait_for(lambda: bytes(conn.received) == b"after the server's EOF")
        assert not conn.closed
        s.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: conn.closed)
    assert wait_for(lambda: on_loop(lb, lambda: (lb.proxy.tunnels, lb.proxy.upstreams,
                                                 len(lb.proxy.clients))) == (0, 0, 0))


def test_bytes_with_the_request_and_with_the_101(tunnel_backend, make_lb):
    """Bytes the client sends right after its request wait for the 101 and go
    to the backend; bytes of the new protocol in the 101's read reach the client."""
    lb = make_lb([tunnel_backend.addr])
    s, after = open_tunnel(lb.port, b"/early", extra=b"sent-early")
    with s:
        got = after + recv_exactly(s, len(b"earlysent-early") - len(after))
        assert got == b"earlysent-early"
    conn = tunnel_backend.conns[0]
    assert wait_for(lambda: bytes(conn.received) == b"sent-early")


def test_tunnel_logged_once_with_101(tunnel_backend, make_lb, tmp_path):
    log = tmp_path / "access.log"
    lb = make_lb([tunnel_backend.addr], access_log=str(log))
    s, _ = open_tunnel(lb.port)
    with s:
        s.sendall(b"0123456789")
        assert recv_exactly(s, 10) == b"0123456789"
        s.shutdown(socket.SHUT_WR)
        recv_until_close(s, 5)
    lines = access_log_lines(str(log), 1)
    assert len(lines) == 1, lines
    assert '"GET / HTTP/1.1" 101 %d ' % (len(SWITCHED) + 10 + 3) in lines[0], lines[0]


def test_least_conn_counts_an_open_tunnel(make_backend, make_lb):
    """A tunnel is load on its backend for as long as it is open: least-conn
    sends the next requests elsewhere."""
    def handler(be, req):
        if req.target == "/ws":
            return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
        return ok_response(be.name.encode())

    a, b = make_backend("A", handler=handler), make_backend("B", handler=handler)
    lb = make_lb([a, b], algorithm="least-conn")
    with raw_connect(lb.port, 10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        assert Reader(s, 10).read_response(head_only=True).status == 101
        tunnel_on = a.name if a.requests else b.name
        other = b.name if tunnel_on == a.name else a.name
        with raw_connect(lb.port, 10) as h:
            rd = Reader(h, 10)
            seen = []
            for i in range(6):
                h.sendall(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
                seen.append(rd.read_response().body.decode())
        assert seen == [other] * 6


# ---------------------------------------------------------------- upgrades that do not happen

@pytest.mark.parametrize("status", [200, 400])
@pytest.mark.parametrize("split", [None, "bytes"], ids=["whole", "bytes"])
def test_upgrade_refused_by_the_backend_stays_http(make_backend, make_lb, status, split):
    """Any answer but 101 is relayed as a response, and the next request on the
    same connection is served."""
    def handler(be, req):
        if req.get("upgrade"):
            body = b"no upgrade here"
            return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body)
        return ok_response(req.target.encode())

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with raw_connect(lb.port, 10) as s:
        rd = Reader(s, 10)
        send_raw(s, b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                 split=split)
        r = rd.read_response()
        assert (r.status, r.body) == (status, b"no upgrade here")
        send_raw(s, b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n", split=split)
        r = rd.read_response()
        assert (r.status, r.body) == (200, b"/next")
    assert be.requests[0].get("upgrade") == "websocket"
    assert [q.target for q in be.requests] == ["/ws", "/next"]
    assert listener_counters(lb)["tunnels_total"] == 0


def test_websocket_client_refused_by_backend(make_backend, make_lb):
    be = make_backend(handler=lambda be, req: ok_response(b"plain"))
    lb = make_lb([be])

    async def go():
        with pytest.raises(websockets.InvalidStatus) as info:
            await ws_connect(ws_url(lb), ping_interval=None)
        return info.value.response.status_code

    assert run(go()) == 200


def test_no_upgrade_answers_501(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be], upgrade=False)
    with raw_connect(lb.port, 10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        data, closed = recv_until_close(s, 5)
    assert data.startswith(b"HTTP/1.1 501 Not Implemented\r\n") and closed
    assert be.requests == []

    async def go():
        with pytest.raises(websockets.InvalidStatus) as info:
            await ws_connect(ws_url(lb), ping_interval=None)
        return info.value.response.status_code

    assert run(go()) == 501
    # a request that is no upgrade request (RFC 9110 7.8) is served as ever
    with raw_connect(lb.port, 10) as s:
        s.sendall(b"GET /ws HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert Reader(s, 10).read_response().status == 200
    assert be.requests[0].get("upgrade") is None


@pytest.mark.parametrize("req", [
    b"GET /ws HTTP/1.0\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade:\r\n\r\n",
], ids=["http10", "no-connection-option", "other-connection-option", "empty-upgrade"])
@pytest.mark.parametrize("split", [None, "bytes"], ids=["whole", "bytes"])
def test_not_an_upgrade_request_goes_plain(make_backend, make_lb, req, split):
    """RFC 9110 7.8: such a request is served as a plain one, without Upgrade."""
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port, 10) as s:
        send_raw(s, req, split=split)
        r = Reader(s, 10).read_response()
    assert r.status == 200
    names = [n.lower() for n, _ in r.json()["headers"]]
    assert "upgrade" not in names and "connection" not in names


# ---------------------------------------------------------------- drain

def _ws_process(ws_backend, *flags):
    return FastlbProcess([ws_backend.addr], "--drain-timeout", *flags)


def test_drain_keeps_a_tunnel_until_the_drain_timeout(ws_backend):
    """SIGTERM with only a tunnel open: the tunnel goes on working through the
    drain (nginx keeps tunnels until its shutdown timeout too), is closed when
    the drain timeout ends, and fastlb exits 0."""
    lb = _ws_process(ws_backend, "3")
    try:
        async def go():
            async with ws_connect(f"ws://{HOST}:{lb.port}/echo", ping_interval=None) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                lb.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert lb.proc.poll() is None       # still draining: the tunnel is open
                await ws.send("during the drain")
                assert await ws.recv() == "during the drain"
                with pytest.raises(websockets.ConnectionClosedError):
                    await asyncio.wait_for(ws.recv(), 10)   # closed at the drain's end

        run(go())
        assert lb.proc.wait(10) == 0
    finally:
        lb.kill()
    err = b"".join(lb.stderr_lines).decode()
    assert "0 request(s) in flight, 1 tunnel(s)" in err, err
    assert "drain ended with 1 connection(s) still open (1 tunnel(s)): closed" in err, err


def test_drain_ends_when_the_last_tunnel_does(ws_backend):
    """A tunnel that ends during the drain lets fastlb exit before the timeout."""
    lb = _ws_process(ws_backend, "60")
    try:
        async def go():
            async with ws_connect(f"ws://{HOST}:{lb.port}/echo", ping_interval=None) as ws:
                lb.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                await ws.send("x")
                assert await ws.recv() == "x"

        run(go())
        assert lb.proc.wait(15) == 0    # far less than the 60 s drain timeout
    finally:
        lb.kill()
    assert "drained: every request finished" in b"".join(lb.stderr_lines).decode()


def test_reload_with_workers_drains_tunnels_and_metrics_count_them(ws_backend, tmp_path):
    """``--workers 2``: /metrics sums every worker's tunnels; a reload
    (SIGHUP) drains the old workers as SIGTERM does, so a tunnel open on one
    keeps working until ``drain_timeout`` and is then closed, while new
    connections reach the new workers. The closed worker's counters stay in
    the totals; its open-tunnels gauge does not."""
    import re

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from test_workers import _serve_file, children, log_text

    text = (f'workers = 2\ndrain_timeout = 2\n[admin]\nbind = "127.0.0.1:0"\n'
            f'[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "ws"\n'
            f'[pools.ws]\nbackends = ["http://{HOST}:{ws_backend.addr[1]}"]\n')
    lb, path, pids = _serve_file(tmp_path, text, 2)
    try:
        m = wait_for(lambda: re.search(r"admin listening on 127\.0\.0\.1:(\d+)", log_text(lb)),
                     15)
        assert m, log_text(lb)
        api = httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=10)

        def metric(name):
            for fam in text_string_to_metric_families(api.get("/metrics").text):
                for s in fam.samples:
                    if s.name == name and s.labels.get("listener") == "web":
                        return s.value
            raise KeyError(name)

        async def go():
            a = await ws_connect(f"ws://{HOST}:{lb.port}/echo", ping_interval=None)
            b = await ws_connect(f"ws://{HOST}:{lb.port}/echo", ping_interval=None)
            for ws in (a, b):
                await ws.send("12345")
                assert await ws.recv() == "12345"
            assert await asyncio.to_thread(
                wait_for, lambda: metric("fastlb_frontend_current_tunnels") == 2)
            assert metric("fastlb_frontend_tunnels_total") == 2
            await b.close()
            assert await asyncio.to_thread(
                wait_for, lambda: metric("fastlb_frontend_current_tunnels") == 1)
            path.write_text(text.replace("drain_timeout = 2", "drain_timeout = 2.5"))
            lb.proc.send_signal(signal.SIGHUP)
            assert await asyncio.to_thread(
                wait_for, lambda: "reloaded (" in log_text(lb), 10), log_text(lb)
            t0 = time.monotonic()
            await a.send("during the drain")
            assert await a.recv() == "during the drain"
            async with ws_connect(f"ws://{HOST}:{lb.port}/echo", ping_interval=None) as c:
                await c.send("on a new worker")
                assert await c.recv() == "on a new worker"
            with pytest.raises(websockets.ConnectionClosedError):
                await asyncio.wait_for(a.recv(), 15)    # closed at the old worker's drain end
            assert time.monotonic() - t0 > 1.0          # not before: it was kept, not cut
            return a.close_code

        assert run(go(), timeout=60) == 1006
        # the old generation is gone; its tunnels are in the totals, none is open
        assert wait_for(lambda: not set(children(lb.proc.pid)) & set(pids), 15)
        assert wait_for(lambda: metric("fastlb_frontend_current_tunnels") == 0)
        assert metric("fastlb_frontend_tunnels_total") == 3
        assert metric("fastlb_frontend_tunnel_bytes_in_total") > 0
        assert metric("fastlb_frontend_tunnel_bytes_out_total") > 0
        api.close()
    finally:
        assert lb.terminate(timeout=30) == 0, log_text(lb)
