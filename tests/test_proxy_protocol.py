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
