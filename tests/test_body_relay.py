"""Response bodies relayed from the read buffer (UpstreamProtocol is a
buffered protocol: a backend's bytes are read into the proxy's buffer and go
to the client as views of it).

Bodies of a known pseudo-random pattern, so that a byte out of place (a
buffer read into again while a client's transport still held a view of it)
shows: every framing, whole or in many reads, to fast and to slow clients
(whose transports keep what the socket did not take), two clients at once,
pipelined requests, and heads that share a read with their body, with 1xx
before them, or with a tunnel's first bytes.
"""
import asyncio
import random
import socket
import threading
import time
import zlib

import pytest

from fastlb.runtime.shm import B_BYTES_IN
from helpers import HOST, Reader, raw_connect, stop_servers
from helpers import LoopThread, make_lb  # noqa: F401  (fixture, used by name)

MiB = 1 << 20


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def cuts(data, rng, most=64 * 1024):
    """``data`` in pieces of random sizes (1 byte to ``most``)."""
    out = []
    i = 0
    while i < len(data):
        k = rng.choice([1, 7, 100, 1500, 4096, 16384, most])
        out.append(data[i:i + k])
        i += k
    return out


def chunked(body, rng):
    out = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in cuts(body, rng, 50000))
    return out + b"0\r\n\r\n"


class StreamBackend:
    """A backend on its own loop thread. ``GET /<framing>/<seed>/<size>[/many]``
    answers a body of ``pattern(seed, size)`` with Content-Length (``cl``),
    chunked (``chunked``) or until it closes (``close``); ``/many`` writes it
    in pieces of random sizes with a pause between them, so that the proxy
    reads it in many reads. ``/raw/<name>`` writes ``raw[name]`` as it is.
    ``sent`` counts the bytes written."""

    def __init__(self, raw=None):
        self.lt = LoopThread("stream-backend")
        self.raw = raw or {}
        self.sent = 0

        async def go():
            return await asyncio.start_server(self._serve, HOST, 0)

        self.server = self.lt.call(go())
        self.port = self.server.sockets[0].getsockname()[1]
        self.addr = (HOST, self.port)

    async def _write(self, writer, data, many, rng):
        self.sent += len(data)
        if not many:
            writer.write(data)
            await writer.drain()
            return
        for piece in cuts(data, rng):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.0005 if rng.random() < 0.3 else 0)

    async def _serve(self, reader, writer):
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target = head.split(b" ", 2)[:2]
                parts = target.decode().strip("/").split("/")
                if parts[0] == "raw":
                    await self._write(writer, self.raw[parts[1]], False, None)
                    if parts[1].startswith("close"):
                        writer.close()
                        return
                    continue
                framing, seed, size = parts[0], int(parts[1]), int(parts[2])
                many = parts[-1] == "many"
                rng = random.Random(seed * 7 + 1)
                body = pattern(seed, size)
                if method == b"HEAD":
                    body = b""
                if framing == "cl":
                    await self._write(writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                      % size + body, many, rng)
                elif framing == "chunked":
                    await self._write(writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                                      b"\r\n\r\n" + (chunked(body, rng) if body else b""),
                                      many, rng)
                else:   # until close
                    await self._write(writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
                                      + body, many, rng)
                    writer.close()
                    return
        finally:
            writer.close()

    def stop(self):
        stop_servers(self.lt, [self.server])


@pytest.fixture
def stream_backend():
    made = []

    def make(raw=None):
        be = StreamBackend(raw)
        made.append(be)
        return be

    yield make
    for be in made:
        be.stop()


def slow_socket(port):
    """A client connection with a small receive buffer: the proxy's writes to
    it stay in its transport while it reads slowly."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(20)
    s.connect((HOST, port))
    return s


class SlowReader(Reader):
    """Reads at most 4 KiB at a time, with a pause every few reads."""

    def __init__(self, sock, timeout=20.0):
        super().__init__(sock, timeout)
        self.n = 0

    def _fill(self, deadline):
        self.n += 1
        if self.n % 8 == 0:
            time.sleep(0.001)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading a response")
        self.sock.settimeout(left)
        chunk = self.sock.recv(4096)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True


def fetch(port, target, slow, method=b"GET"):
    s = slow_socket(port) if slow else raw_connect(port, timeout=20)
    with s:
        s.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\n\r\n" % (method, target))
        rd = SlowReader(s) if slow else Reader(s, timeout=20)
        return rd.read_response(method=method.decode())


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
@pytest.mark.parametrize("many", [False, True], ids=["whole", "many-reads"])
@pytest.mark.parametrize("framing", ["cl", "chunked", "close"])
def test_body_arrives_exact(stream_backend, make_lb, framing, many, slow):  # noqa: F811
    be = stream_backend()
    lb = make_lb([be])
    size = 4 * MiB if slow else 1 * MiB + 12345
    seed = zlib.crc32(b"%s %d %d" % (framing.encode(), many, slow)) & 0xFFFF
    r = fetch(lb.port, b"/%s/%d/%d%s" % (framing.encode(), seed, size,
                                          b"/many" if many else b""), slow)
    assert r.status == 200
    assert len(r.body) == size
    assert r.body == pattern(seed, size)
    if framing == "chunked":
        assert r.get("transfer-encoding") == "chunked"
    # every byte the backend wrote was counted as received from it
    b = lb.proxy.backends[0]
    assert lb.lt.call_soon(lambda: b.ctr[B_BYTES_IN]) == be.sent


def test_a_slow_and_a_fast_client_at_once(stream_backend, make_lb):  # noqa: F811
    """Both clients' responses are read into the same proxy buffer; the slow
    one's transport keeps views of it that the fast one's reads must not
    overwrite."""
    be = stream_backend()
    lb = make_lb([be])
    out = {}

    def run(name, target, slow):
        out[name] = fetch(lb.port, target, slow)

    ts = [threading.Thread(target=run, args=("slow", b"/cl/11/%d/many" % (4 * MiB), True)),
          threading.Thread(target=run, args=("fast", b"/chunked/12/%d/many" % (3 * MiB), False)),
          threading.Thread(target=run, args=("close", b"/close/13/%d" % (2 * MiB), True))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert out["slow"].body == pattern(11, 4 * MiB)
    assert out["fast"].body == pattern(12, 3 * MiB)
    assert out["close"].body == pattern(13, 2 * MiB)


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_pipelined_requests_get_exact_bodies_in_order(stream_backend, make_lb, slow):  # noqa: F811
    be = stream_backend()
    lb = make_lb([be])
    targets = [(b"cl", 21, 10), (b"cl", 22, 300000), (b"chunked", 23, 200000),
               (b"cl", 24, 2049), (b"chunked", 25, 5), (b"cl", 26, 2 * MiB)]
    s = slow_socket(lb.port) if slow else raw_connect(lb.port, timeout=20)
    with s:
        s.sendall(b"".join(b"GET /%s/%d/%d/many HTTP/1.1\r\nHost: t\r\n\r\n" % t
                           for t in targets))
        rd = SlowReader(s) if slow else Reader(s, timeout=20)
        for framing, seed, size in targets:
            r = rd.read_response()
            assert r.status == 200
            assert r.body == pattern(seed, size), (framing, seed, size)
        # and a HEAD after them: its head only, the connection still usable
        s.sendall(b"HEAD /cl/27/%d HTTP/1.1\r\nHost: t\r\n\r\n"
                  b"GET /cl/28/5000 HTTP/1.1\r\nHost: t\r\n\r\n" % (4 * MiB))
        r = rd.read_response(method="HEAD")
        assert r.status == 200 and r.get("content-length") == str(4 * MiB) and r.body == b""
        r = rd.read_response()
        assert r.body == pattern(28, 5000)


BIG_HEAD = b"".join(b"X-Long-%d: %s\r\n" % (i, b"v" * 60) for i in range(60))   # ~4.4 KiB


def _cl(body, extra=b""):
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


RAW = {
    # a head and a body in one write, of sizes around the small-response copy
    # (2 KiB) and the head probe (the first 2 KiB of a read taken as bytes)
    "b0": _cl(b""),
    "b1": _cl(pattern(31, 1500)),
    "b2": _cl(pattern(32, 2000)),
    "b3": _cl(pattern(33, 2100)),
    "b4": _cl(pattern(34, 5000)),
    "b5": _cl(pattern(35, 60000)),
    "b6": _cl(pattern(36, 300000)),
    # a head longer than the probe, with a body small and large
    "h1": _cl(pattern(37, 100), BIG_HEAD),
    "h2": _cl(pattern(38, 100000), BIG_HEAD),
    # 1xx before the final head, all with the body in one write
    "i1": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
          + _cl(pattern(39, 100000)),
    "i2": b"HTTP/1.1 103 Early Hints\r\n" + BIG_HEAD + b"\r\n" + _cl(pattern(40, 3000)),
    # chunked and until-close bodies starting in the head's read
    "c1": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
          + chunked(pattern(41, 100000), random.Random(1)),
    "close1": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + pattern(42, 100000),
}

BODIES = {"b0": b"", "b1": pattern(31, 1500), "b2": pattern(32, 2000), "b3": pattern(33, 2100),
          "b4": pattern(34, 5000), "b5": pattern(35, 60000), "b6": pattern(36, 300000),
          "h1": pattern(37, 100), "h2": pattern(38, 100000), "i1": pattern(39, 100000),
          "i2": pattern(40, 3000), "c1": pattern(41, 100000), "close1": pattern(42, 100000)}


@pytest.mark.parametrize("name", sorted(RAW))
def test_head_and_body_in_one_read(stream_backend, make_lb, name):  # noqa: F811
    be = stream_backend(RAW)
    lb = make_lb([be])
    with raw_connect(lb.port, timeout=10) as s:
        s.sendall(b"GET /raw/%s HTTP/1.1\r\nHost: t\r\n\r\n" % name.encode())
        rd = Reader(s, timeout=10)
        r = rd.read_response()
        if name.startswith("i"):
            assert r.status == 103
            r = rd.read_response()
        assert r.status == 200
        assert r.body == BODIES[name]
        if name.startswith("h"):
            assert r.get("x-long-59") == "v" * 60
        if not name.startswith("close"):
            # the connection goes on: the next response on it is whole too
            s.sendall(b"GET /cl/43/70000 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert rd.read_response().body == pattern(43, 70000)


def test_tunnel_bytes_in_the_101s_read(stream_backend, make_lb):  # noqa: F811
    """A 101 and the tunnel's first 300 KB in one write: all relayed."""
    first = pattern(51, 300000)
    be = stream_backend({"close-upgrade": b"HTTP/1.1 101 Switching Protocols\r\n"
                                          b"Upgrade: x\r\nConnection: Upgrade\r\n\r\n" + first})
    lb = make_lb([be])
    with slow_socket(lb.port) as s:
        s.sendall(b"GET /raw/close-upgrade HTTP/1.1\r\nHost: t\r\nUpgrade: x\r\n"
                  b"Connection: upgrade\r\n\r\n")
        rd = SlowReader(s)
        r = rd.read_response(head_only=True)
        assert r.status == 101
        while rd._fill(time.monotonic() + 10):
            pass
        assert bytes(rd.buf) == first


def test_small_reads_to_a_client_that_does_not_read_keep_no_buffer_each(stream_backend,
                                                                         make_lb):  # noqa: F811
    """A backend trickling small pieces to a client that reads nothing: its
    transport keeps what it cannot send, and a view would keep a whole read
    buffer for each piece; the pieces are copied instead (the buffer stays
    in use), and the bytes still arrive exact."""
    rng = random.Random(5)
    body = pattern(71, 1500 * 3000)
    pieces = [b"%x\r\n" % len(p) + p + b"\r\n" for p in
              (body[i:i + 3000] for i in range(0, len(body), 3000))] + [b"0\r\n\r\n"]

    class Trickle(StreamBackend):
        async def _serve(self, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for p in pieces:
                writer.write(p)
                await writer.drain()
                await asyncio.sleep(0.0003 + 0.0004 * rng.random())    # a read each
            writer.close()

    be = Trickle()
    try:
        lb = make_lb([be])
        before = lb.lt.call_soon(lambda: lb.proxy.read_buffers)
        with slow_socket(lb.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(1.5)      # the client reads nothing meanwhile
            taken = lb.lt.call_soon(lambda: lb.proxy.read_buffers) - before
            r = SlowReader(s).read_response()
        assert r.body == body
        # one taken when the client's transport first kept a view: a new one
        # for every piece kept would be hundreds
        assert taken <= 2, taken
    finally:
        be.stop()
