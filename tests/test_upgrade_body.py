"""Requests that carry an Upgrade field and a body: no tunnel is made, so they
are forwarded as plain requests with their bodies (the Upgrade field dropped as
hop-by-hop), and the connection stays usable. Fed whole, split and byte by byte."""
import pytest

from helpers import Reader, raw_connect, send_raw
from helpers import active_core, backend_loop, make_backend, make_lb  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("active_core")

CL = (b"POST /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
      b"Content-Length: 11\r\n\r\nhello world")
CHUNKED = (b"POST /up HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
# a body that itself looks like an Upgrade request
LOOKALIKE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
NESTED = (b"POST /up HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Content-Length: %d\r\n\r\n" % len(LOOKALIKE)) + LOOKALIKE
FOLLOW = b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("req,body", [(CL, b"hello world"), (CHUNKED, b"hello world"),
                                      (NESTED, LOOKALIKE)], ids=["length", "chunked", "nested"])
@pytest.mark.parametrize("split", [None, (7, 60, 95, 101), "bytes"], ids=["whole", "split", "bytes"])
def test_upgrade_request_with_body_is_forwarded_plain(make_backend, make_lb, req, body, split):
    be = make_backend("A")
    lb = make_lb([be])
    with raw_connect(lb.port, 10) as s:
        send_raw(s, req, split=split, delay=0.0005)
        r = Reader(s, 10)
        first = r.read_response()
        send_raw(s, FOLLOW, split=split, delay=0.0005)
        second = r.read_response()
    assert first.status == 200, first
    doc = first.json()
    assert doc["method"] == "POST" and doc["body"] == body.decode()
    names = [n.lower() for n, _ in doc["headers"]]
    assert "upgrade" not in names
    assert second.status == 200 and second.json()["target"] == "/next"
    assert len(be.requests) == 2


@pytest.mark.parametrize("req", [CL, CHUNKED, NESTED], ids=["length", "chunked", "nested"])
def test_upgrade_request_with_body_then_pipelined_request(make_backend, make_lb, req):
    be = make_backend("A")
    lb = make_lb([be])
    with raw_connect(lb.port, 10) as s:
        s.sendall(req + FOLLOW)
        r = Reader(s, 10)
        assert r.read_response().json()["method"] == "POST"
        assert r.read_response().json()["target"] == "/next"
    assert [q.target for q in be.requests] == ["/up", "/next"]
