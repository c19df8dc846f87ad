"""The access log: one line per exchange, however it ends; escaped; combined or JSON.

* The formatter (``access_log_line`` and ``AccessLogBuffer`` of the core): golden
  lines on each core, and the compiled core against the pure one on seeded
  random bytes (heads, addresses, numbers), with every JSON line parsed.
* End to end, through a balancer with ``--access-log`` to a temp file and real
  sockets: every way an exchange ends gives exactly one line, with its status
  and the bytes the client was sent; idle connections give none.
"""
import json
import os
import random
import signal
import socket
import struct
import time

import httpx
import pytest

from fastlb import _core_py as P
from fastlb import core as _switch
from fastlb.selection import ALGORITHMS
from helpers import (  # noqa: F401  (fixtures are used by name)
    ACCESS_LOG_COMBINED,
    ACCESS_LOG_JSON_KEYS,
    HANG,
    HOST,
    Balancer,
    FastlbProcess,
    Reader,
    Reply,
    access_log_lines,
    active_core,
    backend_loop,
    exchange,
    free_dead_port,
    make_backend,
    make_lb,
    raw_connect,
    recv_until_close,
    wait_for,
)

N_CASES = int(os.environ.get("FASTLB_PARITY_CASES", "3000"))
STAMP = b"27/Nov/2026:01:00:00 +0000"


# ---------------------------------------------------------------- the formatter, each core

def test_combined_golden(core):
    head = (b"GET /a HTTP/1.1\r\nHost: x\r\nReferer: http://r/p\r\n"
            b"user-agent:  curl/8.5 \t\r\n\r\n")
    line = core.access_log_line(0, head, b"10.0.0.1", STAMP, 200, 1234, b"10.0.0.9:80",
                                0.0008125, 0.00123)
    assert line == (b'10.0.0.1 - - [27/Nov/2026:01:00:00 +0000] "GET /a HTTP/1.1" 200 1234 '
                    b'"http://r/p" "curl/8.5" 10.0.0.9:80 1.230ms 0.813ms\n')


def test_combined_escapes_client_fields(core):
    # a forged request line: '"' would end the field early and fake a status
    head = (b'GET /a" 200 1 \xc3\xa9\\ \x01\x7f HTTP/1.1\r\nUser-Agent: u"\xff\r\n'
            b'Referer: \t\r\n\r\n')
    line = core.access_log_line(0, head, b"1.2.3.4", STAMP, 400, 7, None, -1.0, 0.0)
    assert line == (b'1.2.3.4 - - [27/Nov/2026:01:00:00 +0000] '
                    b'"GET /a\\x22 200 1 \\xC3\\xA9\\x5C \\x01\\x7F HTTP/1.1" 400 7 '
                    b'"" "u\\x22\\xFF" - 0.000ms -\n')
    assert line.count(b'"') == 6
    assert max(line) < 0x80
    assert ACCESS_LOG_COMBINED.match(line.decode().rstrip("\n"))


def test_json_golden(core):
    head = b"POST /up?x=1 HTTP/1.0\r\nX-Request-Id: abc-1\r\nUser-Agent: u\r\n\r\n"
    line = core.access_log_line(1, head, b"::1", b"2026-11-27T01:00:00+00:00", 502, 99,
                                b"[::1]:8000", -1.0, 2.5)
    assert line == (b'{"time":"2026-11-27T01:00:00+00:00","client":"::1","method":"POST",'
                    b'"target":"/up?x=1","version":"HTTP/1.0","status":502,"bytes_sent":99,'
                    b'"backend":"[::1]:8000","upstream_ms":null,"total_ms":2500.000,'
                    b'"request_id":"abc-1"}\n')
    doc = json.loads(line)
    assert list(doc) == ACCESS_LOG_JSON_KEYS


def test_json_escaped_text_round_trips(core):
    head = b'GET /a"\\\xc3\xa9\x00 HTTP/1.1\r\nX-Request-Id: "\x1b[31m\r\n\r\n'
    doc = json.loads(core.access_log_line(1, head, b"c", STAMP, 400, 0, None, -1.0, 0.0))
    # json.loads gives back exactly the combined field's text
    assert doc["target"] == '/a\\x22\\x5C\\xC3\\xA9\\x00'
    assert doc["request_id"] == '\\x22\\x1B[31m'
    combined = core.access_log_line(0, head, b"c", STAMP, 400, 0, None, -1.0, 0.0)
    assert ACCESS_LOG_COMBINED.match(combined.decode().rstrip("\n"))["request"] == \
        f'{doc["method"]} {doc["target"]} {doc["version"]}'


@pytest.mark.parametrize("head,method,target,version", [
    (b"GET / HTTP/1.1\r\n\r\n", "GET", "/", "HTTP/1.1"),
    (b"GET /x", "GET", "/x", None),                 # cut short, no LF yet
    (b"GARBAGE\r\n\r\n", "GARBAGE", None, None),
    (b"\x16\x03\x01\x02", "\\x16\\x03\\x01\\x02", None, None),
    (b"GET /a b HTTP/1.1\n\n", "GET", "/a b", "HTTP/1.1"),
    (b"GET  HTTP/1.1\r\n\r\n", "GET", "", "HTTP/1.1"),
    (None, None, None, None),
], ids=["plain", "partial", "no-sp", "tls", "bare-lf", "empty-target", "no-head"])
def test_json_request_line_parts(core, head, method, target, version):
    doc = json.loads(core.access_log_line(1, head, b"c", STAMP, 400, 0, None, -1.0, 0.0))
    assert (doc["method"], doc["target"], doc["version"]) == (method, target, version)


def test_headers_first_value_case_and_end_of_head(core):
    head = (b"GET / HTTP/1.1\r\nX-REQUEST-ID:first\r\nx-request-id: second\r\n"
            b"X-Request-Id :spaced\r\n\r\nX-Request-Id: in-body\r\n")
    doc = json.loads(core.access_log_line(1, head, b"c", STAMP, 200, 0, None, -1.0, 0.0))
    assert doc["request_id"] == "first"
    body_only = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nX-Request-Id: in-body\r\n"
    doc = json.loads(core.access_log_line(1, body_only, b"c", STAMP, 200, 0, None, -1.0, 0.0))
    assert doc["request_id"] is None
    line = core.access_log_line(0, b"GET / HTTP/1.1\r\nReferer: a\r\nReferer: b\r\n\r\n"
                                b"User-Agent: body\r\n", b"c", STAMP, 200, 0, None, -1.0, 0.0)
    assert b'"a" "-"' in line


@pytest.mark.parametrize("seconds,text", [
    (0.0, b"0.000"), (0.0000004, b"0.000"), (0.0000005, b"0.001"), (0.0123456, b"12.346"),
    (3.0, b"3000.000"), (-1.0, b"0.000"), (float("nan"), b"0.000"), (float("inf"), b"1000000000000.000"),
    (1e300, b"1000000000000.000"),
])
def test_milliseconds(core, seconds, text):
    line = core.access_log_line(1, None, b"c", STAMP, 200, 0, None, seconds, seconds)
    doc = json.loads(line)
    assert b'"total_ms":%s,' % text in line
    # upstream: negative or NaN means no backend answered
    assert doc["upstream_ms"] is None if not seconds >= 0 else doc["upstream_ms"] == float(text)


def test_bad_arguments(core):
    with pytest.raises(ValueError):
        core.access_log_line(3, None, b"c", STAMP, 200, 0, None, 0.0, 0.0)
    with pytest.raises(TypeError):
        core.access_log_line(0, "GET / HTTP/1.1", b"c", STAMP, 200, 0, None, 0.0, 0.0)
    with pytest.raises(TypeError):
        core.access_log_line(0, None, b"c", STAMP, 200, 0, "backend", 0.0, 0.0)
    with pytest.raises(ValueError):
        core.AccessLogBuffer(5)


def test_buffer_batches_lines(core):
    head = b"GET /x HTTP/1.1\r\n\r\n"
    one = core.access_log_line(0, head, b"c", STAMP, 200, 5, b"b:1", 0.001, 0.002)
    buf = core.AccessLogBuffer(0, 2 * len(one))
    buf.stamp = STAMP
    full = [buf.add(head, b"c", 200, 5, b"b:1", 0.001, 0.002) for _ in range(3)]
    assert full == [False, True, True]      # two lines reach the limit
    assert len(buf) == 3 * len(one)
    assert buf.take() == one * 3
    assert len(buf) == 0 and buf.take() == b""
    # a line far larger than a batch, then the batch goes on
    big = b"GET /" + b"\xff" * 100000 + b" HTTP/1.1\r\n\r\n"
    buf.add(big, b"c", 400, 1, None, -1.0, 0.0)
    buf.add(head, b"c", 200, 5, b"b:1", 0.001, 0.002)
    assert buf.take() == core.access_log_line(0, big, b"c", STAMP, 400, 1, None, -1.0, 0.0) + one


# ---------------------------------------------------------------- compiled against pure

@pytest.fixture(scope="module")
def C():
    if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
        pytest.skip("FASTLB_NO_EXTENSIONS=1")
    mod = _switch.implementation("c")
    if mod is None:
        if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
            pytest.fail("compiled core fastlb._core is not built")
        pytest.skip("compiled core fastlb._core is not built")
    return mod


PIECES = [b"GET", b" ", b"/", b"HTTP/1.1", b"\r\n", b"\n", b"\r", b":", b"\t", b'"', b"\\",
          b"Referer", b"referer", b"User-Agent", b"USER-AGENT", b"X-Request-Id", b"x-request-id",
          b"Host: x", b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xff", b"\xc3\xa9", b"abcdefgh",
          b"0123456789abcdef" * 2]


def random_head(rng):
    if rng.random() < 0.05:
        return None
    if rng.random() < 0.3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
    return b"".join(rng.choice(PIECES) for _ in range(rng.randrange(40)))


def random_seconds(rng):
    r = rng.random()
    if r < 0.05:
        return rng.choice([-1.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e12, 0.0])
    return rng.random() * rng.choice([0.001, 1.0, 100.0, 1e6])


def random_args(rng):
    return (random_head(rng),
            rng.choice([b"127.0.0.1", b"::1", b"", bytes(rng.randrange(256) for _ in range(6))]),
            rng.choice([STAMP, b"2026-11-27T01:00:00+00:00", b""]),
            rng.choice([200, 499, 0, 999, 2**40, -5]),
            rng.choice([0, 133, 10**12, 2**62]),
            rng.choice([None, b"127.0.0.1:8000", b"[::1]:80"]),
            random_seconds(rng), random_seconds(rng))


def test_parity_random(C):
    rng = random.Random(8)
    for i in range(N_CASES):
        head, client, stamp, status, sent, backend, upstream, total = random_args(rng)
        for fmt in (0, 1):
            args = (fmt, head, client, stamp, status, sent, backend, upstream, total)
            want = P.access_log_line(*args)
            assert C.access_log_line(*args) == want, (i, args)
            assert want.endswith(b"\n") and want.count(b"\n") == 1 and max(want) < 0x80
            if fmt == 1:
                assert list(json.loads(want)) == ACCESS_LOG_JSON_KEYS
            else:
                assert want.count(b'"') == 6, want      # no field breaks out of its quotes
                if client and b" " not in client and stamp and 100 <= status <= 999:
                    assert ACCESS_LOG_COMBINED.match(want.decode()[:-1]), want


def test_parity_buffer(C):
    rng = random.Random(9)
    for fmt in (0, 1):
        bufs = [M.AccessLogBuffer(fmt, 700) for M in (P, C)]
        for i in range(N_CASES // 3):
            head, client, stamp, status, sent, backend, upstream, total = random_args(rng)
            outs = []
            for b in bufs:
                b.stamp = stamp
                outs.append((b.add(head, client, status, sent, backend, upstream, total), len(b)))
            assert outs[0] == outs[1], i
            if outs[0][0] or rng.random() < 0.1:
                assert bufs[0].take() == bufs[1].take(), i
        assert bufs[0].take() == bufs[1].take()


def test_escaping_every_byte_at_every_offset(C):
    """The compiled core tests 8 bytes at once: each byte value, at each place in a word."""
    base = b"abcdefghijklmnopqrstuvwx"
    for v in range(256):
        for off in range(len(base)):
            head = base[:off] + bytes([v]) + base[off + 1:]
            for fmt in (0, 1):
                args = (fmt, head, head, STAMP, 200, 0, None, -1.0, 0.0)
                assert C.access_log_line(*args) == P.access_log_line(*args), (v, off)


# ---------------------------------------------------------------- end to end: every ending

def combined(path, n=1, **kw):
    """Exactly ``n`` lines in the log (asserted), each parsed."""
    lines = access_log_lines(path, n, **kw)
    assert len(lines) == n, lines
    out = []
    for ln in lines:
        m = ACCESS_LOG_COMBINED.match(ln)
        assert m, ln
        out.append(m)
    return out


def rst_close(sock):
    """Close abortively (RST), as a client that goes away does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_exactly(sock, n, timeout=5.0):
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_head_and(sock, body_bytes, timeout=5.0):
    """Read a response head and then ``body_bytes`` bytes of its body."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    need = end + body_bytes - len(data)
    if need > 0:
        data += recv_exactly(sock, need, timeout)
    return bytes(data)


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "access.log"


@pytest.mark.usefixtures("active_core")
class TestEndings:
    def test_completed_exchanges(self, make_backend, make_lb, log_path):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path))
        with httpx.Client(timeout=10) as c:
            r1 = c.get(lb.url + "/one", headers={"Referer": "http://ref/x"})
            r2 = c.post(lb.url + "/two", content=b"12345")
        got = combined(log_path, 2)
        assert [m["request"] for m in got] == ["GET /one HTTP/1.1", "POST /two HTTP/1.1"]
        assert [m["status"] for m in got] == ["200", "200"]
        assert got[0]["referer"] == "http://ref/x" and got[1]["referer"] == "-"
        assert got[0]["backend"] == f"{HOST}:{be.port}"
        assert got[0]["upstream"] != "-"
        assert float(got[0]["upstream"][:-2]) <= float(got[0]["total"])
        # the bytes the client got: head and body as fastlb wrote them
        for m, r in zip(got, (r1, r2)):
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(
                b"%s: %s\r\n" % (k, v) for k, v in r.headers.raw) + b"\r\n"
            assert int(m["bytes"]) == len(head) + len(r.content)

    def test_idle_connections_are_not_exchanges(self, make_backend, make_lb, log_path):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path), keepalive_timeout=0.3)
        with raw_connect(lb.port):
            pass                                        # opened and closed, nothing sent
        with raw_connect(lb.port) as s:
            s.sendall(b"\r\n\r\n")                       # blank lines only (RFC 9112 2.2)
            time.sleep(0.1)
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /only HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(s).read_response().status == 200
            _, closed = recv_until_close(s, 3)           # the idle timeout closes it
            assert closed
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(s).read_response().status == 200
            time.sleep(0.05)
            rst_close(s)                                # reset while idle: still no line
        got = combined(log_path, 2, settle=0.5)
        assert [m["request"] for m in got] == ["GET /only HTTP/1.1", "GET /reset HTTP/1.1"]

    @pytest.mark.parametrize("raw,status,line", [
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "GET /x HTTP/1.1"),
        (b'GET /a" 200 1 HTTP/1.1\r\nHost: x\r\n\r\n', 400, "GET /a\\x22 200 1 HTTP/1.1"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "GET /caf\\xC3\\xA9 HTTP/1.1"),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "\\x16\\x03\\x01\\x00\\xA5\\x01\\x00"
                                                           "\\x00\\xA1\\x03\\x03"),
        (b"GET /big HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 2000 + b"\r\n\r\n", 431,
         "GET /big HTTP/1.1"),
        (b"GET /bigger HTTP/1.1\r\nX-Pad: " + b"p" * 2000, 431, "GET /bigger HTTP/1.1"),
    ], ids=["dup-host", "forged-quote", "high-bytes", "tls-hello", "431-whole", "431-partial"])
    def test_refused_before_any_backend(self, make_backend, make_lb, log_path, raw, status,
                                        line):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path), max_header_size=1024)
        out, _ = exchange(lb.port, raw)
        assert out.startswith(b"HTTP/1.1 %d " % status), out
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["backend"], m["upstream"]) == \
            (line, str(status), "-", "-")
        assert int(m["bytes"]) == len(out)
        assert be.requests == []

    @pytest.mark.parametrize("split", [None, [7, 20]], ids=["one-piece", "in-pieces"])
    def test_request_head_timeout_408(self, make_backend, make_lb, log_path, split):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path), header_timeout=0.5)
        out, _ = exchange(lb.port, b"GET /slow HTTP/1.1\r\nHost: x\r\n", split=split)
        assert out.startswith(b"HTTP/1.1 408 ")
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["bytes"]) == ("GET /slow HTTP/1.1", "408",
                                                           str(len(out)))
        # timed from the request's first byte
        assert float(m["total"]) >= 400

    def test_user_agent_escaped(self, make_backend, make_lb, log_path):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path))
        out, _ = exchange(lb.port, b'GET /ua HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
                                   b'User-Agent: evil" 200 "\xff\\\r\n\r\n')
        assert out.startswith(b"HTTP/1.1 200 ")
        (m,) = combined(log_path)
        assert m["ua"] == "evil\\x22 200 \\x22\\xFF\\x5C"
        assert m["status"] == "200"

    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    def test_502_after_retries(self, make_lb, log_path, algorithm):
        dead = [(HOST, free_dead_port()) for _ in range(3)]
        lb = make_lb(dead, access_log=str(log_path), retries=2, algorithm=algorithm)
        out, _ = exchange(lb.port, b"GET /down HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 502 ")
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["upstream"]) == ("GET /down HTTP/1.1", "502", "-")
        assert m["backend"] in [f"{h}:{p}" for h, p in dead]
        assert int(m["bytes"]) == len(out)

    def test_504_backend_silent(self, make_backend, make_lb, log_path):
        be = make_backend(handler=lambda be, req: HANG)
        lb = make_lb([be], access_log=str(log_path), response_timeout=0.5)
        out, _ = exchange(lb.port, b"GET /hang HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 504 ")
        (m,) = combined(log_path)
        assert (m["status"], m["backend"], m["upstream"]) == ("504", f"{HOST}:{be.port}", "-")
        assert int(m["bytes"]) == len(out)

    def test_client_resets_before_the_response_499(self, make_backend, make_lb, log_path):
        be = make_backend(handler=lambda be, req: HANG)
        lb = make_lb([be], access_log=str(log_path))
        s = raw_connect(lb.port)
        s.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: len(be.requests) == 1, 5)
        rst_close(s)
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["bytes"], m["backend"], m["upstream"]) == \
            ("GET /wait HTTP/1.1", "499", "0", f"{HOST}:{be.port}", "-")

    PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100

    def test_client_resets_mid_response(self, make_backend, make_lb, log_path):
        be = make_backend(handler=lambda be, req: Reply(self.PARTIAL))   # then silent
        lb = make_lb([be], access_log=str(log_path))
        s = raw_connect(lb.port)
        s.sendall(b"GET /part HTTP/1.1\r\nHost: x\r\n\r\n")
        got = recv_head_and(s, 100)
        rst_close(s)
        (m,) = combined(log_path)
        # the status of the response it got part of, and the bytes sent so far
        assert (m["status"], m["bytes"]) == ("200", str(len(got)))
        assert m["upstream"] != "-"

    def test_backend_closes_mid_response(self, make_backend, make_lb, log_path):
        be = make_backend(handler=lambda be, req: Reply(self.PARTIAL, close=True))
        lb = make_lb([be], access_log=str(log_path))
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            got, closed = recv_until_close(s, 5)
        assert closed and len(got) > 100
        (m,) = combined(log_path)
        assert (m["status"], m["bytes"]) == ("200", str(len(got)))

    def test_backend_silent_mid_response(self, make_backend, make_lb, log_path):
        be = make_backend(handler=lambda be, req: Reply(self.PARTIAL))
        lb = make_lb([be], access_log=str(log_path), response_timeout=0.5)
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
            got, closed = recv_until_close(s, 5)
        assert closed and len(got) > 100
        (m,) = combined(log_path)
        assert (m["status"], m["bytes"]) == ("200", str(len(got)))

    def test_client_stops_reading(self, make_backend, make_lb, log_path):
        size = 32 << 20
        body = b"z" * size
        be = make_backend(handler=lambda be, req: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                          % size + body)
        lb = make_lb([be], access_log=str(log_path), response_timeout=0.5)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((HOST, lb.port))
        try:
            s.sendall(b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
            (m,) = combined(log_path, timeout=10)
        finally:
            s.close()
        # dropped mid-response: its status, and what was written to the client so far
        assert m["status"] == "200"
        assert 0 < int(m["bytes"]) < size

    def test_client_stops_sending_its_body_mid_response(self, make_backend, make_lb, log_path):
        early = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + b"e" * 10

        def on_head(conn, req):
            conn.transport.write(early)     # answers before the body has come

        be = make_backend(handler=lambda be, req: HANG, on_head=on_head)
        lb = make_lb([be], access_log=str(log_path), response_timeout=0.5, body_timeout=0.5)
        with raw_connect(lb.port) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
            got, closed = recv_until_close(s, 5)
        assert closed and got.endswith(b"e" * 10)
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["bytes"]) == ("POST /up HTTP/1.1", "200",
                                                           str(len(got)))

    @pytest.mark.parametrize("raw,line,to_backend", [
        (b"GET /half HTTP/1.1\r\nHost: x\r\n", "GET /half HTTP/1.1", False),
        (b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
         "POST /body HTTP/1.1", True),
    ], ids=["in-head", "in-body"])
    def test_client_ends_mid_request_499(self, make_backend, make_lb, log_path, raw, line,
                                         to_backend):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path))
        out, closed = exchange(lb.port, raw, shut=True)
        assert closed and out == b""
        (m,) = combined(log_path)
        assert (m["request"], m["status"], m["bytes"]) == (line, "499", "0")
        assert m["backend"] == (f"{HOST}:{be.port}" if to_backend else "-")

    def test_pipelined_then_cut_short(self, make_backend, make_lb, log_path):
        be = make_backend()
        lb = make_lb([be], access_log=str(log_path))
        out, closed = exchange(lb.port, b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /p2 HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /p3 HTTP/1.1\r\nHo", shut=True)
        assert closed and out.count(b"HTTP/1.1 200 ") == 2
        got = combined(log_path, 3)
        assert [(m["request"], m["status"]) for m in got] == [
            ("GET /p1 HTTP/1.1", "200"), ("GET /p2 HTTP/1.1", "200"), ("GET /p3 HTTP/1.1", "499")]

    def test_stopped_with_a_request_in_flight(self, make_backend, log_path):
        be = make_backend(handler=lambda be, req: HANG)
        lb = Balancer([be.addr], access_log=str(log_path))
        try:
            s = raw_connect(lb.port)
            s.sendall(b"GET /inflight HTTP/1.1\r\nHost: x\r\n\r\n")
            assert wait_for(lambda: len(be.requests) == 1, 5)
        finally:
            lb.stop()
        s.close()
        (m,) = combined(log_path, settle=0.1)
        assert (m["request"], m["status"]) == ("GET /inflight HTTP/1.1", "499")


# ---------------------------------------------------------------- end to end: JSON, and the CLI

@pytest.mark.usefixtures("active_core")
def test_json_lines_end_to_end(make_backend, make_lb, log_path):
    be = make_backend()
    lb = make_lb([be], access_log=str(log_path), access_log_format="json")
    with httpx.Client(timeout=10) as c:
        assert c.get(lb.url + "/j?x=1", headers={"X-Request-Id": 'id"1'}).status_code == 200
    out, _ = exchange(lb.port, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    lines = access_log_lines(log_path, 2)
    assert len(lines) == 2, lines
    docs = [json.loads(ln) for ln in lines]
    for d in docs:
        assert list(d) == ACCESS_LOG_JSON_KEYS
        assert d["client"] == "127.0.0.1"
        assert isinstance(d["total_ms"], float) and d["total_ms"] >= 0
        assert time.strptime(d["time"][:19], "%Y-%m-%dT%H:%M:%S")
    ok, bad = docs
    assert (ok["method"], ok["target"], ok["version"], ok["status"]) == \
        ("GET", "/j?x=1", "HTTP/1.1", 200)
    assert ok["request_id"] == "id\\x221"
    assert ok["backend"] == f"{HOST}:{be.port}"
    assert isinstance(ok["upstream_ms"], float) and ok["upstream_ms"] <= ok["total_ms"]
    assert ok["bytes_sent"] > 0
    assert (bad["target"], bad["status"], bad["backend"], bad["upstream_ms"],
            bad["request_id"], bad["bytes_sent"]) == ("/caf\\xC3\\xA9", 400, None, None, None,
                                                      len(out))


@pytest.mark.usefixtures("active_core")
@pytest.mark.timeout(60)
def test_serve_json_log_drain_cuts_a_request(make_backend, tmp_path):
    """``fastlb serve --access-log PATH --access-log-format json``: a request still in
    flight when the drain runs out gets its line (499), and the others theirs."""
    path = tmp_path / "access.log"
    be = make_backend(handler=lambda be, req: HANG if req.target == "/hang" else
                      b"HTTP/1.1 204 No Content\r\n\r\n")
    lb = FastlbProcess([be.addr], "--access-log", str(path), "--access-log-format", "json",
                       "--drain-timeout", "0.5")
    try:
        with httpx.Client(timeout=10) as c:
            assert c.get(lb.url + "/fine").status_code == 204
        s = raw_connect(lb.port)
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: len(be.requests) == 2, 5)
        lb.proc.send_signal(signal.SIGTERM)
        assert lb.proc.wait(10) == 0
        s.close()
    finally:
        lb.kill()
    docs = [json.loads(ln) for ln in path.read_text("ascii").splitlines()]
    assert [(d["target"], d["status"]) for d in docs] == [("/fine", 204), ("/hang", 499)]
    assert all(list(d) == ACCESS_LOG_JSON_KEYS for d in docs)
    assert docs[1]["bytes_sent"] == 0 and docs[1]["upstream_ms"] is None


def test_access_log_format_flag_rejects_others(tmp_path):
    from helpers import run_fastlb
    p = run_fastlb("serve", "--backend", "http://127.0.0.1:1", "--access-log-format", "apache")
    assert p.returncode == 2
    assert "access-log-format" in p.stderr
