"""The PROXY protocol (README, "PROXY protocol"): read on listeners with
``proxy_protocol``, written to backends of pools with ``send_proxy_protocol``,
through a real fastlb on the active core.

Clients are raw sockets bound to addresses of 127.0.0.0/8 (all of it is this
machine), so the real peer differs from the address a PROXY header claims.
Headers are written by this file (``v1``/``v2`` below) as the spec defines
them; the backend reads them with ``helpers.read_proxy_header``, a receiver
written from the spec apart from fastlb's parser. Every valid case is sent
whole (header and request in one send), split (also exactly at the header's
end) and byte by byte.
"""
import ipaddress
import logging
import random
import re
import socket
import struct
import time

import pytest

from fastlb.runtime.shm import L_NAMES
from fastlb.selection import ALGORITHMS
from fastlb.wire import proxyproto
from helpers import (ACCESS_LOG_COMBINED, HOST, FastlbProcess, Reader, access_log_lines,
                     raw_connect, read_proxy_header, recv_until_close, send_raw,
                     wait_for)
from helpers import (active_core, backend_loop, make_backend, make_config_lb,  # noqa: F401
                     make_lb)

pytestmark = pytest.mark.usefixtures("active_core")

REQUEST = b"GET /pp HTTP/1.1\r\nHost: app.example\r\nAccept: */*\r\n\r\n"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src, sport, dst, dport):
    proto = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src, sport, dst, dport, tlvs=b"", command=1):
    ip = ipaddress.ip_address(src)
    fam = 0x11 if ip.version == 4 else 0x21
    block = (ip.packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
             + tlvs)
    return SIG + bytes([0x20 | command, fam]) + struct.pack("!H", len(block)) + block


HEADERS = {"v1": v1, "v2": v2}
ADDRS = {"ipv4": ("203.0.113.7", 41234, "198.51.100.1", 443),
         "ipv6": ("2001:db8::7", 41234, "2001:db8::1", 443)}


def splits(header):
    """Whole, split (inside the header, at its end, inside the request), bytes."""
    n = len(header)
    return [None, (3, n // 2, n, n + 5), "bytes"]


SPLIT_IDS = ["whole", "split", "bytes"]


def fields(doc, name):
    return [v for n, v in doc["headers"] if n.lower() == name]


def log_clients(path, n):
    return [ACCESS_LOG_COMBINED.match(line).group("client") for line in access_log_lines(path, n)]


def exchange(port, data, source="127.0.0.2", split=None, n=1, then=REQUEST):
    """``data`` (a header and a request), then ``n - 1`` more requests on the
    same connection; the backend's echo documents."""
    docs = []
    with raw_connect(port, 10, source=source) as s:
        rd = Reader(s, 10)
        send_raw(s, data, split=split, delay=0.0002)
        for i in range(n):
            if i:
                send_raw(s, then)
            r = rd.read_response()
            assert r.status == 200, r
            docs.append(r.json())
    return docs


def refused(port, data, source="127.0.0.2", split=None):
    """What the connection gets for ``data``: (bytes, closed by fastlb)."""
    with raw_connect(port, 10, source=source) as s:
        try:
            send_raw(s, data, split=split, delay=0.0002)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            return recv_until_close(s, 5)
        except ConnectionResetError:
            return b"", True


def listener_counters(lb, name="default"):
    return lb.lt.call_soon(lambda: dict(zip(L_NAMES, lb.proxy.fronts[name].ctr)))


# ---------------------------------------------------------------- the parser

def test_parser_golden_vectors(core):
    """Both cores' parser on the spec's examples and on what this file writes."""
    parse = core.parse_proxy_header
    assert parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /") == (
        47, ("192.168.0.1", 56324, "192.168.0.11", 443))
    assert parse(b"PROXY UNKNOWN\r\n") == (15, None)
    line = b"PROXY UNKNOWN ffff:f::f:ffff ffff:f::f:ffff 65535 65535\r\n"
    assert parse(line + b"x") == (len(line), None)        # the rest of the line is ignored
    h = v1("2001:db8::7", 1, "::1", 65535)
    assert parse(h) == (len(h), ("2001:db8::7", 1, "::1", 65535))
    h = b"PROXY TCP6 2001:DB8:0:0::7 ::ffff:192.0.2.1 0 80\r\n"      # inet_ntop's form out
    assert parse(h) == (len(h), ("2001:db8::7", 0, "::ffff:192.0.2.1", 80))
    h = v2("203.0.113.7", 41234, "198.51.100.1", 443, tlvs=b"\x04\x00\x03abc")
    assert parse(h + b"GET") == (len(h), ("203.0.113.7", 41234, "198.51.100.1", 443))
    h = v2("2001:db8::7", 1, "2001:db8::1", 2)
    assert parse(h) == (52, ("2001:db8::7", 1, "2001:db8::1", 2))
    assert parse(SIG + b"\x20\x00\x00\x00") == (16, None)                  # LOCAL
    assert parse(SIG + b"\x20\x11\x00\x0c" + bytes(12)) == (28, None)      # LOCAL, addresses
    assert parse(SIG + b"\x21\x12\x00\x0c" + bytes(12)) == (28, None)      # UDP: the socket's
    assert parse(SIG + b"\x21\x31\x00\xd8" + bytes(216)) == (232, None)    # UNIX: the socket's
    assert parse(SIG + b"\x21\x00\x00\x00") == (16, None)                  # unspecified
    with pytest.raises(TypeError):
        parse(bytearray(b"PROXY UNKNOWN\r\n"))
    # fastlb's writer, read back by the spec-side reader of the tests and by the parser
    for version, (src, sport, dst, dport) in [(1, ADDRS["ipv4"]), (2, ADDRS["ipv4"]),
                                              (1, ADDRS["ipv6"]), (2, ADDRS["ipv6"])]:
        out = proxyproto.proxy_header(version, (src, sport, dst, dport))
        n, got = read_proxy_header(out + b"GET")
        fmt = "[{}]:{}" if ":" in src else "{}:{}"
        assert (n, got["version"], got["src"], got["dst"]) == (
            len(out), version, fmt.format(src, sport), fmt.format(dst, dport))
        assert parse(out) == (len(out), (src, sport, dst, dport))
    assert proxyproto.proxy_header(1, None) == b"PROXY UNKNOWN\r\n"
    assert proxyproto.proxy_header(2, None) == SIG + b"\x20\x00\x00\x00"
    # an IPv4 client of an IPv6 listener: both IPv6 (IPv4-mapped)
    assert proxyproto.proxy_header(1, ("192.0.2.1", 5, "::1", 80)) == (
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 5 80\r\n")


BAD_HEADERS = {
    "plain-http": (b"GET / HTTP/1.1\r\n",
                   "no PROXY protocol header: the connection starts with b'GET / HTTP/1.1\\r\\n'"),
    "prefix": (b"PRX", "no PROXY protocol header: the connection starts with b'PRX'"),
    "overlong": (b"PROXY UNKNOWN " + b"x" * 93, "PROXY v1 line longer than 107 bytes"),
    "bare-cr": (b"PROXY TCP4\rx", "PROXY v1 line with a CR not followed by LF"),
    "bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "PROXY v1 line ends with a bare LF "
                                                      "(CRLF expected)"),
    "protocol": (b"PROXY \r\n", "PROXY v1 protocol '' (TCP4, TCP6 or UNKNOWN expected)"),
    "fields": (b"PROXY TCP6 ::1 ::1 1 2 3\r\n", "PROXY v1 TCP6 line with 5 fields after the "
                                                "protocol (4 expected, one space apart)"),
    "ipv4": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "PROXY v1 source address '1.2.3.256' is "
                                                     "not an IPv4 address in canonical form"),
    "ipv6": (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "PROXY v1 destination address '1::2::3' is "
                                                "not an IPv6 address"),
    "port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "PROXY v1 source port '-1' is not a port "
                                                    "(0 to 65535, no leading zeros)"),
    "v2-signature": (SIG[:7] + b"X", "no PROXY protocol header (not the v2 signature): the "
                                     "connection starts with b'\\r\\n\\r\\n\\x00\\r\\nX'"),
    "v2-version": (SIG + b"\x11\x11\x00\x0c", "PROXY v2 header of version 1 (2 expected)"),
    "v2-command": (SIG + b"\x2f\x11\x00\x0c", "PROXY v2 command 15 (0, LOCAL, or 1, PROXY, "
                                              "expected)"),
    "v2-family": (SIG + b"\x21\x13\x00\x0c", "PROXY v2 address family and protocol 0x13 are "
                                             "not defined"),
    "v2-overlong": (SIG + b"\x20\x00\x40\x00", "PROXY v2 header of 16400 bytes (at most 16384)"),
    "v2-truncated": (SIG + b"\x21\x31\x00\x24", "PROXY v2 address block of 36 bytes: family "
                                                "0x31 needs 216"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_parser_reasons(core, case):
    """Each refusal says why, the same in both cores."""
    from fastlb.errors import ProxyHeaderError

    data, reason = BAD_HEADERS[case]
    with pytest.raises(ProxyHeaderError) as info:
        core.parse_proxy_header(data)
    assert info.value.reason == reason


def test_parser_answers_the_same_however_the_bytes_are_cut(core):
    """Every prefix of a valid header is "more bytes needed" (never an error,
    never a wrong answer), and the whole header gives one answer."""
    rng = random.Random(1207)
    headers = [v1(*ADDRS["ipv4"]), v1(*ADDRS["ipv6"]), v2(*ADDRS["ipv4"]), v2(*ADDRS["ipv6"]),
               v2(*ADDRS["ipv4"], tlvs=bytes(rng.randrange(256) for _ in range(300))),
               b"PROXY UNKNOWN\r\n", SIG + b"\x20\x00\x00\x00",
               b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"]
    for h in headers:
        full = core.parse_proxy_header(h + REQUEST)
        assert full[0] == len(h)
        for k in range(len(h)):
            assert core.parse_proxy_header(h[:k]) is None, (h, k)


def _mutants(rng, n):
    """Headers with random bytes changed, cut or added: valid and invalid ones."""
    seeds = [v1(*ADDRS["ipv4"]), v1(*ADDRS["ipv6"]), v2(*ADDRS["ipv4"]), v2(*ADDRS["ipv6"]),
             b"PROXY UNKNOWN\r\n", SIG + b"\x20\x00\x00\x00", b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
             v2(*ADDRS["ipv4"], tlvs=b"\x01\x00\x02h2")]
    alphabet = b"0123456789.: \r\nPROXYTCP46UNKabcdef\x00\x11\x21\xff"
    for _ in range(n):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            i = rng.randrange(len(b) + 1)
            if op == 0 and i < len(b):
                b[i] = rng.choice(alphabet)
            elif op == 1:
                b.insert(i, rng.choice(alphabet))
            elif op == 2 and i < len(b):
                del b[i]
            else:
                b = b[:i]
        yield bytes(b) + (REQUEST if rng.random() < 0.5 else b"")


def test_parser_twins_agree_on_mutated_headers():
    """The compiled parser and its pure twin: the same answer, or the same
    error with the same reason, for 20,000 mutated headers; and any header
    accepted is one the tests' own reader agrees on."""
    from fastlb import core as switch
    from fastlb.errors import ProxyHeaderError

    py = switch.implementation("py").parse_proxy_header
    c_mod = switch.implementation("c")
    impls = [py] + ([c_mod.parse_proxy_header] if c_mod is not None else [])

    def answer(fn, data):
        try:
            return fn(data)
        except ProxyHeaderError as e:
            return ("error", e.reason)

    rng = random.Random(20261201)
    accepted = 0
    for data in _mutants(rng, 20000):
        got = [answer(fn, data) for fn in impls]
        assert all(g == got[0] for g in got), (data, got)
        if got[0] is not None and got[0][0] != "error":
            accepted += 1
            end, addrs = got[0]
            n, hdr = read_proxy_header(data)
            assert n == end, data
            if addrs is not None and hdr.get("src") is not None:
                src = ipaddress.ip_address(addrs[0])
                want = hdr["src"].rpartition(":")[0].strip("[]")
                assert src == ipaddress.ip_address(want), (data, addrs, hdr)
    assert accepted > 1000      # the mutants are not all garbage


# ---------------------------------------------------------------- PROXY protocol in

@pytest.mark.parametrize("family", sorted(ADDRS))
@pytest.mark.parametrize("version", sorted(HEADERS))
@pytest.mark.parametrize("split", [0, 1, 2], ids=SPLIT_IDS)
def test_the_header_gives_the_client_address(make_backend, make_lb, tmp_path, version, family,
                                             split):
    """X-Forwarded-For and the access log name the header's source, for every
    request on the connection; the real peer (127.0.0.2) is nowhere."""
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], proxy_protocol=True, access_log=str(log))
    src = ADDRS[family][0]
    header = HEADERS[version](*ADDRS[family])
    docs = exchange(lb.port, header + REQUEST, split=splits(header)[split], n=2)
    for doc in docs:
        assert fields(doc, "x-forwarded-for") == [src]
        assert doc["target"] == "/pp"
    assert [d["conn"] for d in docs] == [0, 0]      # one keep-alive connection upstream
    assert log_clients(str(log), 2) == [src, src]
    assert listener_counters(lb)["proxy_errors"] == 0


def test_header_alone_then_the_request(make_backend, make_lb):
    """The header in a read of its own; the request a moment later."""
    be = make_backend()
    lb = make_lb([be], proxy_protocol=True)
    with raw_connect(lb.port, 10, source="127.0.0.3") as s:
        s.sendall(v2(*ADDRS["ipv4"]))
        time.sleep(0.2)
        s.sendall(REQUEST)
        r = Reader(s, 10).read_response()
    assert r.status == 200 and fields(r.json(), "x-forwarded-for") == ["203.0.113.7"]


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n",
                                    b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n",
                                    SIG + b"\x20\x00\x00\x00",
                                    SIG + b"\x20\x11\x00\x0c" + bytes(12)],
                         ids=["v1-unknown", "v1-unknown-addresses", "v2-local",
                              "v2-local-addresses"])
def test_unknown_and_local_mean_the_connection_itself(make_backend, make_lb, tmp_path, header):
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], proxy_protocol=True, access_log=str(log))
    (doc,) = exchange(lb.port, header + REQUEST, source="127.0.0.4")
    assert fields(doc, "x-forwarded-for") == ["127.0.0.4"]
    assert log_clients(str(log), 1) == ["127.0.0.4"]


@pytest.mark.parametrize("version", sorted(HEADERS))
@pytest.mark.parametrize("split", [0, 2], ids=["whole", "bytes"])
def test_only_peers_of_proxy_protocol_from_send_it(make_backend, make_lb, tmp_path, version,
                                                   split):
    """From 127.0.0.2 (in proxy_protocol_from) the header is required; from
    127.0.0.3 it is not expected: plain HTTP works there, and a PROXY header
    is a bad request (400)."""
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], proxy_protocol=True, proxy_protocol_from=("127.0.0.2/32",),
                 access_log=str(log))
    header = HEADERS[version](*ADDRS["ipv4"])
    sp = splits(header)[split]
    (doc,) = exchange(lb.port, header + REQUEST, source="127.0.0.2", split=sp)
    assert fields(doc, "x-forwarded-for") == ["203.0.113.7"]
    (doc,) = exchange(lb.port, REQUEST, source="127.0.0.3", split=sp)
    assert fields(doc, "x-forwarded-for") == ["127.0.0.3"]
    data, closed = refused(lb.port, header + REQUEST, source="127.0.0.3", split=sp)
    assert closed and data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
    # from a peer that must send the header, plain HTTP gets no answer at all
    assert refused(lb.port, REQUEST, source="127.0.0.2", split=sp) == (b"", True)
    assert [r.target for r in be.requests] == ["/pp", "/pp"]
    assert log_clients(str(log), 3) == ["203.0.113.7", "127.0.0.3", "127.0.0.3"]
    assert listener_counters(lb)["proxy_errors"] == 1


def test_trusted_proxies_judge_the_header_address(make_backend, make_lb, tmp_path):
    """The header's source is the peer the trusted-proxies logic sees: a
    trusted one's X-Forwarded-For is extended and believed, an untrusted
    one's replaced (the real peer, 127.0.0.2, is in neither network)."""
    be = make_backend()
    log = tmp_path / "access.log"
    lb = make_lb([be], proxy_protocol=True, trusted_proxies=("10.0.0.0/8",),
                 access_log=str(log))
    forged = (b"GET /t HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 203.0.113.9\r\n"
              b"X-Forwarded-Proto: https\r\n\r\n")
    (doc,) = exchange(lb.port, v1("10.1.2.3", 5000, "10.0.0.1", 80) + forged)
    assert fields(doc, "x-forwarded-for") == ["203.0.113.9, 10.1.2.3"]
    assert fields(doc, "x-forwarded-proto") == ["https"]
    (doc,) = exchange(lb.port, v2("198.51.100.7", 5000, "10.0.0.1", 80) + forged)
    assert fields(doc, "x-forwarded-for") == ["198.51.100.7"]
    assert fields(doc, "x-forwarded-proto") == ["http"]
    assert log_clients(str(log), 2) == ["203.0.113.9", "198.51.100.7"]


def test_hash_key_ip_hashes_the_header_address(make_backend, make_lb):
    """Maglev on the ``ip`` key sends a client to the backend its address
    hashes to: the header's address through a PROXY listener is the same as
    that address connecting directly."""
    bes = [make_backend(n) for n in "ABC"]
    direct = make_lb(bes, algorithm="maglev", hash_key="ip")
    pp = make_lb(bes, algorithm="maglev", hash_key="ip", proxy_protocol=True)
    sources = [f"127.0.0.{k}" for k in range(10, 40)]
    want = [exchange(direct.port, REQUEST, source=src)[0]["backend"] for src in sources]
    assert len(set(want)) > 1      # else the addresses would not tell anything apart
    got = [exchange(pp.port, v1(src, 1000, "127.0.0.1", pp.port) + REQUEST,
                    source="127.0.0.2")[0]["backend"] for src in sources]
    assert got == want


# ---------------------------------------------------------------- bad headers

BAD = {
    "plain-http": REQUEST,
    "bad-v1-signature": b"PROXZ TCP4 1.2.3.4 5.6.7.8 1 2\r\n" + REQUEST,
    "bad-v2-signature": b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x0c" + bytes(12) + REQUEST,
    "v1-garbage-address": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n" + REQUEST,
    "v1-leading-zero": b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n" + REQUEST,
    "v1-v6-in-tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n" + REQUEST,
    "v1-bad-port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n" + REQUEST,
    "v1-fields-missing": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n" + REQUEST,
    "v1-two-spaces": b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n" + REQUEST,
    "v1-bare-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + REQUEST,
    "v1-unknown-protocol": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n" + REQUEST,
    "v1-overlong": b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n" + REQUEST,
    "v2-version-1": SIG + b"\x11\x11\x00\x0c" + bytes(12) + REQUEST,
    "v2-command-2": SIG + b"\x22\x11\x00\x0c" + bytes(12) + REQUEST,
    "v2-bad-family": SIG + b"\x21\x41\x00\x0c" + bytes(12) + REQUEST,
    "v2-truncated-ipv4-block": SIG + b"\x21\x11\x00\x08" + bytes(8) + REQUEST,
    "v2-truncated-ipv6-block": SIG + b"\x21\x21\x00\x0c" + bytes(12) + REQUEST,
    "v2-overlong": SIG + b"\x21\x11\xff\xff" + bytes(12) + REQUEST,
}


@pytest.mark.parametrize("split", [0, 2], ids=["whole", "bytes"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_header_is_closed_without_an_answer(make_backend, make_lb, caplog, case, split):
    be = make_backend()
    lb = make_lb([be], proxy_protocol=True)
    with caplog.at_level(logging.WARNING, logger="fastlb"):
        assert refused(lb.port, BAD[case], split="bytes" if split else None) == (b"", True)
        assert wait_for(lambda: listener_counters(lb)["proxy_errors"] == 1)
        # and a good connection right after it is served
        (doc,) = exchange(lb.port, v1(*ADDRS["ipv4"]) + REQUEST)
    assert fields(doc, "x-forwarded-for") == ["203.0.113.7"]
    assert len(be.requests) == 1 and be.connections == 1     # nothing of the bad one reached it
    lines = [r for r in caplog.records if "closed without an answer" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, caplog.text
    assert "127.0.0.2:" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_bad_headers_are_counted_each_and_logged_once_a_while(make_backend, make_lb, caplog):
    be = make_backend()
    lb = make_lb([be], proxy_protocol=True)
    with caplog.at_level(logging.WARNING, logger="fastlb"):
        for case in sorted(BAD)[:6]:
            assert refused(lb.port, BAD[case]) == (b"", True)
        assert wait_for(lambda: listener_counters(lb)["proxy_errors"] == 6)
    assert lb.lt.call_soon(lambda: lb.proxy.proxy_errors) == 6
    lines = [r for r in caplog.records if "closed without an answer" in r.getMessage()]
    assert len(lines) == 1, caplog.text


def test_header_timeout(make_backend, make_lb):
    """No header, or half of one, within the header timeout: closed without
    an answer. A connection that closes before sending a byte is no error."""
    be = make_backend()
    lb = make_lb([be], proxy_protocol=True, header_timeout=0.5)
    with raw_connect(lb.port, 10, source="127.0.0.2") as s:
        t0 = time.monotonic()
        assert recv_until_close(s, 5) == (b"", True)
        assert time.monotonic() - t0 >= 0.4
    with raw_connect(lb.port, 10, source="127.0.0.2") as s:
        s.sendall(v2(*ADDRS["ipv6"])[:20])
        assert recv_until_close(s, 5) == (b"", True)
    assert wait_for(lambda: listener_counters(lb)["proxy_errors"] == 2)
    with raw_connect(lb.port, 10, source="127.0.0.2") as s:
        s.sendall(v1(*ADDRS["ipv4"])[:10])
        s.shutdown(socket.SHUT_WR)          # cut short: an error too
        assert recv_until_close(s, 5) == (b"", True)
    assert wait_for(lambda: listener_counters(lb)["proxy_errors"] == 3)
    with raw_connect(lb.port, 10, source="127.0.0.2") as s:
        s.shutdown(socket.SHUT_WR)          # a TCP check of the proxy in front: not counted
        assert recv_until_close(s, 5) == (b"", True)
    time.sleep(0.3)
    assert listener_counters(lb)["proxy_errors"] == 3
    assert be.connections == 0


def test_a_drain_answers_a_connection_still_waiting_for_its_header(make_backend):
    """SIGTERM while connections have sent nothing yet: as any connection
    that has carried no request, one gets its first request answered if the
    header and the request come soon (with Connection: close); one that stays
    silent is closed after that short wait (not at its header timeout), and
    fastlb exits long before the drain timeout."""
    import signal

    be = make_backend()
    lb = FastlbProcess([be.addr], "--proxy-protocol", "--drain-timeout", "20",
                       "--header-timeout", "20")
    try:
        with raw_connect(lb.port, 10, source="127.0.0.2") as s, \
                raw_connect(lb.port, 10, source="127.0.0.3") as silent:
            time.sleep(0.2)
            lb.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            time.sleep(0.5)
            s.sendall(v1(*ADDRS["ipv4"]) + REQUEST)
            r = Reader(s, 10).read_response()
            assert r.status == 200 and r.get("connection") == "close"
            assert fields(r.json(), "x-forwarded-for") == ["203.0.113.7"]
            assert recv_until_close(silent, 15) == (b"", True)
            assert lb.proc.wait(15) == 0
            assert time.monotonic() - t0 < 10       # the drain did not wait for it
    finally:
        lb.kill()


# ---------------------------------------------------------------- PROXY protocol out

def _addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backends_get_the_client_and_listener_addresses(make_backend, make_lb, version):
    be = make_backend(proxy_protocol=True)
    lb = make_lb([be], send_proxy_protocol=version)
    with raw_connect(lb.port, 10, source="127.0.0.5") as s:
        client = _addr(*s.getsockname()[:2])
        rd = Reader(s, 10)
        for _ in range(3):
            s.sendall(REQUEST)
            assert rd.read_response().status == 200
    assert be.connections == 1      # one client: its connection is reused for it
    assert [r.proxy for r in be.requests] == [{
        "version": int(version[1]), "command": "PROXY",
        **({"proto": "TCP4"} if version == "v1" else {"family": 0x11}),
        "src": client, "dst": f"127.0.0.1:{lb.port}"}] * 3


@pytest.mark.parametrize("family", sorted(ADDRS))
@pytest.mark.parametrize("out", ["v1", "v2"])
def test_the_address_read_is_the_address_sent(make_backend, make_lb, family, out):
    """PROXY in and out: the backend gets the header's addresses as they came."""
    be = make_backend(proxy_protocol=True)
    lb = make_lb([be], proxy_protocol=True, send_proxy_protocol=out)
    src, sport, dst, dport = ADDRS[family]
    exchange(lb.port, v2(src, sport, dst, dport) + REQUEST)
    (got,) = be.proxy_headers
    assert (got["src"], got["dst"]) == (_addr(src, sport), _addr(dst, dport))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pooled_connections_never_mix_clients(make_backend, make_lb, algorithm):
    """Three clients, interleaved, keep-alive, over two backends: every
    request reaches its backend on a connection whose header names its own
    client, and a connection closed client never serves another."""
    bes = [make_backend("A", proxy_protocol=True), make_backend("B", proxy_protocol=True)]
    lb = make_lb(bes, algorithm=algorithm, send_proxy_protocol="v2")
    socks = [raw_connect(lb.port, 10, source=f"127.0.0.{k}") for k in (6, 7, 8)]
    try:
        readers = [Reader(s, 10) for s in socks]
        names = [_addr(*s.getsockname()[:2]) for s in socks]
        for rnd in range(4):
            for i, (s, rd) in enumerate(zip(socks, readers)):
                s.sendall(b"GET /c%d/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (i, rnd))
                assert rd.read_response().status == 200
        socks[0].close()
        with raw_connect(lb.port, 10, source="127.0.0.9") as s:
            late = _addr(*s.getsockname()[:2])
            rd = Reader(s, 10)
            for rnd in range(3):
                s.sendall(b"GET /late/%d HTTP/1.1\r\nHost: t\r\n\r\n" % rnd)
                assert rd.read_response().status == 200
    finally:
        for s in socks:
            s.close()
    reqs = [r for be in bes for r in be.requests]
    assert len(reqs) == 15
    for r in reqs:
        who = r.target.split("/")[1]
        want = late if who == "late" else names[int(who[1:])]
        assert r.proxy["src"] == want, (r.target, r.proxy)


def test_a_client_keeps_its_connection_to_its_backend(make_backend, make_lb):
    """With one backend, a keep-alive client's requests share one upstream
    connection (private to it); another client gets its own."""
    be = make_backend(proxy_protocol=True)
    lb = make_lb([be], send_proxy_protocol="v1")
    with raw_connect(lb.port, 10, source="127.0.0.6") as a, \
            raw_connect(lb.port, 10, source="127.0.0.7") as b:
        ra, rb = Reader(a, 10), Reader(b, 10)
        for _ in range(3):
            for s, rd in ((a, ra), (b, rb)):
                s.sendall(REQUEST)
                assert rd.read_response().status == 200
        srcs = [_addr(*s.getsockname()[:2]) for s in (a, b)]
    assert be.connections == 2
    by_conn = {}
    for r in be.requests:
        by_conn.setdefault(r.conn_index, set()).add(r.proxy["src"])
    assert sorted(by_conn.values(), key=sorted) == sorted(({s} for s in srcs), key=sorted)
    # both client connections are gone: so are their private upstream connections
    assert wait_for(lambda: lb.lt.call_soon(lambda: lb.proxy.upstreams) == 0)


def test_reload_that_turns_it_on_closes_the_pooled_connections(make_backend, make_config_lb):
    """Pooled connections opened without a header are never used once the
    pool sends one (nor the other way round)."""
    be = make_backend(proxy_protocol=True)
    text = f"""
[listeners.web]
bind = "127.0.0.1:0"
default_pool = "app"
[pools.app]
backends = ["http://{HOST}:{be.port}"]
"""
    lb = make_config_lb(text)

    def one(source):
        with raw_connect(lb.port("web"), 10, source=source) as s:
            s.sendall(REQUEST)
            assert Reader(s, 10).read_response().status == 200

    one("127.0.0.6")
    lb.reload(text + 'send_proxy_protocol = "v1"\n')
    one("127.0.0.7")
    lb.reload(text)
    one("127.0.0.8")
    assert be.connections == 3
    assert [r.proxy is not None for r in be.requests] == [False, True, False]
    assert be.requests[1].proxy["src"].startswith("127.0.0.7:")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_health_checks_send_it_only_when_asked(make_backend, make_lb, version):
    from fastlb.health import HealthConfig

    plain = make_backend("plain", proxy_protocol=True)
    asked = make_backend("asked", proxy_protocol=True)
    a = make_lb([plain], send_proxy_protocol=version,
                health=HealthConfig(path="/hz", interval=0.2))
    b = make_lb([asked], send_proxy_protocol=version,
                health=HealthConfig(path="/hz", interval=0.2, send_proxy_protocol=True))
    assert wait_for(lambda: len(plain.requests) >= 2 and len(asked.requests) >= 2)
    assert {r.proxy is None for r in plain.requests} == {True}
    got = asked.requests[0].proxy
    if version == "v2":
        assert (got["version"], got["command"]) == (2, "LOCAL")
    else:   # the check connection's own addresses, as the spec advises
        assert got["command"] == "PROXY" and got["dst"] == f"127.0.0.1:{asked.port}"


# ---------------------------------------------------------------- workers

def test_with_two_workers(make_backend, tmp_path):
    """``--workers 2``: every worker reads the header (the connections spread
    over both), and /metrics sums the listener's PROXY errors over them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from test_admin import log_text

    be = make_backend()
    lb = FastlbProcess([be.addr], "--workers", "2", "--proxy-protocol",
                       "--proxy-protocol-from", "127.0.0.2", "--admin", "127.0.0.1:0")
    try:
        m = wait_for(lambda: re.search(r"admin listening on 127\.0\.0\.1:(\d+)", log_text(lb)),
                     15)
        assert m, log_text(lb)
        api = httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=10)

        def metric(name):
            text = api.get("/metrics").text
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == name:
                        return s.value
            raise KeyError(name)

        for k in range(20):
            src = f"192.0.2.{k + 1}"
            (doc,) = exchange(lb.port, v1(src, 1000 + k, "192.0.2.254", 80) + REQUEST)
            assert fields(doc, "x-forwarded-for") == [src]
        for k in range(20):     # over both workers (all on one: 2**-19)
            assert refused(lb.port, BAD["plain-http"]) == (b"", True)
        assert wait_for(lambda: metric("fastlb_frontend_proxy_protocol_errors_total") == 20)
        # from a peer outside --proxy-protocol-from: plain HTTP
        (doc,) = exchange(lb.port, REQUEST, source="127.0.0.3")
        assert fields(doc, "x-forwarded-for") == ["127.0.0.3"]
        api.close()
    finally:
        assert lb.terminate(timeout=30) == 0, log_text(lb)


# ---------------------------------------------------------------- configuration

PP_FILE = """\
[listeners.edge]
bind = "127.0.0.1:8080"
default_pool = "app"
proxy_protocol = true
proxy_protocol_from = ["10.0.0.0/8", "192.168.1.10", "fd00::/8"]
[pools.app]
backends = ["http://127.0.0.1:9001"]
send_proxy_protocol = "v2"
[pools.app.health]
path = "/healthz"
send_proxy_protocol = true
"""


def test_the_settings_in_a_file():
    from fastlb.config import loads

    c = loads(PP_FILE, "pp.toml", resolve=False)
    li, pool = c.listeners["edge"], c.pools["app"]
    assert (li.proxy_protocol, li.proxy_protocol_from) == (
        True, ("10.0.0.0/8", "192.168.1.10/32", "fd00::/8"))
    assert (pool.send_proxy_protocol, pool.health.send_proxy_protocol) == ("v2", True)
    defaults = loads(PP_FILE.replace("\nproxy_protocol = true\n", "\n").replace(
        'proxy_protocol_from = ["10.0.0.0/8", "192.168.1.10", "fd00::/8"]\n', "").replace(
        'send_proxy_protocol = "v2"\n', "").replace("send_proxy_protocol = true\n", ""),
        "pp.toml", resolve=False)
    assert (defaults.listeners["edge"].proxy_protocol,
            defaults.listeners["edge"].proxy_protocol_from,
            defaults.pools["app"].send_proxy_protocol,
            defaults.pools["app"].health.send_proxy_protocol) == (False, (), None, False)


@pytest.mark.parametrize("old, new, message", [
    ("\nproxy_protocol = true\n", "\n",
     "pp.toml:4: listeners.edge.proxy_protocol_from: needs proxy_protocol = true (without it "
     "no connection is expected to start with a PROXY protocol header)"),
    ("\nproxy_protocol = true", "\nproxy_protocol = 1",
     "pp.toml:4: listeners.edge.proxy_protocol: expected true or false, got 1"),
    ('"192.168.1.10"', '"192.168.1.10/24"',
     'pp.toml:5: listeners.edge.proxy_protocol_from: "192.168.1.10/24" has host bits set '
     '(the network is "192.168.1.0/24")'),
    ('send_proxy_protocol = "v2"', 'send_proxy_protocol = "v3"',
     'pp.toml:8: pools.app.send_proxy_protocol: expected one of v1, v2, got "v3"'),
    ('send_proxy_protocol = "v2"\n', "",
     "pp.toml:10: pools.app.health.send_proxy_protocol: needs the pool's send_proxy_protocol "
     "(the checks send the header of its version)"),
    ("send_proxy_protocol = true", 'send_proxy_protocol = "yes"',
     'pp.toml:11: pools.app.health.send_proxy_protocol: expected true or false, got "yes"'),
], ids=["from-alone", "not-bool", "host-bits", "version", "health-alone", "health-not-bool"])
def test_bad_settings_name_the_problem(old, new, message):
    from fastlb.config import loads
    from fastlb.errors import ConfigError

    assert old in PP_FILE
    with pytest.raises(ConfigError) as info:
        loads(PP_FILE.replace(old, new), "pp.toml", resolve=False)
    assert [str(e) for e in info.value.errors] == [message]


@pytest.mark.parametrize("argv, message", [
    (["--proxy-protocol-from", "10.0.0.0/8"],
     "fastlb: error: --proxy-protocol-from: needs --proxy-protocol (without it no connection "
     "is expected to start with a PROXY protocol header)"),
    (["--proxy-protocol", "--proxy-protocol-from", "10.0.0.1/8"],
     'fastlb: error: --proxy-protocol-from: "10.0.0.1/8" has host bits set (the network is '
     '"10.0.0.0/8")'),
    (["--health-send-proxy-protocol"],
     "fastlb: error: --health-send-proxy-protocol: needs --send-proxy-protocol (the checks "
     "send the header of its version)"),
], ids=["from-alone", "host-bits", "health-alone"])
def test_bad_flags_are_usage_errors(argv, message):
    from helpers import run_fastlb

    r = run_fastlb("serve", "--backend", "http://127.0.0.1:9", *argv)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == message
    r = run_fastlb("serve", "--backend", "http://127.0.0.1:9", "--send-proxy-protocol", "v3")
    assert r.returncode == 2 and "invalid choice: 'v3'" in r.stderr


def test_the_flags_build_the_model_of_the_file():
    from fastlb import cli
    from fastlb.config import from_flags, loads

    args = cli.build_parser().parse_args([
        "serve", "--listen", "127.0.0.1:8080", "--backend", "http://127.0.0.1:9001",
        "--proxy-protocol", "--proxy-protocol-from", "10.0.0.0/8",
        "--proxy-protocol-from", "192.168.1.10", "--proxy-protocol-from", "fd00::/8",
        "--send-proxy-protocol", "v2", "--health-path", "/healthz",
        "--health-send-proxy-protocol"])
    file = loads(PP_FILE.replace("edge", "default").replace("app", "default"), "pp.toml",
                 resolve=False)
    flags = from_flags(args)
    assert (flags.listeners, flags.pools) == (file.listeners, file.pools)


# ---------------------------------------------------------------- other implementations

def _start(cmd, port, tmp_path, name):
    import subprocess

    err = open(tmp_path / f"{name}.stderr", "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)

    def up():
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return True
        except OSError:
            return proc.poll() is not None
    assert wait_for(up, 10) and proc.poll() is None, (tmp_path / f"{name}.stderr").read_text()
    return proc, err


def _stop(proc, err):
    proc.terminate()
    try:
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        err.close()


@pytest.mark.skipif(__import__("shutil").which("haproxy") is None,
                    reason="haproxy not installed (apt-get install haproxy)")
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2 proxy-v2-options crc32c"],
                         ids=["v1", "v2-with-tlv"])
def test_haproxy_in_front(make_backend, make_lb, tmp_path, send):
    """HAProxy relays TCP to fastlb with its send-proxy (v2: with a CRC32C
    TLV, skipped): the client's address reaches the backend."""
    from helpers import free_dead_port

    be = make_backend()
    lb = make_lb([be], proxy_protocol=True, proxy_protocol_from=("127.0.0.1",))
    port = free_dead_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen edge
    bind {HOST}:{port}
    server fastlb {HOST}:{lb.port} {send}
""")
    proc, err = _start(["haproxy", "-f", str(cfg), "-db"], port, tmp_path, "haproxy")
    try:
        for source in ("127.0.0.9", "127.0.0.10"):
            with raw_connect(port, 10, source=source) as s:
                s.sendall(REQUEST)
                r = Reader(s, 10).read_response()
            assert r.status == 200 and fields(r.json(), "x-forwarded-for") == [source]
    finally:
        _stop(proc, err)
    assert listener_counters(lb)["proxy_errors"] == 0


@pytest.mark.skipif(__import__("shutil").which("nginx") is None,
                    reason="nginx not installed (apt-get install nginx-light)")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_behind(make_lb, tmp_path, version):
    """nginx with ``listen ... proxy_protocol`` as the backend: it reads the
    client's address from fastlb's header, and accepts the health checks'."""
    from fastlb.health import HealthConfig
    from helpers import free_dead_port

    port = free_dead_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx.error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen {HOST}:{port} proxy_protocol;
        default_type text/plain;
        location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port"; }}
    }}
}}
""")
    proc, err = _start(["nginx", "-p", str(tmp_path), "-c", str(conf)], port, tmp_path, "nginx")
    try:
        lb = make_lb([(HOST, port)], send_proxy_protocol=version,
                     health=HealthConfig(path="/", interval=0.2, send_proxy_protocol=True))
        with raw_connect(lb.port, 10, source="127.0.0.9") as s:
            rd = Reader(s, 10)
            for _ in range(2):
                s.sendall(REQUEST)
                r = rd.read_response()
                assert (r.status, r.body) == (200, b"127.0.0.9 %d 127.0.0.1 %d" % (
                    s.getsockname()[1], lb.port))

        def checks():
            snap = lb.lt.call_soon(lambda: lb.proxy.pools["default"].health.snapshot())[0]
            return snap["checks"] >= 3 and snap
        snap = wait_for(checks, 10)
        assert snap and snap["check_failures"] == 0 and snap["state"] == "UP", snap
    finally:
        _stop(proc, err)
