"""End to end, over raw sockets against recording backends: the authority a
request is for (absolute-form targets, RFC 9112 3.2.2), validation before
selection, chunk sizes with leading zeros and the Trailer field.

Heads are sent whole, split at awkward places and byte by byte."""
import pytest

from fastlb.selection import ALGORITHMS
from helpers import (  # noqa: F401  (fixtures are used by name)
    Reader,
    active_core,
    backend_loop,
    exchange,
    make_backend,
    make_lb,
    raw_connect,
    recv_until_close,
    send_raw,
)

pytestmark = [pytest.mark.usefixtures("active_core"), pytest.mark.timeout(60)]


def splits(data):
    """Whole, at the first line end, in the middle of the head's last CRLF, and byte by byte."""
    end = data.find(b"\r\n\r\n")
    return [None, [data.find(b"\r\n") + 1], [end + 1, end + 3], "bytes"]


def send_and_read(port, data, split):
    with raw_connect(port) as s:
        assert send_raw(s, data, split, delay=0.001) is not False
        return Reader(s).read_response()


# ---------------------------------------------------------------- absolute form


@pytest.mark.parametrize("split", ["whole", "line", "crlf", "bytes"])
def test_absolute_form_target_wins_over_host(make_backend, make_lb, split):
    """RFC 9112 3.2.2: the target's authority is the request's; the Host sent
    upstream agrees with it and the path goes in origin form."""
    be = make_backend()
    lb = make_lb([be])
    data = (b"GET http://internal.example/x?a=1 HTTP/1.1\r\nHost: good.example\r\n"
            b"X-Forwarded-Host: spoofed.example\r\nAccept: */*\r\n\r\n")
    r = send_and_read(lb.port, data, splits(data)[["whole", "line", "crlf", "bytes"].index(split)])
    assert r.status == 200
    assert be.received.startswith(b"GET /x?a=1 HTTP/1.1\r\nHost: internal.example\r\nAccept: */*\r\n")
    (q,) = be.requests
    assert q.all("host") == ["internal.example"]
    assert q.all("x-forwarded-host") == ["internal.example"]
    assert b"good.example" not in be.received and b"spoofed" not in be.received


def test_absolute_form_empty_path_and_https(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    for target, path, host in ((b"http://a.example", "/", "a.example"),
                               (b"http://a.example?q=1", "/?q=1", "a.example"),
                               (b"HTTPS://B.example:8443/s", "/s", "B.example:8443")):
        r = send_and_read(lb.port, b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n\r\n", None)
        assert r.status == 200
        assert (be.requests[-1].target, be.requests[-1].get("host")) == (path, host)


def test_absolute_form_http10_without_host(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    out, closed = exchange(lb.port, b"GET http://origin.example:8000/ten HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and closed
    (q,) = be.requests
    assert (q.target, q.all("host"), q.get("x-forwarded-host")) == \
        ("/ten", ["origin.example:8000"], "origin.example:8000")


def test_origin_form_http10_without_host_gets_backend_address(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    out, _ = exchange(lb.port, b"GET /ten HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    (q,) = be.requests
    assert q.all("host") == ["127.0.0.1:%d" % be.port] and q.get("x-forwarded-host") is None


# ---------------------------------------------------------------- validation before selection

BAD = [
    b"GET /bad HTTP/1.1\r\nHost: a b/../<x>\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nHost: x,y\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nX: no host\r\n\r\n",
    b"GET http://u@h/bad HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nHost: x:99999\r\n\r\n",
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rejected_requests_leave_the_selector_alone(make_backend, make_lb, algorithm):
    """Requests answered 400 never reach the selector: the backends chosen for
    the valid ones are those a balancer that never saw the bad ones chooses.
    (maglev: keyed on a header the requests do not carry, so its fallback picks.)"""
    bes = [make_backend(n) for n in "ABC"]
    kw = {"algorithm": algorithm, "weights": (3, 1, 2)}
    if algorithm == "maglev":
        kw["hash_key"] = "header:X-User"
    lb, ref = make_lb(bes, **kw), make_lb(bes, **kw)

    def good(port, i):
        r = send_and_read(port, b"GET /%d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % i, None)
        assert r.status == 200
        return r.get("x-backend")

    want = [good(ref.port, i) for i in range(12)]
    got = []
    for i in range(12):
        got.append(good(lb.port, i))
        for raw in BAD[:1 + i % len(BAD)]:
            out, closed = exchange(lb.port, raw, split="bytes" if i == 3 else None)
            assert out.startswith(b"HTTP/1.1 400 ") and closed, out
    assert got == want
    assert len(set(want)) > 1
    for be in bes:
        assert all(q.target != "/bad" for q in be.requests)
    sel = lb.proxy.balancer if algorithm != "maglev" else lb.proxy.fallback
    assert [sel.in_flight(i) for i in range(3)] == [0, 0, 0]


def test_round_robin_order_unchanged_by_400s(make_backend, make_lb):
    bes = [make_backend(n) for n in "ABC"]
    lb = make_lb(bes)
    seen = []
    for i in range(6):
        r = send_and_read(lb.port, b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i, None)
        seen.append(r.get("x-backend"))
        out, _ = exchange(lb.port, b"GET / HTTP/1.1\r\nHost: \"quoted\"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
    assert seen == list("ABCABC")


# ---------------------------------------------------------------- chunk sizes with leading zeros


@pytest.mark.parametrize("split", ["whole", "line", "crlf", "bytes"])
def test_chunked_request_with_leading_zeros(make_backend, make_lb, split):
    be = make_backend()
    lb = make_lb([be])
    data = (b"POST /z HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0000000000000000001\r\nx\r\n" + b"0" * 16 + b"4;e=1\r\nyzzy\r\n" + b"0" * 20 + b"\r\n\r\n")
    r = send_and_read(lb.port, data, splits(data)[["whole", "line", "crlf", "bytes"].index(split)])
    assert r.status == 200
    assert r.json()["body"] == "xyzzy"
    assert be.received.endswith(data[data.find(b"\r\n\r\n") + 4:])


def test_chunk_size_field_too_long_400(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    out, closed = exchange(lb.port, b"POST /z HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    + b"0" * 21 + b"1\r\nx\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and closed
    assert be.requests == []


def test_chunked_response_with_leading_zeros(make_backend, make_lb):
    def handler(be, req):
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0000000000000000005\r\nhello\r\n" + b"0" * 19 + b"6\r\n world\r\n" + b"0" * 20 + b"\r\n\r\n")

    be = make_backend(handler=handler)
    lb = make_lb([be])
    r = send_and_read(lb.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", None)
    assert (r.status, r.body) == (200, b"hello world")
    out, _ = exchange(lb.port, b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nhello world")


# ---------------------------------------------------------------- Trailer


def trailer_backend(make_backend):
    def handler(be, req):
        return (b"HTTP/1.1 200 OK\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Checksum: 5d41\r\n\r\n")

    return make_backend(handler=handler)


def test_trailer_field_relayed_with_trailers(make_backend, make_lb):
    lb = make_lb([trailer_backend(make_backend)])
    out, closed = exchange(lb.port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"\r\nTrailer: X-Checksum\r\n" in head + b"\r\n"
    assert body == b"5\r\nhello\r\n0\r\nX-Checksum: 5d41\r\n\r\n"


def test_trailer_field_dropped_when_dechunked(make_backend, make_lb):
    """HTTP/1.0 clients get the body de-chunked, without the trailers: nor the field announcing them."""
    lb = make_lb([trailer_backend(make_backend)])
    out, closed = exchange(lb.port, b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert closed and body == b"hello"
    assert b"trailer" not in head.lower() and b"5d41" not in out


def test_request_trailer_field_relayed_with_trailers(make_backend, make_lb):
    be = make_backend()
    lb = make_lb([be])
    data = (b"POST /t HTTP/1.1\r\nHost: h\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
    r = send_and_read(lb.port, data, None)
    assert r.status == 200
    (q,) = be.requests
    assert q.get("trailer") == "X-Sum"
    assert ("trailer:X-Sum: 1", "") in q.headers
