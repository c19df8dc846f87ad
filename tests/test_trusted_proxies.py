"""Trusted proxies and forged X-Forwarded-* (README, "Client addresses and
trusted proxies"), through a real fastlb, on the active core.

The client is 127.0.0.1 throughout: untrusted by default and with
``trusted_proxies`` naming other networks, trusted with 127.0.0.0/8. Each
request carries forged X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host
and Forwarded fields and is sent whole, split and byte by byte; the backend
says what it got, the access log who the client was, and a Maglev pool on
the ``ip`` key where the request went.
"""
import pytest

from helpers import (HOST, Reader, access_log_lines, ok_response, raw_connect, send_raw,
                     ACCESS_LOG_COMBINED)
from helpers import (active_core, backend_loop, make_backend, make_config_lb,  # noqa: F401
                     make_lb)

pytestmark = pytest.mark.usefixtures("active_core")

FORGED = (b"GET /t HTTP/1.1\r\nHost: app.example\r\n"
          b"X-Forwarded-For: 203.0.113.7, 10.0.0.1\r\n"
          b"X-Forwarded-Proto: https\r\n"
          b"X-Forwarded-Host: evil.example\r\n"
          b"Forwarded: for=198.51.100.1;proto=https\r\n"
          b"x-forwarded-for: 127.0.0.9\r\n"
          b"Accept: */*\r\n\r\n")
SPLITS = [None, (5, 40, 41, 90, 130, 160), "bytes"]
SPLIT_IDS = ["whole", "split", "bytes"]


def send(port, data=FORGED, split=None, n=1):
    """``n`` requests on one connection; the backend's echo documents."""
    docs = []
    with raw_connect(port, 10) as s:
        rd = Reader(s, 10)
        for _ in range(n):
            send_raw(s, data, split=split, delay=0.0002)
            r = rd.read_response()
            assert r.status == 200, r
            docs.append(r.json())
    return docs


def fields(doc, name):
    return [v for n, v in doc["headers"] if n.lower() == name]


def log_clients(path, n):
    return [ACCESS_LOG_COMBINED.match(line).group("client") for line in access_log_lines(path, n)]


@pytest.mark.parametrize("trusted", [(), ("10.0.0.0/8", "192.168.0.0/16")],
                         ids=["trust-nobody", "trust-others"])
@pytest.mark.parametrize("split", SPLITS, ids=SPLIT_IDS)
def test_forged_fields_from_an_untrusted_client_are_replaced(make_backend, make_lb, tmp_path,
                                                             trusted, split):
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], trusted_proxies=trusted, access_log=str(log))
    (doc,) = send(lb.port, split=split)
    assert fields(doc, "x-forwarded-for") == ["127.0.0.1"]
    assert fields(doc, "x-forwarded-proto") == ["http"]
    assert fields(doc, "x-forwarded-host") == ["app.example"]
    assert fields(doc, "forwarded") == []
    assert fields(doc, "accept") == ["*/*"]
    assert log_clients(str(log), 1) == ["127.0.0.1"]


@pytest.mark.parametrize("split", SPLITS, ids=SPLIT_IDS)
def test_fields_from_a_trusted_proxy_are_extended_and_kept(make_backend, make_lb, tmp_path,
                                                           split):
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], trusted_proxies=("127.0.0.0/8",), access_log=str(log))
    docs = send(lb.port, split=split, n=2)
    for doc in docs:
        assert fields(doc, "x-forwarded-for") == ["203.0.113.7, 10.0.0.1, 127.0.0.9, 127.0.0.1"]
        assert fields(doc, "x-forwarded-proto") == ["https"]
        assert fields(doc, "x-forwarded-host") == ["evil.example"]
        assert fields(doc, "forwarded") == ["for=198.51.100.1;proto=https"]
    # the right-most address that is not a trusted proxy (127.0.0.9 is one)
    assert log_clients(str(log), 2) == ["10.0.0.1", "10.0.0.1"]


def test_every_hop_trusted_gives_the_first_untrusted(make_backend, make_lb, tmp_path):
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], trusted_proxies=("127.0.0.0/8", "10.0.0.0/8"), access_log=str(log))
    send(lb.port)
    assert log_clients(str(log), 1) == ["203.0.113.7"]


@pytest.mark.parametrize("xff,client", [
    (b"", "127.0.0.1"),                                 # nothing said: the peer
    (b"198.51.100.4", "198.51.100.4"),
    (b"198.51.100.4:5555", "198.51.100.4"),             # a port is not part of the address
    (b"[2001:db8::7]:443", "2001:db8::7"),
    (b"198.51.100.4, 127.0.0.2", "198.51.100.4"),
    (b"127.0.0.3, 127.0.0.2", "127.0.0.3"),             # all trusted: the left-most
    (b"198.51.100.4, not-an-address, 127.0.0.2", "127.0.0.2"),  # the walk stops there
    (b"garbage", "127.0.0.1"),
], ids=["none", "one", "port", "ipv6", "chain", "all-trusted", "unreadable", "garbage"])
def test_client_address_from_a_trusted_proxy(make_backend, make_lb, tmp_path, xff, client):
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], trusted_proxies=("127.0.0.0/8",), access_log=str(log))
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + (b"X-Forwarded-For: " + xff + b"\r\n" if xff else b"")
    send(lb.port, head + b"\r\n")
    assert log_clients(str(log), 1) == [client]


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_hash_key_ip_uses_the_client_address(make_backend, make_lb, trusted):
    """maglev on ``ip``: from a trusted proxy each request goes where its
    X-Forwarded-For client hashes; from anyone else where the peer hashes,
    whatever it claims."""
    from fastlb.selection import make_balancer

    def handler(be, req):
        return ok_response(be.name.encode())

    bes = [make_backend(n, handler=handler) for n in "ABC"]
    lb = make_lb(bes, algorithm="maglev", hash_key="ip",
                 trusted_proxies=("127.0.0.0/8",) if trusted else ())
    oracle = make_balancer("maglev", [1, 1, 1], [f"{HOST}:{b.port}".encode() for b in bes])
    got, want = [], []
    with raw_connect(lb.port, 10) as s:
        rd = Reader(s, 10)
        for i in range(30):
            ip = b"198.51.100.%d" % i
            s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: " + ip + b"\r\n\r\n")
            got.append(rd.read_response().body.decode())
            idx = oracle.select(ip if trusted else HOST.encode())
            oracle.release(idx)
            want.append("ABC"[idx])
    assert got == want
    assert (len(set(got)) > 1) if trusted else (len(set(got)) == 1)


def test_trust_is_decided_when_the_connection_opens(make_backend, make_config_lb):
    """A reload that stops trusting 127.0.0.0/8 applies to connections opened
    after it; one that was open keeps its answer."""
    be = make_backend()
    text = ('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
            'trusted_proxies = [%s]\n'
            '[pools.app]\nbackends = ["http://127.0.0.1:%d"]\n')
    lb = make_config_lb(text % ('"127.0.0.0/8"', be.port))
    port = lb.port("web")
    req = b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.4\r\n\r\n"
    with raw_connect(port, 10) as old:
        rd = Reader(old, 10)
        old.sendall(req)
        assert fields(rd.read_response().json(), "x-forwarded-for") == ["198.51.100.4, 127.0.0.1"]
        lb.reload(text % ("", be.port))
        old.sendall(req)
        assert fields(rd.read_response().json(), "x-forwarded-for") == ["198.51.100.4, 127.0.0.1"]
        (doc,) = send(port, req)
        assert fields(doc, "x-forwarded-for") == ["127.0.0.1"]
