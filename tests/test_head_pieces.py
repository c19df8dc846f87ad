"""Request heads that arrive in pieces: the same forwarded bytes whether the
head comes whole, split or a byte at a time, and a cost linear in its size
(the end is searched in the new bytes only, the pieces joined once)."""
import asyncio
import random

import pytest

from fastlb import proxy as proxy_switch
from fastlb.server import Options
from helpers import active_core  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("active_core")

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        self.out += data

    def writelines(self, data):
        for d in data:
            self.out += d

    def get_extra_info(self, name, default=None):
        return ("10.1.2.3", 50000) if name == "peername" else default

    def get_write_buffer_size(self):
        return 0

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def _harness(**kw):
    loop = asyncio.new_event_loop()
    opts = Options(backends=(("127.0.0.1", 9000),), **kw)
    p = proxy_switch.Proxy(opts, loop)
    b = p.backends[0]
    up = proxy_switch.UpstreamProtocol(b, p)
    up_t = RecordingTransport()
    up.connection_made(up_t)
    b.push_idle(up, 0.0)
    client = proxy_switch.ClientProtocol(p)
    client_t = RecordingTransport()
    client.connection_made(client_t)
    return loop, client, client_t, up, up_t


def _head(extra_bytes):
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 40)
                      for i in range(extra_bytes // 56 + 1))
    return b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\n" + filler + b"\r\n"


def _send(pieces, **kw):
    loop, client, client_t, up, up_t = _harness(**kw)
    try:
        for piece in pieces:
            client.data_received(piece)
            if client.up is not None:
                break
        forwarded = bytes(up_t.out)
        if client.up is not None:
            client.up.data_received(RESPONSE)
        return forwarded, bytes(client_t.out)
    finally:
        loop.close()


def _cuts(data, how, rng):
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    points = sorted(set(rng.randrange(1, len(data)) for _ in range(8)))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


@pytest.mark.parametrize("size", [0, 300, 5000])
@pytest.mark.parametrize("how", ["whole", "split", "bytes"])
def test_head_in_pieces_is_forwarded_the_same(size, how):
    head = _head(size)
    expect, _ = _send([head])
    assert expect.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    rng = random.Random(size)
    got, answer = _send(_cuts(head, how, rng))
    assert got == expect
    assert answer.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("cut", range(1, 5))
def test_end_of_head_split_inside_crlf_crlf(cut):
    head = _head(100)
    at = len(head) - cut           # cut inside the final CRLF CRLF
    got, answer = _send([head[:at], head[at:]])
    assert got == _send([head])[0]
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_oversized_head_in_pieces_gets_431():
    head = _head(70000)
    _, answer = _send([head[i:i + 1000] for i in range(0, len(head), 1000)])
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_byte_by_byte_head_scans_each_byte_a_bounded_number_of_times(monkeypatch):
    """Only the Python data path lets the search be counted: without the fix
    a 30 KB head sent a byte at a time is searched about 450 million times
    over; with it, a few bytes per byte."""
    if proxy_switch.IMPL != "py":
        pytest.skip("the search count is observable on the pure data path only")
    mod = proxy_switch._mod
    scanned = [0]
    real = mod._find_head_end

    def counting(data, start=0):
        scanned[0] += len(data) - start
        return real(data, start)

    monkeypatch.setattr(mod, "_find_head_end", counting)
    head = _head(30000)
    got, answer = _send([head[i:i + 1] for i in range(len(head))])
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert scanned[0] <= 5 * len(head)
