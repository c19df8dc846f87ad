"""The Host authority and the request target's forms.

The pure twin of ``authorities.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from fastlb.errors import BadRequest
from fastlb.wire.characters import _DIGITS

# ---------------------------------------------------------------- authorities
#
# Host = uri-host [ ":" port ] (RFC 9110 7.2), uri-host = IP-literal / IPv4address
# / reg-name (RFC 3986 3.2.2). IPv4address is a reg-name too, so two checks do:
# an IP-literal in brackets (IPv6address or IPvFuture), or a reg-name of
# unreserved, pct-encoded and sub-delims bytes -- except ",", the list separator
# of field values: "Host: a,b" is what two Host lines joined by an intermediary
# look like (RFC 9110 5.3), and Host is a singleton. The port is digits, at
# most 65535, and may be empty (RFC 3986 3.2.3: "x:" is valid, it means "x").

_REG_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;="
_REG_NAME = frozenset(_REG_NAME_BYTES)
_HEXDIGIT = frozenset(b"0123456789abcdefABCDEF")


def _valid_port(port):
    if not port.isdigit():  # ASCII digits only (bytes)
        return not port
    digits = port.lstrip(b"0")
    return len(digits) <= 5 and (not digits or int(digits) <= 65535)


def _valid_ipv4(s):
    parts = s.split(b".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not 1 <= len(part) <= 3 or not all(c in _DIGITS for c in part):
            return False
        if (len(part) > 1 and part[0] == 0x30) or int(part) > 255:
            return False
    return True


def _valid_ipv6(s):
    """RFC 3986 IPv6address: 8 groups of 1-4 hex digits, or fewer with one "::";
    the last two may be an IPv4address."""
    n = len(s)
    i = 0
    groups = 0
    compressed = False
    if s[:2] == b"::":
        compressed = True
        i = 2
        if i == n:
            return True
    elif s[:1] == b":":
        return False
    while True:
        j = i
        while j < n and s[j] in _HEXDIGIT:
            j += 1
        if j < n and s[j] == 0x2E:  # '.': the IPv4 tail
            if not _valid_ipv4(s[i:]):
                return False
            groups += 2
            break
        if j == i or j - i > 4:
            return False
        groups += 1
        i = j
        if i == n:
            break
        if s[i] != 0x3A:
            return False
        i += 1
        if i < n and s[i] == 0x3A:
            if compressed:
                return False
            compressed = True
            i += 1
            if i == n:
                break
        elif i == n:
            return False
    return groups < 8 if compressed else groups == 8


def _valid_ipvfuture(s):
    # "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
    if len(s) < 4 or s[0] not in b"vV":
        return False
    dot = s.find(b".", 1)
    if dot < 2 or dot + 1 == len(s):
        return False
    return (all(c in _HEXDIGIT for c in s[1:dot])
            and all(c in _REG_NAME or c == 0x3A for c in s[dot + 1:]))


def _valid_authority(a):
    """Whether ``a`` is ``uri-host [":" port]`` with a non-empty host (see above)."""
    if a[:1] == b"[":
        close = a.find(b"]")
        if close < 0:
            return False
        inner = a[1:close]
        if not (_valid_ipv6(inner) or _valid_ipvfuture(inner)):
            return False
        rest = a[close + 1:]
        return not rest or (rest[0] == 0x3A and _valid_port(rest[1:]))
    colon = a.find(b":")
    host = a if colon < 0 else a[:colon]
    if not host:
        return False
    if host.translate(None, _REG_NAME_BYTES):
        # not only reg-name bytes: the others must be pct-encoded octets
        i = 0
        n = len(host)
        while i < n:
            c = host[i]
            if c == 0x25:  # '%' HEXDIG HEXDIG
                if i + 3 > n or host[i + 1] not in _HEXDIGIT or host[i + 2] not in _HEXDIGIT:
                    return False
                i += 3
            elif c in _REG_NAME:
                i += 1
            else:
                return False
    return colon < 0 or _valid_port(a[colon + 1:])


def _split_target(target):
    """``(authority, path)`` of a request target: ``(None, target)`` for the
    origin form ("/...") and the asterisk form ("*"); for the absolute form
    ("http://authority/path?query", http or https, any case) the authority and
    the origin-form rest ("/" when the path is empty). Anything else, an
    empty or invalid authority (userinfo included) is a 400."""
    if target[:1] == b"/" or target == b"*":
        return None, target
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        start = 7
    elif scheme.startswith(b"https://"):
        start = 8
    else:
        raise BadRequest("invalid request target")
    end = start
    n = len(target)
    while end < n and target[end] not in b"/?#":
        end += 1
    authority = target[start:end]
    if not _valid_authority(authority):
        raise BadRequest("invalid request target")
    path = target[end:]
    if path[:1] != b"/":
        path = b"/" + path
    return authority, path


def _as_bytes(o, what):
    if type(o) is bytes:
        return o
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o)
    raise TypeError(f"{what} must be bytes, not {type(o).__name__}")
