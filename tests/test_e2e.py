"""End to end through fastlb with real sockets, real clients and real backends."""
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    ACCESS_LOG_COMBINED,
    HANG,
    HOST,
    FastlbProcess,
    Reader,
    Reply,
    UvicornBackend,
    access_log_lines,
    active_core,
    backend_loop,
    echo_response,
    exchange,
    free_dead_port,
    make_backend,
    make_lb,
    raw_connect,
    recv_until_close,
    send_raw,
    wait_for,
)

pytestmark = [pytest.mark.usefixtures("active_core"), pytest.mark.timeout(60)]

HOP = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
       "transfer-encoding"]


def client(**kw):
    kw.setdefault("timeout", 10)
    return httpx.Client(**kw)


def hdrs(doc):
    return [(n.lower(), v) for n, v in doc["headers"]]


def hget(doc, name):
    vals = [v for n, v in doc["headers"] if n.lower() == name]
    return ", ".join(vals) if vals else None


# ---------------------------------------------------------------- basics

def test_get_and_post_asyncio_backend(make_backend, make_lb):
    be = make_backend("A")
    lb = make_lb([be])
    with client() as c:
        r = c.get(lb.url + "/hello?x=1")
        assert r.status_code == 200
        doc = r.json()
        assert doc["method"] == "GET" and doc["target"] == "/hello?x=1"
        assert doc["version"] == "HTTP/1.1"
        r = c.post(lb.url + "/submit", content=b"payload-123")
        assert r.status_code == 200
        doc = r.json()
        assert doc["method"] == "POST" and doc["body"] == "payload-123"
        assert hget(doc, "content-length") == "11"
    assert len(be.requests) == 2


def test_get_and_post_uvicorn_backend(make_lb):
    uv = UvicornBackend()
    try:
        lb = make_lb([uv])
        with client() as c:
            r = c.get(lb.url + "/path/a?q=2")
            assert r.status_code == 200
            doc = r.json()
            assert doc["backend"] == "uvicorn" and doc["path"] == "/path/a" and doc["query"] == "q=2"
            body = os.urandom(200_000)
            r = c.post(lb.url + "/up", content=body)
            assert r.status_code == 200
            assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
            # chunked upload to uvicorn (generator -> Transfer-Encoding: chunked)
            r = c.post(lb.url + "/up2", content=iter([b"ab", b"cd" * 1000, b"e"]))
            assert r.status_code == 200
            assert r.json()["body_len"] == 2003
    finally:
        uv.stop()


def test_round_robin_three_backends(make_backend, make_lb):
    bes = [make_backend(n) for n in "ABC"]
    lb = make_lb(bes)
    with client() as c:
        seen = [c.get(lb.url + f"/{i}").headers["x-backend"] for i in range(9)]
    assert seen == list("ABCABCABC")


def test_request_headers_seen_by_backend(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with client() as c:
        r = c.get(lb.url + "/h", headers={
            "Host": "example.test:8080",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "drop me",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-T",
            "Upgrade": "foo/1",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "spoofed.example",
            "X-Custom": "kept",
        })
    assert r.status_code == 200
    doc = r.json()
    names = [n for n, _ in hdrs(doc)]
    for h in HOP + ["x-secret"]:
        assert h not in names, (h, doc["headers"])
    assert hget(doc, "host") == "example.test:8080"
    assert hget(doc, "x-custom") == "kept"
    # the client is no trusted proxy: its X-Forwarded-* are replaced, not extended
    assert hget(doc, "x-forwarded-for") == "127.0.0.1"
    assert names.count("x-forwarded-proto") == 1 and hget(doc, "x-forwarded-proto") == "http"
    assert names.count("x-forwarded-host") == 1
    assert hget(doc, "x-forwarded-host") == "example.test:8080"
    assert hget(doc, "via") == "1.1 fastlb"


def test_response_hop_by_hop_removed(make_backend, make_lb):
    def handler(be, req):
        body = b"ok"
        return (b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
                b"Keep-Alive: timeout=3\r\nProxy-Connection: keep-alive\r\nUpgrade: foo\r\n"
                b"Trailer: X-T\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\n" + body)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = Reader(s).read_response()
    assert r.status == 200 and r.body == b"ok"
    names = [n.lower() for n, _ in r.headers]
    for h in ["x-internal", "keep-alive", "proxy-connection", "upgrade", "trailer"]:
        assert h not in names, r.headers
    assert r.get("x-kept") == "yes"


# ---------------------------------------------------------------- connections

def test_client_keepalive_and_upstream_pooling(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        for i in range(30):
            s.sendall(f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            r = rd.read_response()
            assert r.status == 200 and r.json()["target"] == f"/{i}"
    assert len(be.requests) == 30
    assert be.connections == 1, be.connections


def test_httpx_keepalive_one_connection(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with client() as c:
        for i in range(20):
            assert c.get(lb.url + f"/{i}").status_code == 200
    # one client connection => one client peer port seen by the proxy... and the
    # backend saw one pooled connection for 20 sequential requests
    assert be.connections == 1


def test_http10_client_without_keepalive(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert closed
    assert data.startswith(b"HTTP/1.1 200 ") or data.startswith(b"HTTP/1.0 200 ")
    req = be.requests[-1]
    assert req.version == "HTTP/1.1"
    assert req.get("host") == f"{HOST}:{be.port}"  # Host added upstream
    assert req.get("via") == "1.0 fastlb"


def test_http10_client_keepalive(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        for i in range(3):
            s.sendall(f"GET /k{i} HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n".encode())
            r = rd.read_response()
            assert r.status == 200
            assert (r.get("connection") or "").lower() == "keep-alive"
        s.sendall(b"GET /last HTTP/1.0\r\nHost: h\r\n\r\n")
        r = rd.read_response()
        assert r.status == 200
        assert rd.at_eof()
    assert [q.target for q in be.requests] == ["/k0", "/k1", "/k2", "/last"]
    assert be.requests[0].get("host") == "h"


def test_http10_client_chunked_response_is_dechunked(make_backend, make_lb):
    def handler(be, req):
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    be = make_backend(handler=handler)
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()
    assert body == b"hello world"


# ---------------------------------------------------------------- bodiless responses

def test_head_204_304_without_bodies(make_backend, make_lb):
    def handler(be, req):
        if req.target == "/204":
            return b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"
        if req.target == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 10\r\n\r\n"
        if req.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        return echo_response(be, req)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        r = rd.read_response(method="HEAD")
        assert r.status == 200 and r.get("content-length") == "1234"
        s.sendall(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n")
        r = rd.read_response()
        assert r.status == 204
        s.sendall(b"GET /304 HTTP/1.1\r\nHost: x\r\n\r\n")
        r = rd.read_response()
        assert r.status == 304
        # nothing stray after the bodiless responses: the next response is intact
        s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        r = rd.read_response()
        assert r.status == 200 and r.json()["target"] == "/after"
        assert not rd.buf
    assert be.connections == 1


# ---------------------------------------------------------------- 1xx, Expect

def test_1xx_forwarded(make_backend, make_lb):
    def handler(be, req):
        return [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
                echo_response(be, req)]

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        s.sendall(b"GET /eh HTTP/1.1\r\nHost: x\r\n\r\n")
        r1 = rd.read_response()
        assert r1.status == 103 and r1.get("link") == "</s.css>; rel=preload"
        r2 = rd.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/eh"
        # still usable
        s.sendall(b"GET /eh2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert rd.read_response().status == 103
        assert rd.read_response().status == 200


def test_1xx_not_sent_to_http10_client(make_backend, make_lb):
    """RFC 9110 15.2: a server MUST NOT send a 1xx response to an HTTP/1.0 client."""
    def handler(be, req):
        return [b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n", echo_response(be, req)]

    be = make_backend(handler=handler)
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET /eh HTTP/1.0\r\n\r\n")
    assert closed
    assert data.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", data[:200]


def test_expect_100_continue_upload(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    body = b"x" * 5000
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        s.sendall(b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5000\r\n\r\n")
        r = rd.read_response(timeout=5)
        assert r.status == 100
        s.sendall(body)
        r = rd.read_response()
        assert r.status == 200
        doc = r.json()
        assert doc["body_len"] == 5000
        assert hget(doc, "expect") == "100-continue"


# ---------------------------------------------------------------- chunked / close-delimited

def test_chunked_request_body(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    parts = [b"a" * 10, b"b" * 70000, b"c"]
    with client() as c:
        r = c.post(lb.url + "/chunky", content=iter(parts))
    assert r.status_code == 200
    doc = r.json()
    assert doc["body_len"] == 70011
    assert doc["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    assert hget(doc, "transfer-encoding") == "chunked"
    assert hget(doc, "content-length") is None


def test_chunked_request_with_trailers_raw(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        s.sendall(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: v\r\n\r\n")
        r = Reader(s).read_response()
    assert r.status == 200
    assert r.json()["body"] == "abcde"


def test_chunked_response(make_backend, make_lb):
    chunks = [os.urandom(n) for n in (1, 100, 65536, 3)]

    def handler(be, req):
        out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        for ch in chunks:
            out.append(b"%x\r\n" % len(ch) + ch + b"\r\n")
        out.append(b"0\r\n\r\n")
        return out

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with client() as c:
        for _ in range(2):
            r = c.get(lb.url + "/c")
            assert r.status_code == 200
            assert r.headers.get("transfer-encoding") == "chunked"
            assert r.content == b"".join(chunks)
    assert be.connections == 1


def test_close_delimited_response(make_backend, make_lb):
    payload = os.urandom(300_000)

    def handler(be, req):
        return Reply([b"HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n", payload], close=True)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with client() as c:
        r = c.get(lb.url + "/close")
        assert r.status_code == 200 and r.content == payload
        r = c.get(lb.url + "/close")
        assert r.status_code == 200 and r.content == payload
    data, closed = exchange(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert body == payload


# ---------------------------------------------------------------- big transfers, memory

def _vm(proc, key):
    return proc.status(key)


@pytest.mark.timeout(90)
def test_large_upload_and_download_bounded_memory(make_backend):
    total = 64 << 20
    block = os.urandom(1 << 16)
    nblocks = total // len(block)
    expect = hashlib.sha256()
    for _ in range(nblocks):
        expect.update(block)

    def handler(be, req):
        if req.target == "/down":
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total
            # a generator-like list would hold 64 MiB in the backend; write in pieces
            return [head] + [block] * nblocks
        return echo_response(be, req)

    be = make_backend(handler=handler)
    lb = FastlbProcess([be.addr])
    try:
        with client(timeout=60) as c:
            assert c.get(lb.url + "/warm").status_code == 200
            base = _vm(lb, "VmRSS")
            r = c.post(lb.url + "/up", content=(block for _ in range(nblocks)))
            assert r.status_code == 200
            doc = r.json()
            assert doc["body_len"] == total
            assert doc["sha256"] == expect.hexdigest()
            got = hashlib.sha256()
            n = 0
            with c.stream("GET", lb.url + "/down") as r:
                assert r.status_code == 200
                for piece in r.iter_raw(1 << 16):
                    got.update(piece)
                    n += len(piece)
            assert n == total
            assert got.hexdigest() == expect.hexdigest()
            hwm = _vm(lb, "VmHWM")
        grew = hwm - base
        print(f"proxy RSS before {base >> 20} MiB, peak {hwm >> 20} MiB")
        assert grew < 24 << 20, f"proxy peak RSS grew {grew >> 20} MiB for a 64 MiB transfer"
    finally:
        assert lb.terminate() == 0


# ---------------------------------------------------------------- pipelining

def test_pipelining_three_in_one_send(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
        rd = Reader(s)
        docs = [rd.read_response().json() for _ in range(3)]
    assert [d["target"] for d in docs] == ["/1", "/2", "/3"]
    assert docs[1]["body"] == "hello"
    assert [q.target for q in be.requests] == ["/1", "/2", "/3"]


def test_pipelining_with_close_last(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                            b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                            b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert [q.target for q in be.requests] == ["/1", "/2"]


# ---------------------------------------------------------------- upstream failures

def test_stale_keepalive_backend_closed_idle_connection(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    with client() as c:
        assert c.get(lb.url + "/1").status_code == 200
        be.close_idle_connections()
        time.sleep(0.05)
        r = c.get(lb.url + "/2")
        assert r.status_code == 200 and r.json()["target"] == "/2"


def test_stale_keepalive_race_retried_for_get(make_backend, make_lb):
    """The backend closes a pooled connection just as the proxy reuses it:
    the second request on each backend connection is answered by a close."""
    def handler(be, req):
        if req.index_on_conn >= 1:
            return Reply(None, close=True)
        return echo_response(be, req)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with client() as c:
        for i in range(4):
            r = c.get(lb.url + f"/{i}")
            assert r.status_code == 200, (i, r.text)
            assert r.json()["target"] == f"/{i}"


def test_stale_keepalive_race_not_retried_for_post(make_backend, make_lb):
    def handler(be, req):
        if req.index_on_conn >= 1:
            return Reply(None, close=True)
        return echo_response(be, req)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    with client() as c:
        assert c.get(lb.url + "/a").status_code == 200
        r = c.post(lb.url + "/b", content=b"once")
        assert r.status_code == 502
    assert sum(1 for q in be.requests if q.method == "POST") == 1


def test_backend_closes_after_n_requests(make_backend, make_lb):
    be = make_backend(max_requests=2)
    lb = make_lb([be])
    with client() as c:
        for i in range(10):
            r = c.get(lb.url + f"/{i}")
            assert r.status_code == 200, r.text
    assert be.connections >= 5


def test_connect_failure_next_backend_serves(make_backend, make_lb):
    good = make_backend("G")
    dead = (HOST, free_dead_port())
    lb = make_lb([dead, good.addr])
    with client() as c:
        for i in range(6):
            r = c.get(lb.url + f"/{i}")
            assert r.status_code == 200
            assert r.headers["x-backend"] == "G"
    assert len(good.requests) == 6


def test_all_backends_down_502(make_lb):
    lb = make_lb([(HOST, free_dead_port()), (HOST, free_dead_port())])
    with client() as c:
        r = c.get(lb.url + "/")
        assert r.status_code == 502
        assert len(r.content) < 100
        # the client connection is still usable after a 502
        r = c.get(lb.url + "/again")
        assert r.status_code == 502


def test_response_timeout_504(make_backend, make_lb):
    be = make_backend(handler=lambda be, req: HANG)
    lb = make_lb([be], response_timeout=0.5)
    t0 = time.monotonic()
    with client() as c:
        r = c.get(lb.url + "/slow")
    took = time.monotonic() - t0
    assert r.status_code == 504
    assert 0.4 <= took < 3, took


def test_response_timeout_resets_on_progress(make_backend, make_lb, backend_loop):
    """A slow but steady backend is not cut off: the timeout is for silence."""
    def on_head(conn, req):
        loop = backend_loop.loop
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        for i in range(4):
            loop.call_later(0.25 * (i + 1), conn.transport.write, b"x")

    be = make_backend(handler=lambda be, req: HANG, on_head=on_head)
    lb = make_lb([be], response_timeout=0.6)
    with client() as c:
        r = c.get(lb.url + "/drip")
    assert r.status_code == 200 and r.content == b"xxxx"


@pytest.mark.parametrize("resp", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["garbage", "conflicting-cl", "cl-and-te", "bad-status", "bad-header", "bad-chunk"])
def test_invalid_upstream_response_502(make_backend, make_lb, resp):
    be = make_backend(handler=lambda be, req: resp)
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 502 "), data
    assert closed


def test_backend_garbage_then_proxy_still_serves(make_backend, make_lb):
    bad = make_backend("B", handler=lambda be, req: b"not http at all\r\n\r\n")
    lb = make_lb([bad])
    with client() as c:
        assert c.get(lb.url + "/").status_code == 502
        assert c.get(lb.url + "/").status_code == 502
    good = make_backend("G")
    lb2 = make_lb([good])
    with client() as c:
        assert c.get(lb2.url + "/").status_code == 200


# ---------------------------------------------------------------- client timeouts

def test_client_header_timeout_slowloris(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be], header_timeout=0.5)
    with raw_connect(lb.port) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data, closed = recv_until_close(s, timeout=5)
        took = time.monotonic() - t0
    assert closed
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took < 2.5, took
    assert not be.received


def test_client_header_timeout_drip_not_extended(make_backend, make_lb):
    """Dripping one byte at a time does not extend the header deadline."""
    be = make_backend()
    lb = make_lb([be], header_timeout=0.6)
    with raw_connect(lb.port) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        closed_at = None
        for i in range(40):
            try:
                s.sendall(b"X")
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.1)
            s.setblocking(False)
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                chunk = None
            finally:
                s.setblocking(True)
            if chunk is not None:
                closed_at = time.monotonic()
                break
    assert closed_at is not None and closed_at - t0 < 2.5
    assert not be.received


def test_idle_keepalive_timeout(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be], keepalive_timeout=0.5)
    with raw_connect(lb.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        rd = Reader(s)
        assert rd.read_response().status == 200
        t0 = time.monotonic()
        data, closed = recv_until_close(s, timeout=5)
        took = time.monotonic() - t0
    assert closed and data == b""
    assert 0.3 <= took < 2.5, took


def test_idle_connection_never_sending_closed(make_lb, make_backend):
    be = make_backend()
    lb = make_lb([be], header_timeout=0.5)
    with raw_connect(lb.port) as s:
        data, closed = recv_until_close(s, timeout=4)
    assert closed


# ---------------------------------------------------------------- access log

def test_access_log_file(make_backend, make_lb, tmp_path):
    path = tmp_path / "access.log"
    be = make_backend()
    lb = make_lb([be], access_log=str(path))
    with client() as c:
        assert c.get(lb.url + "/logged?a=b").status_code == 200
        assert c.post(lb.url + "/posted", content=b"12345").status_code == 200
    lines = access_log_lines(path, 2)
    assert len(lines) == 2, lines
    m = ACCESS_LOG_COMBINED.match(lines[0])
    assert m, lines[0]
    assert m["client"] == "127.0.0.1"
    assert m["request"] == "GET /logged?a=b HTTP/1.1"
    assert m["status"] == "200"
    assert int(m["bytes"]) > 0
    assert m["ua"].startswith("python-httpx/")
    assert m["backend"] == f"{HOST}:{be.port}"
    assert m["upstream"] != "-"
    m2 = ACCESS_LOG_COMBINED.match(lines[1])
    assert m2 and m2["request"] == "POST /posted HTTP/1.1"


def test_access_log_502_counts_bytes_sent(make_lb, tmp_path):
    path = tmp_path / "access.log"
    lb = make_lb([(HOST, free_dead_port())], access_log=str(path))
    with client() as c:
        r = c.get(lb.url + "/down")
        assert r.status_code == 502
    assert wait_for(lambda: path.exists() and "/down" in path.read_text(), 3)
    text = path.read_text()
    m = re.search(r'"GET /down HTTP/1.1" 502 (\d+) ', text)
    assert m, text
    # the bytes field counts what the client got: the 502 response is not empty
    assert int(m.group(1)) > 0, text


@pytest.mark.parametrize("raw,status", [
    (b"GET /nohost HTTP/1.1\r\n\r\n", 400),
    (b"GET /cl HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
], ids=["missing-host", "bad-cl", "unknown-te"])
def test_access_log_rejected_requests_logged(make_backend, make_lb, tmp_path, raw, status):
    """Requests fastlb refuses itself are logged too (nginx and HAProxy log them)."""
    path = tmp_path / "access.log"
    be = make_backend()
    lb = make_lb([be], access_log=str(path))
    out, _ = exchange(lb.port, raw)
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    with client() as c:
        assert c.get(lb.url + "/marker").status_code == 200
    assert wait_for(lambda: path.exists() and "/marker" in path.read_text(), 3)
    text = path.read_text()
    line = raw.split(b"\r\n")[0].decode()
    assert f'"{line}" {status} ' in text, text


def test_access_log_stdout_subprocess(make_backend):
    be = make_backend()
    with tempfile.TemporaryFile() as out:
        lb = FastlbProcess([be.addr], "--access-log", "-", stdout=out)
        try:
            with client() as c:
                assert c.get(lb.url + "/stdout-log").status_code == 200
        finally:
            assert lb.terminate() == 0
        out.seek(0)
        text = out.read().decode()
    assert '"GET /stdout-log HTTP/1.1" 200 ' in text
    assert f" {HOST}:{be.port} " in text


# ---------------------------------------------------------------- an upgrade the backend refuses

def test_request_after_upgrade_request_on_same_connection(make_backend, make_lb):
    """The Upgrade goes to the backend (with Connection: upgrade); a backend that
    answers 200 instead of 101 refused it, and the connection must go on working
    as HTTP for later requests, including ones with a body."""
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        r = rd.read_response()
        assert r.status == 200
        assert [(n, v) for n, v in hdrs(r.json()) if n in ("upgrade", "connection")] == [
            ("upgrade", "websocket"), ("connection", "upgrade")]
        s.sendall(b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        r = rd.read_response(timeout=3)
        assert r.status == 200 and r.json()["body"] == "abc"


def test_invalid_request_after_upgrade_request_still_rejected(make_backend, make_lb):
    """The strict parser must keep validating requests after an Upgrade request."""
    be = make_backend()
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        rd = Reader(s)
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert rd.read_response().status == 200
        n = len(be.received)
        # a CONNECT after it must still be refused with 405, not forwarded
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        data, closed = recv_until_close(s, timeout=3)
    assert closed
    assert data.startswith(b"HTTP/1.1 405 ") or data.startswith(b"HTTP/1.1 400 "), data
    assert len(be.received) == n


# ---------------------------------------------------------------- more edges

def _blackhole():
    """A listening socket whose accept queue is full: connects to it hang (SYN dropped)."""
    bh = socket.socket()
    bh.bind((HOST, 0))
    bh.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(bh.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.1)
    return bh, fillers


def test_stale_connect_attempt_after_504_does_not_answer_again(make_lb):
    """The backend does not accept; the response timeout (504) fires before the
    connect timeout. When the abandoned connect attempt later fails, the client
    must not get a second, unsolicited response on its idle keep-alive connection."""
    bh, fillers = _blackhole()
    try:
        lb = make_lb([bh.getsockname()], response_timeout=0.4, connect_timeout=1.0)
        with raw_connect(lb.port) as s:
            rd = Reader(s)
            s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert rd.read_response().status == 504
            # past the connect timeout: nothing more may arrive
            extra, closed = recv_until_close(s, timeout=1.4)
            assert extra == b"", extra
    finally:
        for c in fillers:
            c.close()
        bh.close()


def test_stale_connect_attempt_after_504_not_retried_elsewhere(make_backend, make_lb):
    """The abandoned connect attempt of an answered request must not go on to
    another backend (it would open a connection for nothing and crash on it)."""
    bh, fillers = _blackhole()
    good = make_backend("G")
    try:
        lb = make_lb([bh.getsockname(), good.addr], response_timeout=0.4, connect_timeout=1.0)
        with raw_connect(lb.port) as s:
            rd = Reader(s)
            s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert rd.read_response().status == 504
            time.sleep(1.4)
            assert good.connections == 0, "a connection was opened for an answered request"
            s.sendall(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
            r = rd.read_response()
            # round robin: /2 goes to the good backend
            assert r.status == 200 and r.json()["target"] == "/2"
    finally:
        for c in fillers:
            c.close()
        bh.close()


def test_client_body_stall_408(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be], response_timeout=0.5)
    with raw_connect(lb.port) as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        data, closed = recv_until_close(s, timeout=4)
    assert closed
    assert data.startswith(b"HTTP/1.1 408 "), data


def test_early_response_before_body_complete(make_backend, make_lb):
    """The backend answers (413) before the request body is all sent: the client
    gets that response intact, marked Connection: close, and the connection closes."""
    def on_head(conn, req):
        conn.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n"
                             b"Connection: close\r\n\r\nbig")

    be = make_backend(on_head=on_head, handler=lambda be, req: HANG)
    lb = make_lb([be])
    with raw_connect(lb.port) as s:
        s.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                  + b"x" * 1000)
        data, closed = recv_until_close(s, timeout=4)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and body == b"big"
    assert b"connection: close" in head.lower(), head


def test_pipelining_burst_in_order(make_backend, make_lb):
    """Far more pipelined requests than fit the proxy's pipeline buffer."""
    import threading

    be = make_backend()
    lb = make_lb([be])
    n = 1500
    reqs = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (i, b"p" * 40)
                    for i in range(n))
    assert len(reqs) > 65536
    with raw_connect(lb.port, timeout=20) as s:
        t = threading.Thread(target=s.sendall, args=(reqs,), daemon=True)
        t.start()
        rd = Reader(s, timeout=20)
        for i in range(n):
            r = rd.read_response()
            assert r.status == 200
            assert r.json()["target"] == f"/{i}"
        t.join(5)
    assert len(be.requests) == n


def test_half_close_after_request(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    data, closed = exchange(lb.port, b"GET /hc HTTP/1.1\r\nHost: x\r\n\r\n", shut=True)
    assert closed
    assert data.startswith(b"HTTP/1.1 200 ") and b'"/hc"' in data


def test_client_abort_mid_download_then_serving(make_backend, make_lb):
    big = os.urandom(4 << 20)

    def handler(be, req):
        if req.target == "/big":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big), big]
        return echo_response(be, req)

    be = make_backend(handler=handler)
    lb = make_lb([be])
    for _ in range(3):
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(1000)
        # closed with most of the body unread
    with client() as c:
        for i in range(5):
            r = c.get(lb.url + f"/ok{i}")
            assert r.status_code == 200 and r.json()["target"] == f"/ok{i}"
    assert wait_for(lambda: len(lb.proxy.clients) == 0, 3)
