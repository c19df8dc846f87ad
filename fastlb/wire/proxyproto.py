"""The PROXY protocol (HAProxy's ``proxy-protocol.txt``, versions 1 and 2).

A proxy in front of fastlb that speaks it (HAProxy's ``send-proxy``, AWS and
GCP network load balancers, another fastlb) starts each connection with one
header giving the addresses of the connection it relays: its client's
(source) and the address that client connected to (destination). fastlb
reads it on listeners with ``proxy_protocol = true`` (``parse_proxy_header``)
and writes it to backends of pools with ``send_proxy_protocol``
(``proxy_header``).

``parse_proxy_header(data)`` reads the header at the start of ``data``
(bytes: what the connection sent so far): None while more bytes are needed,
``(end, addrs)`` once it is complete (``data[end:]`` is the start of the
stream it preceded), and ``fastlb.errors.ProxyHeaderError`` as soon as the
bytes cannot be the start of a valid header, so garbage is refused at its
first byte. ``addrs`` is ``(src_ip, src_port, dst_ip, dst_port)``
(addresses as ``str``, in the form ``socket.inet_ntop`` gives), or None
when the header says to use the connection's own addresses: version 1
``UNKNOWN``, version 2 ``LOCAL`` (the sender's health checks), or a version
2 family other than TCP over IPv4 or IPv6 (UDP, UNIX, unspecified).

Version 1 is one text line, ``PROXY TCP4 192.0.2.1 198.51.100.2 56324 443``
and CRLF, at most ``PROXY_V1_MAX`` (107) bytes: checked strictly (one space
between fields, canonical IPv4 addresses and ports without leading zeros,
the CRLF within the first 107 bytes, never a bare CR or LF). Version 2 is
binary: a 12-byte signature, version and command, family and protocol, the
length of what follows (addresses, then TLVs, which are skipped unread); at
most ``PROXY_V2_MAX`` bytes in all.

This module is the pure twin of ``proxyproto.pxi`` for
``parse_proxy_header`` (part of the pure-Python core, ``fastlb._core_py``;
both raise the same error, with the same reason, for the same bytes). The
writers (``proxy_header``, ``local_proxy_header``) run once per new backend
connection, next to a connect that costs far more, and exist only here.
"""
import re
import socket
import struct

from fastlb.errors import PROXY_V1_MAX, PROXY_V2_MAX, ProxyHeaderError

__all__ = ["parse_proxy_header", "proxy_header", "local_proxy_header", "ProxyHeaderError",
           "PROXY_V1_MAX", "PROXY_V2_MAX", "V2_SIGNATURE", "VERSIONS"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSIONS = {"v1": 1, "v2": 2}   # send_proxy_protocol values -> the version number

_V1_PREFIX = b"PROXY "
_V2_NEED = {1: 12, 2: 36, 3: 216}    # address bytes per family (IPv4, IPv6, UNIX)
_V2_PORTS = struct.Struct("!HH")
_V2_HEAD = struct.Struct("!12sBBH")
# canonical forms: decimal without leading zeros, octets 0-255, ports up to 5 digits
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = re.compile(_OCTET + rb"(?:\." + _OCTET + rb"){3}")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")      # inet_pton checks the rest
_V1_TCP4 = re.compile(rb"PROXY TCP4 (%s) (%s) (%s) (%s)\r\n" % (
    _IPV4.pattern, _IPV4.pattern, _PORT.pattern, _PORT.pattern))


def _start(data):
    """The first bytes of ``data``, for messages (escaped, at most 16)."""
    return repr(bytes(data[:16]))


def _show(b):
    """A field, for messages (escaped, at most 40 bytes, without the b)."""
    return repr(bytes(b[:40]))[1:]


def parse_proxy_header(data):
    """The header at the start of ``data`` (see the module): None (more
    bytes needed), ``(end, addrs)``, or ``ProxyHeaderError``."""
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    if not data:
        return None
    first = data[0]
    if first == 0x50:           # "P": version 1
        return _parse_v1(data)
    if first == 0x0D:           # CR: the version 2 signature
        return _parse_v2(data)
    raise ProxyHeaderError(f"no PROXY protocol header: the connection starts with {_start(data)}")


# ---------------------------------------------------------------- version 1

def _parse_v1(data):
    if len(data) < 6:
        if _V1_PREFIX.startswith(data):
            return None
        raise ProxyHeaderError(f"no PROXY protocol header: the connection starts with "
                               f"{_start(data)}")
    if data[:6] != _V1_PREFIX:
        raise ProxyHeaderError(f"no PROXY protocol header: the connection starts with "
                               f"{_start(data)}")
    lf = data.find(b"\n", 0, PROXY_V1_MAX)
    if lf < 0:
        if len(data) >= PROXY_V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {PROXY_V1_MAX} bytes")
        if data.find(b"\r", 0, len(data) - 1) >= 0:
            raise ProxyHeaderError("PROXY v1 line with a CR not followed by LF")
        return None
    if data[lf - 1] != 0x0D:
        raise ProxyHeaderError("PROXY v1 line ends with a bare LF (CRLF expected)")
    line = data[6:lf - 1]
    if b"\r" in line:
        raise ProxyHeaderError("PROXY v1 line with a CR not followed by LF")
    end = lf + 1
    m = _V1_TCP4.fullmatch(data, 0, end)
    if m is not None:   # the common line, in one match (the rest says what is wrong)
        src, dst, sport, dport = m.group(1, 2, 3, 4)
        sport = int(sport)
        dport = int(dport)
        if sport <= 65535 and dport <= 65535:
            return end, (src.decode("ascii"), sport, dst.decode("ascii"), dport)
    parts = line.split(b" ")
    proto = parts[0]
    if proto == b"UNKNOWN":
        return end, None        # the rest of the line is to be ignored
    if proto == b"TCP4":
        family = socket.AF_INET
    elif proto == b"TCP6":
        family = socket.AF_INET6
    else:
        raise ProxyHeaderError(f"PROXY v1 protocol {_show(proto)} (TCP4, TCP6 or UNKNOWN "
                               "expected)")
    if len(parts) != 5:
        raise ProxyHeaderError(f"PROXY v1 {proto.decode()} line with {len(parts) - 1} "
                               "fields after the protocol (4 expected, one space apart)")
    src = _v1_address(parts[1], family, "source")
    dst = _v1_address(parts[2], family, "destination")
    sport = _v1_port(parts[3], "source")
    dport = _v1_port(parts[4], "destination")
    return end, (src, sport, dst, dport)


def _v1_address(text, family, which):
    if family == socket.AF_INET:
        if _IPV4.fullmatch(text):
            return text.decode("ascii")
        raise ProxyHeaderError(f"PROXY v1 {which} address {_show(text)} is not an IPv4 "
                               "address in canonical form")
    if _IPV6_CHARS.fullmatch(text):
        try:
            return socket.inet_ntop(socket.AF_INET6,
                                    socket.inet_pton(socket.AF_INET6, text.decode("ascii")))
        except OSError:
            pass
    raise ProxyHeaderError(f"PROXY v1 {which} address {_show(text)} is not an IPv6 address")


def _v1_port(text, which):
    port = int(text) if _PORT.fullmatch(text) else 65536
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 {which} port {_show(text)} is not a port "
                               "(0 to 65535, no leading zeros)")
    return port


# ---------------------------------------------------------------- version 2

def _parse_v2(data):
    n = len(data)
    k = 12 if n >= 12 else n
    if data[:k] != V2_SIGNATURE[:k]:
        raise ProxyHeaderError(f"no PROXY protocol header (not the v2 signature): the "
                               f"connection starts with {_start(data)}")
    if n < 16:
        return None
    _, ver_cmd, fam, length = _V2_HEAD.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header of version {ver_cmd >> 4} (2 expected)")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 command {command} (0, LOCAL, or 1, PROXY, expected)")
    family, proto = fam >> 4, fam & 0x0F
    if family > 3 or proto > 2:
        raise ProxyHeaderError(f"PROXY v2 address family and protocol 0x{fam:02x} are "
                               "not defined")
    end = 16 + length
    if end > PROXY_V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {end} bytes (at most {PROXY_V2_MAX})")
    need = _V2_NEED.get(family, 0)
    if command == 1 and length < need:
        raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes: family "
                               f"0x{fam:02x} needs {need}")
    if n < end:
        return None
    if command == 0 or proto != 1 or family == 0 or family == 3:
        # LOCAL (the sender's own connection), or a family fastlb does not
        # relay for (UDP, UNIX, unspecified): the connection's own addresses
        return end, None
    if family == 1:
        src = socket.inet_ntop(socket.AF_INET, data[16:20])
        dst = socket.inet_ntop(socket.AF_INET, data[20:24])
        sport, dport = _V2_PORTS.unpack_from(data, 24)
    else:
        src = socket.inet_ntop(socket.AF_INET6, data[16:32])
        dst = socket.inet_ntop(socket.AF_INET6, data[32:48])
        sport, dport = _V2_PORTS.unpack_from(data, 48)
    return end, (src, sport, dst, dport)


# ---------------------------------------------------------------- writing

def _v6(ip):
    """``ip`` (an IPv4 or IPv6 address as a socket names it) as 16 bytes;
    IPv4 as an IPv4-mapped IPv6 address."""
    if ":" in ip:
        return socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    return b"\x00" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)


def proxy_header(version, addrs):
    """The header (bytes) that starts a connection made on behalf of a client:
    ``version`` 1 or 2, ``addrs`` ``(src_ip, src_port, dst_ip, dst_port)``
    (the client's address and the one it connected to), or None when they
    are not known (version 1 ``UNKNOWN``, version 2 ``LOCAL``). An IPv4
    address paired with an IPv6 one is sent IPv4-mapped (``TCP6``)."""
    if addrs is None:
        return local_proxy_header(version)
    src, sport, dst, dport = addrs
    v4 = ":" not in src and ":" not in dst
    if version == 1:
        if v4:
            return f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode("ascii")
        s6 = socket.inet_ntop(socket.AF_INET6, _v6(src))
        d6 = socket.inet_ntop(socket.AF_INET6, _v6(dst))
        return f"PROXY TCP6 {s6} {d6} {sport} {dport}\r\n".encode("ascii")
    if v4:
        return (V2_SIGNATURE + b"\x21\x11\x00\x0c" + socket.inet_pton(socket.AF_INET, src)
                + socket.inet_pton(socket.AF_INET, dst) + _V2_PORTS.pack(sport, dport))
    return V2_SIGNATURE + b"\x21\x21\x00\x24" + _v6(src) + _v6(dst) + _V2_PORTS.pack(sport, dport)


def local_proxy_header(version, addrs=None):
    """The header of a connection fastlb makes for itself (a health check):
    version 2 ``LOCAL``; version 1 has no such command, so, as the spec
    advises, the connection's own addresses ``addrs`` (local, then peer), or
    ``UNKNOWN`` when they are not given."""
    if version == 2:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    if addrs is None:
        return b"PROXY UNKNOWN\r\n"
    return proxy_header(1, addrs)
