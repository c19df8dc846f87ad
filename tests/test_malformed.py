"""Malformed requests over raw sockets: the right status, the connection closed,
nothing forwarded to the backend, and the proxy still serving other clients.
Valid requests give the same response however their bytes are split."""
import json

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    Reader,
    active_core,
    backend_loop,
    exchange,
    make_backend,
    make_lb,
    parse_one,
    raw_connect,
    recv_until_close,
    send_raw,
)

pytestmark = [pytest.mark.usefixtures("active_core"), pytest.mark.timeout(30)]

H = b"Host: example.test\r\n"

# (id, bytes, expected status, head_error): head_error means the error is in
# the head, so nothing may reach the backend however the bytes are split.
MALFORMED = [
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, True),
    ("te-and-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400, True),
    ("dup-cl-same", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Content-Length: 5\r\n\r\nhello", 400, True),
    ("dup-cl-diff", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Content-Length: 6\r\n\r\nhello!", 400, True),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400, True),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400, True),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400, True),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello", 400, True),
    ("cl-junk", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5x\r\n\r\nhello", 400, True),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400, True),
    ("cl-huge", b"POST / HTTP/1.1\r\n" + H
     + b"Content-Length: 99999999999999999999999\r\n\r\n", 400, True),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n", 400, True),
    ("obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n\r\n", 400, True),
    ("bare-lf-all", b"GET / HTTP/1.1\nHost: example.test\n\n", 400, True),
    ("bare-lf-header", b"GET / HTTP/1.1\r\nHost: example.test\nX-A: b\r\n\r\n", 400, True),
    ("bare-lf-reqline", b"GET / HTTP/1.1\n" + H + b"\r\n", 400, True),
    ("bare-cr-header", b"GET / HTTP/1.1\r\nHost: example.test\rX-A: b\r\n\r\n", 400, True),
    ("bare-cr-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400, True),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : example.test\r\n\r\n", 400, True),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400, True),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", 400, True),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", 400, True),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400, True),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400, True),
    ("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400, True),
    ("missing-host", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, True),
    ("dup-host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400, True),
    ("dup-host-differing", b"GET / HTTP/1.1\r\n" + H + b"Host: other.test\r\n\r\n", 400, True),
    # RFC 9112 3.2: an invalid Host value gets 400 (RFC 9110 7.2: uri-host [":" port])
    ("host-path-chars", b"GET / HTTP/1.1\r\nHost: a b/../<x>\r\n\r\n", 400, True),
    ("host-bracket-open", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, True),
    ("host-port-range", b"GET / HTTP/1.1\r\nHost: x:99999\r\n\r\n", 400, True),
    ("host-port-65536", b"GET / HTTP/1.1\r\nHost: x:65536\r\n\r\n", 400, True),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400, True),
    ("host-list", b"GET / HTTP/1.1\r\nHost: x,y\r\n\r\n", 400, True),
    ("host-quoted", b'GET / HTTP/1.1\r\nHost: "quoted"\r\n\r\n', 400, True),
    ("host-tab-inside", b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n", 400, True),
    ("host-port-only", b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n", 400, True),
    ("host-http10", b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n", 400, True),
    ("host-invalid-absolute", b"GET http://ok.test/ HTTP/1.1\r\nHost: x,y\r\n\r\n", 400, True),
    ("target-userinfo", b"GET http://user@example.test/ HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("target-empty-authority", b"GET http:///x HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("target-bad-port", b"GET http://example.test:99999/ HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("target-scheme", b"GET ftp://example.test/ HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("te-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400, True),
    ("te-unknown-then-chunked", b"POST / HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: x-custom, chunked\r\n\r\n0\r\n\r\n", 501, True),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, True),
    # RFC 9112 6.3: chunked not the final coding of a request -> 400
    ("te-chunked-not-final", b"POST / HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400, True),
    ("te-dup", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, True),
    ("invalid-method", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("method-double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("target-space", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("target-ctl", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400, True),
    ("version-garbage", b"GET / HTX/1.1\r\n" + H + b"\r\n", 400, True),
    ("version-lower", b"GET / http/1.1\r\n" + H + b"\r\n", 400, True),
    ("version-missing", b"GET /\r\n" + H + b"\r\n", 400, True),
    ("version-1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400, True),
    ("connect", b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
     405, True),
    ("chunk-size-bad", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nhello\r\n0\r\n\r\n", 400, False),
    ("chunk-size-short", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3\r\nhello\r\n0\r\n\r\n", 400, False),
    ("chunk-missing-crlf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhelloXX0\r\n\r\n", 400, False),
    ("chunk-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5\nhello\n0\n\n", 400, False),
    ("chunk-size-space", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5 \r\nhello\r\n0\r\n\r\n", 400, False),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", 400, False),
    ("chunk-size-field-too-long", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     + b"0" * 70 + b"5\r\nhello\r\n0\r\n\r\n", 400, False),
]

OVERSIZE_LIMIT = 4096


@pytest.fixture
def setup(make_backend, make_lb):
    be = make_backend("A")
    lb = make_lb([be], max_header_size=OVERSIZE_LIMIT, header_timeout=3)
    return be, lb


def _status(data):
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12])


def _still_serving(lb, be):
    with httpx.Client(timeout=5) as c:
        r = c.get(lb.url + "/after")
    assert r.status_code == 200
    assert be.requests and be.requests[-1].target == "/after"


@pytest.mark.parametrize("mode", ["whole", "bytes"])
@pytest.mark.parametrize("name,data,status,head_error", MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed(setup, name, data, status, head_error, mode):
    be, lb = setup
    with raw_connect(lb.port) as s:
        send_raw(s, data, None if mode == "whole" else "bytes", delay=0.001)
        out, closed = recv_until_close(s, timeout=4)
    assert _status(out) == status, out[:300]
    assert closed, "the connection must be closed after a malformed request"
    resp = parse_one(out)
    assert (resp.get("connection") or "").lower() == "close"
    assert out.count(b"HTTP/1.1 ") == 1
    if head_error or mode == "whole":
        assert bytes(be.received) == b"", be.received[:300]
        assert be.requests == []
    _still_serving(lb, be)


@pytest.mark.parametrize("complete", [True, False])
def test_oversize_header_431(setup, complete):
    be, lb = setup
    big = b"X-Big: " + b"a" * (2 * OVERSIZE_LIMIT) + b"\r\n"
    data = b"GET / HTTP/1.1\r\n" + H + big + (b"\r\n" if complete else b"")
    with raw_connect(lb.port) as s:
        send_raw(s, data)
        out, closed = recv_until_close(s, timeout=4)
    assert _status(out) == 431, out[:200]
    assert closed
    assert bytes(be.received) == b""
    _still_serving(lb, be)


def test_oversize_header_431_split(setup):
    be, lb = setup
    data = b"GET / HTTP/1.1\r\n" + H + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60)) + b"\r\n"
    with raw_connect(lb.port) as s:
        send_raw(s, data, split=list(range(100, len(data), 500)))
        out, closed = recv_until_close(s, timeout=4)
    assert _status(out) == 431
    assert closed
    assert bytes(be.received) == b""
    _still_serving(lb, be)


def test_header_just_under_limit_ok(setup):
    be, lb = setup
    pad = OVERSIZE_LIMIT - 200
    data = b"GET /fits HTTP/1.1\r\n" + H + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
    assert len(data) < OVERSIZE_LIMIT
    with raw_connect(lb.port) as s:
        s.sendall(data)
        r = Reader(s).read_response()
    assert r.status == 200


def test_malformed_after_valid_on_same_connection(setup):
    """A bad request after a good one on a keep-alive connection: the good one is
    answered, the bad one gets 400 and the connection closes; the bad one never
    reaches the backend."""
    be, lb = setup
    with raw_connect(lb.port) as s:
        s.sendall(b"GET /good HTTP/1.1\r\n" + H + b"\r\n"
                  b"GET /bad HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n")
        out, closed = recv_until_close(s, timeout=4)
    assert closed
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 400 " in out
    assert [q.target for q in be.requests] == ["/good"]
    assert b"/bad" not in be.received


def test_smuggling_cl_te_not_forwarded(setup):
    """The classic CL.TE smuggle: nothing of it reaches the backend."""
    be, lb = setup
    data = (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 44\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n")
    out, closed = exchange(lb.port, data)
    assert _status(out) == 400 and closed
    assert b"smuggled" not in be.received and not be.requests


# ---------------------------------------------------------------- valid requests, any split

VALID = [
    ("get", b"GET /v?q=1 HTTP/1.1\r\n" + H + b"User-Agent: t\r\nAccept: */*\r\n\r\n"),
    ("post-cl", b"POST /p HTTP/1.1\r\n" + H + b"Content-Type: text/plain\r\n"
     b"Content-Length: 11\r\n\r\nhello world"),
    ("post-chunked", b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5;ext=v\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"),
    ("http10", b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
    ("leading-crlf", b"\r\nGET /lead HTTP/1.1\r\n" + H + b"\r\n"),
    ("tab-ows", b"GET /ows HTTP/1.1\r\n" + H + b"X-A:\t v \t\r\n\r\n"),
    ("absolute-form", b"GET http://internal.test/abs?q=1 HTTP/1.1\r\n" + H + b"\r\n"),
    ("host-ipv6-port", b"GET /v6 HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"),
    ("chunk-leading-zeros", b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"0000000000000000005\r\nhello\r\n000\r\n\r\n"),
]


def _normalized(out):
    resp = parse_one(out)
    doc = json.loads(resp.body)
    for k in ("conn", "n_on_conn"):
        doc.pop(k, None)
    return resp.status, doc


@pytest.mark.parametrize("name,data", VALID, ids=[v[0] for v in VALID])
def test_valid_any_split(setup, name, data):
    be, lb = setup
    results = []
    splits = [None, [1], [len(data) // 2], [data.find(b"\r\n") + 1, data.find(b"\r\n\r\n") + 2,
                                            data.find(b"\r\n\r\n") + 3, len(data) - 1], "bytes"]
    for split in splits:
        with raw_connect(lb.port) as s:
            assert send_raw(s, data, split, delay=0.001) is not False
            rd = Reader(s)
            r = rd.read_response()
            raw = r.raw_head + r.body
        results.append(_normalized(raw))
    assert results[0][0] == 200
    for r in results[1:]:
        assert r == results[0]
    assert len(be.requests) == len(splits)
    first = be.requests[0]
    for q in be.requests[1:]:
        assert q.line == first.line and bytes(q.body) == bytes(first.body)
