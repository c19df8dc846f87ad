"""Pure-Python core: the reference the compiled ``_core.pyx`` must match.

Everything here is per-request, CPU-only and I/O-free:

* the backend selectors ``RoundRobin``, ``WeightedRoundRobin``,
  ``LeastConn``, ``P2C``, ``Random`` and ``Maglev``. Selectors work on
  integer indices (0..n-1), weights, an eligibility mask and in-flight
  counts; they never see Backend objects. Every selector has the same
  surface: ``select(key=b"") -> int`` (-1 when no backend is eligible;
  Maglev: -2 for an empty key), ``select_excluding(exclude, key=b"")`` (the
  same pick among the backends not in ``exclude``: what retries use),
  ``release(idx)``, ``set_eligible(idx, ok)``,
  ``is_eligible(idx)``, ``set_weight(idx, w)``, ``in_flight(idx)`` and
  ``n`` (see the "selection" section), all subclasses of ``Selector``.
  Walks over ineligible backends are bounded by ``n`` (Maglev: by its table
  size). ``pick_many`` runs n picks (select + release) in a row.
* ``hash64`` (XXH64) and ``hash_key`` (the bytes of a request to hash).
* ``parse_request_head``: validates a raw request head strictly (the Host
  authority and the target's form included) and returns a ``RequestHead``:
  method, target, version, host, path, framing, and the hash key if asked;
  ``write_request_head`` writes the head sent upstream for the chosen
  backend (hop-by-hop fields removed, X-Forwarded-*, Via, Host). The caller
  selects a backend between the two, so invalid requests never reach the
  selector.
* ``rewrite_response_head``: the same for a backend's response head.
* ``ChunkedScanner``: finds where a chunked body ends, strictly, and can
  de-chunk it for HTTP/1.0 clients.
* ``access_log_line``: one access log line (combined or JSON), escaped;
  ``AccessLogBuffer``: a batch of them, the form the data path uses.

Invalid client input raises ``BadRequest`` (``.status`` says 400 or 501);
invalid backend input raises ``BadGateway``. Both twins raise the same
exception for the same input.
"""
from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    KEY_COOKIE,
    KEY_HEADER,
    KEY_NONE,
    KEY_PATH,
    KEY_QUERY,
    MAX_CHUNK_SIZE_DIGITS,
    MAX_CONTENT_LENGTH,
    REQ_EXPECT_CONTINUE,
    REQ_HEAD,
    REQ_HTTP10,
    REQ_IDEMPOTENT,
    REQ_KEEP_ALIVE,
    RESP_CLIENT_KEEP_ALIVE,
    RESP_DECHUNK,
    RESP_INFORMATIONAL,
    RESP_UPSTREAM_KEEP_ALIVE,
    BadGateway,
    BadRequest,
)
from bisect import bisect_right as _bisect_right
from operator import index as _index
import re as _re

__all__ = [
    "Selector",
    "RoundRobin",
    "WeightedRoundRobin",
    "LeastConn",
    "P2C",
    "Random",
    "Maglev",
    "hash64",
    "hash_key",
    "ChunkedScanner",
    "RequestHead",
    "parse_request_head",
    "write_request_head",
    "rewrite_response_head",
    "find_head_end",
    "pick_many",
    "access_log_line",
    "AccessLogBuffer",
]

# ---------------------------------------------------------------- characters

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# field-value bytes: HTAB, SP, VCHAR, obs-text
_VCHAR = frozenset([9] + list(range(0x20, 0x7F)) + list(range(0x80, 0x100)))
# request-target: visible ASCII and obs-text; no SP, no controls
_TARGET = frozenset(list(range(0x21, 0x7F)) + list(range(0x80, 0x100)))
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_DIGITS = frozenset(b"0123456789")

# Fields removed by every hop (RFC 9110 7.6.1), besides those named in Connection.
# Trailer is not one (RFC 9110 6.6.2): it is kept exactly when the message is
# sent on chunked, with its trailer section.
_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te",
     b"transfer-encoding", b"upgrade"]
)
# Connection may name these, but removing them would change the framing or
# routing of the message, so they are kept.
_PROTECTED = frozenset([b"host", b"content-length"])
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"])
_OWS = b" \t"

# Header kinds (the compiled core switches on the same numbers).
_H_OTHER = 0
_H_HOST = 1
_H_CONTENT_LENGTH = 2
_H_TRANSFER_ENCODING = 3
_H_CONNECTION = 4
_H_HOP = 5
_H_XFF = 6
_H_XF_REPLACED = 7
_H_EXPECT = 8
_H_TRAILER = 9

_KINDS = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"keep-alive": _H_HOP,
    b"proxy-connection": _H_HOP,
    b"te": _H_HOP,
    b"trailer": _H_TRAILER,
    b"upgrade": _H_HOP,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_XF_REPLACED,
    b"x-forwarded-host": _H_XF_REPLACED,
    b"expect": _H_EXPECT,
}


def _is_token(b):
    return len(b) > 0 and all(c in _TCHAR for c in b)


def _parse_length(value, exc):
    if not value or len(value) > 19 or not all(c in _DIGITS for c in value):
        raise exc("invalid Content-Length")
    n = int(value)
    if n > MAX_CONTENT_LENGTH:
        raise exc("Content-Length too large")
    return n


def _split_fields(head, start, exc):
    """Yield (name, lowercase name, value) for each field line of ``head`` from ``start``.

    ``head`` ends with CRLF CRLF. Lines must end with CRLF; names are tokens
    with no whitespace before the colon; values hold no control bytes but HTAB;
    obs-fold is refused.
    """
    end = len(head) - 2
    pos = start
    while pos < end:
        eol = head.find(b"\r\n", pos)
        line = head[pos:eol]
        colon = line.find(b":")
        if colon <= 0:
            raise exc("invalid header line")
        name = line[:colon]
        if not _is_token(name):
            raise exc("invalid header name")
        value = line[colon + 1:].strip(_OWS)
        for c in value:
            if c not in _VCHAR:
                raise exc("invalid byte in header value")
        yield name, name.lower(), value
        pos = eol + 2


def _connection_tokens(value):
    return [t.strip(_OWS).lower() for t in value.split(b",") if t.strip(_OWS)]


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


# ---------------------------------------------------------------- requests


class RequestHead:
    """A validated request head, as ``parse_request_head`` returns it.

    ``method``, ``target`` and ``version`` are the request line's parts;
    ``host`` the validated authority the request is for (from an absolute-form
    target, else the Host field; b"" for an empty Host, None for an HTTP/1.0
    request without either); ``path`` the target in origin form (the target
    itself unless it was absolute: then the part after the authority, "/" when
    empty); ``flags`` an OR of ``REQ_*``; ``framing`` ``BODY_NONE``,
    ``BODY_LENGTH`` (``length`` bytes) or ``BODY_CHUNKED``; ``key`` the hash
    key asked for (b"" when absent or none was asked for). Only
    ``parse_request_head`` makes them; ``write_request_head`` writes one.
    """

    __slots__ = ("method", "target", "version", "host", "path", "flags", "framing", "length",
                 "key", "_line", "_fields", "_xff", "_host_field", "_chunked", "_http10")

    def __init__(self):
        raise TypeError("RequestHead objects are made by parse_request_head")


def _path_key(path):
    end = len(path)
    for sep in (b"?", b"#"):
        j = path.find(sep)
        if 0 <= j < end:
            end = j
    return path[:end]


def _query_value(target, name):
    """The raw value of the first query parameter ``name`` of ``target``; b"" when absent."""
    q = target.find(b"?")
    if q < 0:
        return b""
    qs = target[q + 1:]
    j = qs.find(b"#")
    if j >= 0:
        qs = qs[:j]
    for piece in qs.split(b"&"):
        eq = piece.find(b"=")
        if eq < 0:
            if piece == name:
                return b""
        elif piece[:eq] == name:
            return piece[eq + 1:]
    return b""


def _cookie_value(value, name):
    """The value of cookie ``name`` in one Cookie field value, or None when it has none."""
    for piece in value.split(b";"):
        eq = piece.find(b"=")
        if eq >= 0 and piece[:eq].strip(_OWS) == name:
            return piece[eq + 1:].strip(_OWS)
    return None


def parse_request_head(head, key_kind=KEY_NONE, key_name=b""):
    """Validate a request head strictly and return a ``RequestHead``.

    ``head`` is the raw head, request line to the blank line inclusive.
    ``key_kind`` (``KEY_*``) and ``key_name`` say which hash key to extract
    into ``RequestHead.key`` (see ``hash_key``, which gives the same bytes).
    Raises ``BadRequest`` (status 400, or 501 for an unsupported transfer
    coding) for any invalid or ambiguous head: request line, target form and
    authority, field syntax, Host (missing on HTTP/1.1, duplicate, invalid),
    Content-Length, Transfer-Encoding.
    """
    head = _as_bytes(head, "head")
    key_kind = _index(key_kind)
    if key_kind not in (KEY_NONE, KEY_PATH, KEY_QUERY, KEY_HEADER, KEY_COOKIE):
        raise ValueError(f"unknown key kind: {key_kind!r}")
    if key_kind > KEY_PATH:
        if type(key_name) is not bytes:
            raise TypeError("key_name must be bytes")
        if not key_name:
            raise ValueError("this key kind needs a key_name")
    if len(head) < 4 or head[-4:] != b"\r\n\r\n":
        raise BadRequest("incomplete request head")
    eol = head.find(b"\r\n")
    line = head[:eol]
    sp1 = line.find(b" ")
    sp2 = line.rfind(b" ")
    if sp1 <= 0 or sp2 <= sp1 + 1:
        raise BadRequest("invalid request line")
    method = line[:sp1]
    target = line[sp1 + 1:sp2]
    version = line[sp2 + 1:]
    if not _is_token(method):
        raise BadRequest("invalid method")
    for c in target:
        if c not in _TARGET:
            raise BadRequest("invalid request target")
    if version == b"HTTP/1.1":
        http10 = False
    elif version == b"HTTP/1.0":
        http10 = True
    else:
        raise BadRequest("unsupported HTTP version")
    authority, path = _split_target(target)

    fields = list(_split_fields(head, eol + 2, BadRequest))
    host = None
    length = -1
    chunked = False
    te_seen = False
    conn_close = False
    conn_keep_alive = False
    expect_continue = False
    drop = None
    xff = []
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_HOST:
            if host is not None:
                raise BadRequest("duplicate Host")
            if value and not _valid_authority(value):
                raise BadRequest("invalid Host")
            host = value
        elif kind == _H_CONTENT_LENGTH:
            if length >= 0:
                raise BadRequest("duplicate Content-Length")
            length = _parse_length(value, BadRequest)
        elif kind == _H_TRANSFER_ENCODING:
            if http10:
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if te_seen:
                raise BadRequest("duplicate Transfer-Encoding")
            te_seen = True
            if value.lower() != b"chunked":
                raise BadRequest("unsupported transfer coding", 501)
            chunked = True
        elif kind == _H_CONNECTION:
            for tok in _connection_tokens(value):
                if tok == b"close":
                    conn_close = True
                elif tok == b"keep-alive":
                    conn_keep_alive = True
                elif tok not in _PROTECTED:
                    if drop is None:
                        drop = set()
                    drop.add(tok)
        elif kind == _H_XFF:
            if value:  # an empty X-Forwarded-For adds no empty element
                xff.append(value)
        elif kind == _H_EXPECT:
            if value.lower() == b"100-continue":
                expect_continue = True
    if chunked and length >= 0:
        raise BadRequest("both Content-Length and Transfer-Encoding")
    if host is None and not http10:
        raise BadRequest("missing Host")

    flags = 0
    if http10:
        flags |= REQ_HTTP10
        if conn_keep_alive and not conn_close:
            flags |= REQ_KEEP_ALIVE
    elif not conn_close:
        flags |= REQ_KEEP_ALIVE
    if method == b"HEAD":
        flags |= REQ_HEAD
    if method in _IDEMPOTENT:
        flags |= REQ_IDEMPOTENT
    if expect_continue and not http10:
        flags |= REQ_EXPECT_CONTINUE

    r = object.__new__(RequestHead)
    r.method = method
    r.target = target
    r.version = version
    # RFC 9112 3.2.2: an absolute-form target's authority overrides Host
    r.host = host if authority is None else authority
    r.path = path
    r.flags = flags
    r.framing = BODY_CHUNKED if chunked else (BODY_LENGTH if length > 0 else BODY_NONE)
    r.length = length if length > 0 else 0
    r.key = b""
    r._line = method + b" " + path + b" HTTP/1.1\r\n"
    r._host_field = host is not None
    r._chunked = chunked
    r._http10 = http10
    r._xff = xff
    out = r._fields = []
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_OTHER:
            if drop is not None and lname in drop:
                continue
        elif kind == _H_EXPECT:
            if http10 or (drop is not None and lname in drop):
                continue
        elif kind == _H_TRAILER:
            # announces trailers: kept when they are relayed, i.e. the body is chunked
            if not chunked or (drop is not None and lname in drop):
                continue
        elif kind == _H_HOST:
            value = r.host
        elif kind != _H_CONTENT_LENGTH:
            continue
        out.append((name, value))

    if key_kind == KEY_PATH:
        r.key = _path_key(path)
    elif key_kind == KEY_QUERY:
        r.key = _query_value(target, key_name)
    elif key_kind == KEY_HEADER:
        want = key_name.lower()
        for name, lname, value in fields:
            if lname == want:
                r.key = value
                break
    elif key_kind == KEY_COOKIE:
        for name, lname, value in fields:
            if lname == b"cookie":
                v = _cookie_value(value, key_name)
                if v is not None:
                    r.key = v
                    break
    return r


def write_request_head(parsed, client_ip, proto=b"http", via=b"fastlb", backend_authority=b""):
    """The head to send upstream for ``parsed`` (a ``RequestHead``), as HTTP/1.1.

    The request line with the target in origin form; the fields in their
    order, without the hop-by-hop ones and those named in Connection, and
    with ``Host`` set to ``parsed.host``; ``backend_authority`` as Host for an
    HTTP/1.0 request that had none (``None`` or empty: no Host); then
    ``Transfer-Encoding: chunked`` for a chunked body, ``X-Forwarded-For``
    (the client's list with ``client_ip`` appended), ``X-Forwarded-Proto:
    proto``, ``X-Forwarded-Host`` (``parsed.host``, when not empty) and
    ``Via: 1.1 via`` (1.0 for HTTP/1.0 clients; ``None`` or empty: no Via).
    """
    if type(parsed) is not RequestHead:
        raise TypeError(f"parsed must be a RequestHead, not {type(parsed).__name__}")
    client_ip = _as_bytes(client_ip, "client_ip")
    proto = _as_bytes(proto, "proto")
    via = b"" if via is None else _as_bytes(via, "via")
    backend_authority = b"" if backend_authority is None else _as_bytes(backend_authority,
                                                                         "backend_authority")
    host = parsed.host
    out = [parsed._line]
    for name, value in parsed._fields:
        out += (name, b": ", value, b"\r\n")
    if not parsed._host_field:
        if host is not None:
            out += (b"Host: ", host, b"\r\n")
        elif backend_authority:
            out += (b"Host: ", backend_authority, b"\r\n")
    if parsed._chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(b"X-Forwarded-For: ")
    for v in parsed._xff:
        out += (v, b", ")
    out += (client_ip, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
    if host:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    if via:
        out += (b"Via: 1.0 " if parsed._http10 else b"Via: 1.1 ", via, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


# ---------------------------------------------------------------- responses

def rewrite_response_head(head, req_flags):
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    ``req_flags`` are the flags of the request this answers (``REQ_HEAD``,
    ``REQ_HTTP10``, ``REQ_KEEP_ALIVE``; clear ``REQ_KEEP_ALIVE`` to make
    fastlb close the client connection after this response). ``out`` is the
    head to send the client, as HTTP/1.1. ``flags`` is an OR of ``RESP_*``.
    """
    if len(head) < 4 or head[-4:] != b"\r\n\r\n":
        raise BadGateway("incomplete response head")
    eol = head.find(b"\r\n")
    line = head[:eol]
    if len(line) < 12 or line[:7] != b"HTTP/1." or line[7] not in b"01" or line[8] != 0x20:
        raise BadGateway("invalid status line")
    http10 = line[7] == 0x30
    code = line[9:12]
    if not all(c in _DIGITS for c in code) or (len(line) > 12 and line[12] != 0x20):
        raise BadGateway("invalid status code")
    for c in line[13:]:
        if c not in _VCHAR:
            raise BadGateway("invalid reason phrase")
    status = int(code)
    if status < 100:
        raise BadGateway("invalid status code")
    if status == 101:
        raise BadGateway("unexpected protocol switch")

    fields = list(_split_fields(head, eol + 2, BadGateway))
    length = -1
    chunked = False
    te_seen = False
    conn_close = False
    conn_keep_alive = False
    drop = None
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_CONTENT_LENGTH:
            n = _parse_length(value, BadGateway)
            if length >= 0 and n != length:
                raise BadGateway("conflicting Content-Length")
            length = n
        elif kind == _H_TRANSFER_ENCODING:
            if te_seen:
                raise BadGateway("duplicate Transfer-Encoding")
            te_seen = True
            if value.lower() != b"chunked":
                raise BadGateway("unsupported transfer coding")
            chunked = True
        elif kind == _H_CONNECTION:
            for tok in _connection_tokens(value):
                if tok == b"close":
                    conn_close = True
                elif tok == b"keep-alive":
                    conn_keep_alive = True
                elif tok not in _PROTECTED:
                    if drop is None:
                        drop = set()
                    drop.add(tok)
    if chunked and length >= 0:
        raise BadGateway("both Content-Length and Transfer-Encoding")

    client_http10 = req_flags & REQ_HTTP10
    flags = 0
    if status < 200:
        flags |= RESP_INFORMATIONAL
        framing = BODY_NONE
    elif req_flags & REQ_HEAD or status == 204 or status == 304:
        framing = BODY_NONE
    elif chunked:
        framing = BODY_CHUNKED
    elif length >= 0:
        framing = BODY_LENGTH if length > 0 else BODY_NONE
    else:
        framing = BODY_CLOSE
    if framing != BODY_CLOSE and not conn_close and (conn_keep_alive or not http10):
        flags |= RESP_UPSTREAM_KEEP_ALIVE
    dechunk = framing == BODY_CHUNKED and client_http10
    if dechunk:
        flags |= RESP_DECHUNK
    if (req_flags & REQ_KEEP_ALIVE) and framing != BODY_CLOSE and not dechunk:
        flags |= RESP_CLIENT_KEEP_ALIVE

    out = [b"HTTP/1.1", line[8:], b"\r\n"]
    # the trailers are relayed, and announced by Trailer, when the body goes on chunked
    chunked_out = chunked and not client_http10
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_TRANSFER_ENCODING or kind == _H_CONNECTION or kind == _H_HOP:
            continue
        if kind == _H_TRAILER and not chunked_out:
            continue
        if drop is not None and lname in drop:
            continue
        out += (name, b": ", value, b"\r\n")
    if chunked_out:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            out.append(b"Connection: close\r\n")
        elif client_http10:
            out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), status, flags, framing, (length if length > 0 else 0)


# ---------------------------------------------------------------- chunked bodies

_S_SIZE = 0
_S_EXT = 1
_S_SIZE_LF = 2
_S_DATA = 3
_S_DATA_CR = 4
_S_DATA_LF = 5
_S_TRAILER_START = 6
_S_TRAILER_NAME = 7
_S_TRAILER_VALUE = 8
_S_TRAILER_LF = 9
_S_END_LF = 10
_S_DONE = 11

_MAX_SIZE = 1 << 60          # a chunk is smaller (15 hex digits without leading zeros)
_MAX_LINE = 4096            # a chunk-size line with its extensions
_MAX_TRAILERS = 16384       # the whole trailer section


class ChunkedScanner:
    """Finds the end of a chunked body, strictly, across any split of the input.

    ``scan(data, start)`` consumes ``data[start:]`` and returns the index just
    past the end of the body when the body ends inside ``data``, else -1.
    The caller forwards ``data[start:end]`` untouched, unless ``decode`` is
    set: then the chunk payloads are appended to ``payload`` (a list the
    caller empties) and trailers are dropped. ``exc`` is raised on any
    framing error (bad size, missing CRLF, bare LF, control bytes, overlong
    lines or trailers). A chunk size may have leading zeros, up to
    ``MAX_CHUNK_SIZE_DIGITS`` hex digits in all ("chunk size too long"), and
    must be below 2**60 ("chunk size too large").
    """

    __slots__ = ("decode", "payload", "_exc", "_state", "_size", "_digits", "_line")

    def __init__(self, decode=False, exc=BadRequest):
        self.decode = decode
        self.payload = []
        self._exc = exc
        self._state = _S_SIZE
        self._size = 0
        self._digits = 0
        self._line = 0

    @property
    def done(self):
        return self._state == _S_DONE

    def scan(self, data, start=0):
        n = len(data)
        i = start
        state = self._state
        exc = self._exc
        if state == _S_DONE:
            return start
        if start < 0:
            raise ValueError("start must not be negative")
        try:
            while i < n:
                if state == _S_DATA:
                    take = min(self._size, n - i)
                    if self.decode:
                        chunk = data[i:i + take]
                        if type(chunk) is not bytes:
                            # bytes, never a view of (or a copy typed like) the caller's buffer
                            chunk = bytes(chunk)
                        self.payload.append(chunk)
                    i += take
                    self._size -= take
                    if self._size == 0:
                        state = _S_DATA_CR
                    continue
                c = data[i]
                i += 1
                if state == _S_SIZE:
                    v = _HEX.get(c)
                    if v is not None:
                        # leading zeros are valid (RFC 9112 7.1); the field's length is bounded
                        self._digits += 1
                        if self._digits > MAX_CHUNK_SIZE_DIGITS:
                            raise exc("chunk size too long")
                        self._size = self._size * 16 + v
                        if self._size >= _MAX_SIZE:
                            raise exc("chunk size too large")
                    elif self._digits == 0:
                        raise exc("invalid chunk size")
                    elif c == 0x3B:  # ';'
                        state = _S_EXT
                        self._line = self._digits + 1
                    elif c == 0x0D:
                        state = _S_SIZE_LF
                    else:
                        raise exc("invalid chunk size")
                elif state == _S_EXT:
                    if c == 0x0D:
                        state = _S_SIZE_LF
                    elif c not in _VCHAR:
                        raise exc("invalid chunk extension")
                    else:
                        self._line += 1
                        if self._line > _MAX_LINE:
                            raise exc("chunk extension too long")
                elif state == _S_SIZE_LF:
                    if c != 0x0A:
                        raise exc("missing LF after chunk size")
                    self._digits = 0
                    if self._size == 0:
                        state = _S_TRAILER_START
                        self._line = 0
                    else:
                        state = _S_DATA
                elif state == _S_DATA_CR:
                    if c != 0x0D:
                        raise exc("missing CRLF after chunk data")
                    state = _S_DATA_LF
                elif state == _S_DATA_LF:
                    if c != 0x0A:
                        raise exc("missing CRLF after chunk data")
                    state = _S_SIZE
                else:
                    # trailer section; _line counts its bytes
                    self._line += 1
                    if self._line > _MAX_TRAILERS:
                        raise exc("trailers too large")
                    if state == _S_TRAILER_START:
                        if c == 0x0D:
                            state = _S_END_LF
                        elif c in _TCHAR:
                            state = _S_TRAILER_NAME
                        else:
                            raise exc("invalid trailer")
                    elif state == _S_TRAILER_NAME:
                        if c == 0x3A:  # ':'
                            state = _S_TRAILER_VALUE
                        elif c not in _TCHAR:
                            raise exc("invalid trailer name")
                    elif state == _S_TRAILER_VALUE:
                        if c == 0x0D:
                            state = _S_TRAILER_LF
                        elif c not in _VCHAR:
                            raise exc("invalid byte in trailer")
                    elif state == _S_TRAILER_LF:
                        if c != 0x0A:
                            raise exc("missing LF after trailer")
                        state = _S_TRAILER_START
                    else:  # _S_END_LF
                        if c != 0x0A:
                            raise exc("missing LF after last chunk")
                        self._state = _S_DONE
                        return i
        finally:
            if self._state != _S_DONE:
                self._state = state
        return -1


# ---------------------------------------------------------------- hashing

_M64 = 0xFFFFFFFFFFFFFFFF
_XP1 = 0x9E3779B185EBCA87
_XP2 = 0xC2B2AE3D27D4EB4F
_XP3 = 0x165667B19E3779F9
_XP4 = 0x85EBCA77C2B2AE63
_XP5 = 0x27D4EB2F165667C5


def _xround(acc, lane):
    acc = (acc + lane * _XP2) & _M64
    acc = ((acc << 31) | (acc >> 33)) & _M64
    return (acc * _XP1) & _M64


def _xmerge(h, v):
    h ^= _xround(0, v)
    return (h * _XP1 + _XP4) & _M64


def hash64(data, seed=0):
    """XXH64 of ``data`` (bytes) with ``seed`` (taken modulo 2**64): an int in [0, 2**64).

    The hash of backend names and request keys (``Maglev``); it never changes
    between releases (golden vectors in the tests).
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    seed &= _M64
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + _XP1 + _XP2) & _M64
        v2 = (seed + _XP2) & _M64
        v3 = seed
        v4 = (seed - _XP1) & _M64
        limit = n - 32
        while p <= limit:
            v1 = _xround(v1, int.from_bytes(data[p:p + 8], "little"))
            v2 = _xround(v2, int.from_bytes(data[p + 8:p + 16], "little"))
            v3 = _xround(v3, int.from_bytes(data[p + 16:p + 24], "little"))
            v4 = _xround(v4, int.from_bytes(data[p + 24:p + 32], "little"))
            p += 32
        h = (((v1 << 1) | (v1 >> 63)) + ((v2 << 7) | (v2 >> 57))
             + ((v3 << 12) | (v3 >> 52)) + ((v4 << 18) | (v4 >> 46))) & _M64
        h = _xmerge(h, v1)
        h = _xmerge(h, v2)
        h = _xmerge(h, v3)
        h = _xmerge(h, v4)
    else:
        h = (seed + _XP5) & _M64
    h = (h + n) & _M64
    while p + 8 <= n:
        h ^= _xround(0, int.from_bytes(data[p:p + 8], "little"))
        h = ((((h << 27) | (h >> 37)) & _M64) * _XP1 + _XP4) & _M64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * _XP1) & _M64
        h = ((((h << 23) | (h >> 41)) & _M64) * _XP2 + _XP3) & _M64
        p += 4
    while p < n:
        h ^= (data[p] * _XP5) & _M64
        h = ((((h << 11) | (h >> 53)) & _M64) * _XP1) & _M64
        p += 1
    h ^= h >> 33
    h = (h * _XP2) & _M64
    h ^= h >> 29
    h = (h * _XP3) & _M64
    h ^= h >> 32
    return h


# ---------------------------------------------------------------- hash keys

_HASH_KINDS = ("path", "query", "header", "cookie")


def _request_target(head):
    eol = head.find(b"\r\n")
    if eol < 0:
        eol = len(head)
    line = head[:eol]
    sp1 = line.find(b" ")
    sp2 = line.rfind(b" ")
    if sp1 < 0 or sp2 <= sp1:
        return b"", eol
    return line[sp1 + 1:sp2], eol


def hash_key(head, kind, name=b""):
    """The bytes a hash-based balancer hashes, taken from a raw request head; b"" when absent.

    ``head`` is the raw request head (request line to the blank line). ``kind``:

    * ``"path"``: the path of the request target, without query or fragment
      (for an absolute-form target, the part from the first "/" after the
      authority, "/" when there is none); ``name`` is ignored;
    * ``"query"``: the raw value of the first query parameter called ``name``
      (exact match; a parameter without "=" has the value b"");
    * ``"header"``: the value of the first header field called ``name``
      (ASCII case-insensitive), OWS-trimmed;
    * ``"cookie"``: the value of the first cookie called ``name`` (exact match)
      in the Cookie field(s), in order; pairs split on ";", name and value
      OWS-trimmed, pairs without "=" skipped, quotes kept.

    ``name`` is bytes (a str is encoded as Latin-1). Raises TypeError when
    ``head`` is not bytes, ValueError for an unknown ``kind`` or an empty
    ``name`` where one is needed. Never validates the head: any bytes give
    an answer.
    """
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    if kind not in _HASH_KINDS:
        raise ValueError(f"unknown hash key kind: {kind!r}")
    if isinstance(name, str):
        name = name.encode("latin-1")
    elif type(name) is not bytes:
        raise TypeError("name must be bytes or str")
    if kind != "path" and not name:
        raise ValueError(f"a {kind} hash key needs a name")
    target, eol = _request_target(head)
    if kind == "path":
        path = _path_key(target)
        if not path.startswith(b"/"):
            j = path.find(b"://")
            if j >= 0:
                s = path.find(b"/", j + 3)
                path = path[s:] if s >= 0 else b"/"
        return path
    if kind == "query":
        return _query_value(target, name)
    want = b"cookie" if kind == "cookie" else name.lower()
    n = len(head)
    pos = eol + 2
    while pos < n:
        e = head.find(b"\r\n", pos)
        if e < 0:
            e = n
        if e == pos:
            break
        line = head[pos:e]
        colon = line.find(b":")
        if colon > 0 and line[:colon].lower() == want:
            value = line[colon + 1:].strip(_OWS)
            if kind == "header":
                return value
            v = _cookie_value(value, name)
            if v is not None:
                return v
        pos = e + 2
    return b""


# ---------------------------------------------------------------- selection
#
# Every selector works on integer indices (0..n-1) with a weight, an
# eligibility flag and an in-flight count per backend, and has the same
# surface: ``select(key=b"") -> int`` (a backend index; -1 when no backend is
# eligible; Maglev only: -2 for an empty key), ``release(idx)``,
# ``set_eligible(idx, ok)``, ``is_eligible(idx)``, ``set_weight(idx, w)``,
# ``in_flight(idx)`` and ``n``. A backend is *live* when it is eligible and
# its weight is above 0; only live backends are picked. Every select that
# returns ``idx >= 0`` counts one request in flight on ``idx``, and
# ``release(idx)`` ends one (never below 0).
#
# ``select_excluding(exclude, key=b"")`` is ``select`` with the backends in
# ``exclude`` (an iterable of indices, a set in the data path) taken out for
# this one pick, in the spirit of Pingora's ``select_with``: each algorithm runs
# its own logic over the remaining live backends (round robin goes on with its
# rotation, WRR runs its smooth pass over them only, least-conn takes the
# least loaded of them, p2c draws two of them, random draws among them by
# weight, Maglev walks its table from the key's entry past excluded backends),
# and -1 when none remains. With an empty ``exclude`` it is exactly ``select``
# (the same answer and the same state afterwards). Excluded backends' state is
# left as it is (WRR: their current weights are not touched). TypeError for an
# element that is not an integer, IndexError for one out of range.
#
# Derived state (usable lists,
# cumulative weights, the Maglev table) is rebuilt on set_weight and
# set_eligible only, never per request. Walks are bounded by ``n`` (Maglev:
# by ``table_size``).

_MAX_WEIGHT = 1000000
_MAX_TABLE = 1 << 24
_GOLDEN = 0x9E3779B97F4A7C15


def _check_weight(w):
    try:
        w = _index(w)
    except TypeError:
        raise TypeError(f"weight must be an integer, got {w!r}") from None
    if w < 0 or w > _MAX_WEIGHT:
        raise ValueError(f"weight must be between 0 and {_MAX_WEIGHT}, got {w}")
    return w


def _is_prime(m):
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    d = 3
    while d * d <= m:
        if m % d == 0:
            return False
        d += 2
    return True


class Selector:
    """The surface every selector shares: the base class of the six algorithms.

    Backends are indices 0..n-1 with a weight (an int, 0..1_000_000; 0: never
    picked), an eligibility flag (initially True) and a count of requests in
    flight. A backend is *live* when eligible with a weight above 0; only live
    backends are picked. Every ``select`` returning ``idx >= 0`` counts one
    request in flight on ``idx``; the caller calls ``release(idx)`` exactly
    once when that request ends. Out-of-range indices raise
    IndexError("backend index out of range"). ``select_excluding(exclude,
    key)`` is the same pick with the backends in ``exclude`` left out (a
    retry's pick: never a backend the request failed on). Subclasses override
    ``select`` and ``select_excluding`` (the compiled twin's ``Selector`` is
    declared in ``_core.pxd``, for compiled callers to cimport).
    """

    __slots__ = ("n", "_eligible", "_weight", "_inflight", "_live")

    def _setup(self, weights, checked=True):
        n = len(weights)
        if n == 0:
            raise ValueError("a balancer needs at least one backend")
        if checked:
            ws = [_check_weight(w) for w in weights]
        else:
            ws = [1 if w > 0 else 0 for w in weights]
        self.n = n
        self._weight = ws
        self._eligible = [True] * n
        self._inflight = [0] * n
        self._live = [w > 0 for w in ws]

    def _check(self, idx):
        if not 0 <= idx < self.n:
            raise IndexError("backend index out of range")

    def _changed(self):
        pass

    def select(self, key=b""):
        """A live backend's index (counted in flight), or -1 when none is live.

        ``key`` is ignored except by Maglev (which returns -2 for b"").
        """
        raise NotImplementedError(f"{type(self).__name__}.select")

    def select_excluding(self, exclude, key=b""):
        """As ``select``, among the live backends whose index is not in ``exclude``.

        ``exclude`` is an iterable of backend indices (the backends a request
        already failed on); -1 when every live backend is in it.
        """
        raise NotImplementedError(f"{type(self).__name__}.select_excluding")

    def _exclude(self, exclude):
        """Per backend: live and not in ``exclude``; and how many are."""
        mask = list(self._live)
        n = self.n
        for x in exclude:
            i = _index(x)
            if not 0 <= i < n:
                raise IndexError("backend index out of range")
            mask[i] = False
        return mask, mask.count(True)

    def release(self, idx):
        """End of one request on backend ``idx``: its in-flight count drops by 1 (never below 0)."""
        self._check(idx)
        if self._inflight[idx] > 0:
            self._inflight[idx] -= 1

    def in_flight(self, idx):
        """Requests in flight on backend ``idx`` (selected and not yet released)."""
        self._check(idx)
        return self._inflight[idx]

    def set_eligible(self, idx, ok):
        """Mark backend ``idx`` eligible or not (e.g. from health checks)."""
        self._check(idx)
        ok = bool(ok)
        if ok != self._eligible[idx]:
            self._eligible[idx] = ok
            self._live[idx] = ok and self._weight[idx] > 0
            self._changed()

    def is_eligible(self, idx):
        """Whether backend ``idx`` is eligible."""
        self._check(idx)
        return self._eligible[idx]

    def set_weight(self, idx, w):
        """Set backend ``idx``'s weight (an int, 0..1_000_000; 0: never picked); rebuilds tables."""
        self._check(idx)
        w = _check_weight(w)
        self._weight[idx] = w
        self._live[idx] = self._eligible[idx] and w > 0
        self._changed()


class RoundRobin(Selector):
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    Other weights are only "above 0" (use WeightedRoundRobin for shares).
    ``seed`` sets the first backend tried (``seed % n``), so runs repeat.
    """

    __slots__ = ("_next",)

    def __init__(self, weights, seed=0):
        self._setup(weights, checked=False)
        self._next = seed % self.n

    def select(self, key=b""):
        n = self.n
        i = self._next
        live = self._live
        for _ in range(n):
            if live[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1

    def select_excluding(self, exclude, key=b""):
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._next
        for _ in range(n):
            if live[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1


class WeightedRoundRobin(Selector):
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    Each pick adds every live backend's weight to its current weight, takes
    the highest (ties: the first in scan order, which starts at ``seed % n``)
    and subtracts the total live weight from it. set_weight resets the
    current weights; set_eligible leaves them (a backend coming back resumes).
    """

    __slots__ = ("_current", "_start")

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._current = [0] * self.n
        self._start = seed % self.n

    def set_weight(self, idx, w):
        Selector.set_weight(self, idx, w)
        self._current = [0] * self.n

    def select(self, key=b""):
        n = self.n
        i = self._start
        live = self._live
        weight = self._weight
        cur = self._current
        total = 0
        best = -1
        bestc = 0
        for _ in range(n):
            if live[i]:
                w = weight[i]
                c = cur[i] + w
                cur[i] = c
                total += w
                if best < 0 or c > bestc:
                    best = i
                    bestc = c
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        cur[best] = bestc - total
        self._inflight[best] += 1
        return best

    def select_excluding(self, exclude, key=b""):
        # nginx's pass over the peers not tried yet: excluded backends neither
        # gain their weight nor count in the total, so their current weights
        # stay as they were and the current weights still sum to what they did.
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._start
        weight = self._weight
        cur = self._current
        total = 0
        best = -1
        bestc = 0
        for _ in range(n):
            if live[i]:
                w = weight[i]
                c = cur[i] + w
                cur[i] = c
                total += w
                if best < 0 or c > bestc:
                    best = i
                    bestc = c
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        cur[best] = bestc - total
        self._inflight[best] += 1
        return best


class LeastConn(Selector):
    """Fewest requests in flight per unit of weight (in_flight / weight, compared exactly).

    Ties go to the first in rotation: the scan starts just after the last
    pick (at ``seed % n`` for the first one).
    """

    __slots__ = ("_next",)

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._next = seed % self.n

    def select(self, key=b""):
        n = self.n
        i = self._next
        live = self._live
        weight = self._weight
        inf = self._inflight
        best = -1
        bf = 0
        bw = 1
        for _ in range(n):
            if live[i]:
                f = inf[i]
                w = weight[i]
                if best < 0 or f * bw < bf * w:
                    best = i
                    bf = f
                    bw = w
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        self._next = best + 1 if best + 1 < n else 0
        inf[best] += 1
        return best

    def select_excluding(self, exclude, key=b""):
        live, _ = self._exclude(exclude)
        n = self.n
        i = self._next
        weight = self._weight
        inf = self._inflight
        best = -1
        bf = 0
        bw = 1
        for _ in range(n):
            if live[i]:
                f = inf[i]
                w = weight[i]
                if best < 0 or f * bw < bf * w:
                    best = i
                    bf = f
                    bw = w
            i = i + 1 if i + 1 < n else 0
        if best < 0:
            return -1
        self._next = best + 1 if best + 1 < n else 0
        inf[best] += 1
        return best


class _Seeded(Selector):
    """A live-backend list (ascending index) and a splitmix64 generator seeded with ``seed``."""

    __slots__ = ("_rng", "_usable")

    def _seeded(self, seed):
        self._rng = seed & _M64
        self._changed()

    def _changed(self):
        self._usable = [i for i in range(self.n) if self._live[i]]

    def _next64(self):
        s = (self._rng + _GOLDEN) & _M64
        self._rng = s
        s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) & _M64
        return s ^ (s >> 31)


class P2C(_Seeded):
    """Power of two random choices: of two distinct live backends drawn at random,
    the one with fewer requests in flight per unit of weight (the first drawn on a tie).

    ``seed`` seeds the splitmix64 generator: the same seed and the same
    operations give the same answers on both cores.
    """

    __slots__ = ()

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._seeded(seed)

    def select(self, key=b""):
        u = self._usable
        m = len(u)
        if m == 0:
            return -1
        inf = self._inflight
        if m == 1:
            a = u[0]
        else:
            i = self._next64() % m
            j = self._next64() % (m - 1)
            if j >= i:
                j += 1
            a = u[i]
            b = u[j]
            w = self._weight
            if inf[b] * w[a] < inf[a] * w[b]:
                a = b
        inf[a] += 1
        return a

    def select_excluding(self, exclude, key=b""):
        # the same draws as select, over the usable backends left in (in index order)
        mask, m = self._exclude(exclude)
        if m == 0:
            return -1
        u = [i for i in self._usable if mask[i]]
        inf = self._inflight
        if m == 1:
            a = u[0]
        else:
            i = self._next64() % m
            j = self._next64() % (m - 1)
            if j >= i:
                j += 1
            a = u[i]
            b = u[j]
            w = self._weight
            if inf[b] * w[a] < inf[a] * w[b]:
                a = b
        inf[a] += 1
        return a


class Random(_Seeded):
    """Weighted random: each live backend with probability weight / total live weight.

    ``seed`` seeds the splitmix64 generator (identical on both cores).
    """

    __slots__ = ("_cum",)

    def __init__(self, weights, seed=0):
        self._setup(weights)
        self._seeded(seed)

    def _changed(self):
        _Seeded._changed(self)
        cum = []
        t = 0
        for i in self._usable:
            t += self._weight[i]
            cum.append(t)
        self._cum = cum

    def select(self, key=b""):
        u = self._usable
        m = len(u)
        if m == 0:
            return -1
        if m == 1:
            a = u[0]
        else:
            cum = self._cum
            a = u[_bisect_right(cum, self._next64() % cum[-1])]
        self._inflight[a] += 1
        return a

    def select_excluding(self, exclude, key=b""):
        # the same draw as select, over the cumulative weights of the backends left in
        mask, m = self._exclude(exclude)
        if m == 0:
            return -1
        u = [i for i in self._usable if mask[i]]
        if m == 1:
            a = u[0]
        else:
            weight = self._weight
            total = 0
            for i in u:
                total += weight[i]
            r = self._next64() % total
            t = 0
            for a in u:
                t += weight[a]
                if t > r:
                    break
        self._inflight[a] += 1
        return a


class Maglev(Selector):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016; Envoy's weighted variant).

    ``names`` are the backends' ids (distinct bytes, e.g. b"10.0.0.1:8080"):
    each backend's permutation of the table comes from ``hash64(name, 0)``
    (offset) and ``hash64(name, 1)`` (skip), and backends fill the table in
    the order of their names, so every node given the same names, weights
    and ``table_size`` builds the same table whatever the backends' order.
    A backend with weight w gets about ``table_size * w / total`` entries
    (a weight of 0: none). ``table_size`` must be a prime, at least ``n``
    and below 2**24. ``seed`` is accepted for the common surface and unused
    (the table must not depend on it).

    ``select(key)`` returns -2 for an empty key (the caller falls back to
    another algorithm), else the backend at ``table[hash64(key) % table_size]``;
    when that backend is not live the walk goes forward in the table to the
    next live entry (bounded by ``table_size``; -1 when no backend is live).
    The table is rebuilt by set_weight, never by set_eligible.

    ``balance_factor`` (0: off; else >= 1.0) bounds the load like HAProxy's
    hash-balance-factor: an entry's backend b is taken only if
    ``in_flight(b) < factor * (T + 1) * w_b / W``, T and W being the requests
    in flight on and the total weight of the live backends (with equal
    weights: fewer than factor x the mean, counting this request); otherwise
    the walk goes on to the next entry.
    """

    __slots__ = ("table_size", "balance_factor", "_names", "_offset", "_skip", "_order",
                 "_table", "_nlive", "_lw", "_lf")

    def __init__(self, weights, names, seed=0, table_size=65537, balance_factor=0.0):
        self._setup(weights)
        n = self.n
        names = list(names)
        if len(names) != n:
            raise ValueError(f"{len(names)} names for {n} backends")
        for nm in names:
            if type(nm) is not bytes:
                raise TypeError(f"backend names must be bytes, got {nm!r}")
        if len(set(names)) != n:
            raise ValueError("backend names must be distinct")
        try:
            m = _index(table_size)
        except TypeError:
            raise TypeError(f"table_size must be an integer, got {table_size!r}") from None
        if m < n or m >= _MAX_TABLE or not _is_prime(m):
            raise ValueError(f"table_size must be a prime >= the number of backends and "
                             f"below 2**24, got {m}")
        try:
            f = float(balance_factor)
        except (TypeError, ValueError):
            raise TypeError(f"balance_factor must be a number, got {balance_factor!r}") from None
        if not (f == 0.0 or 1.0 <= f < float("inf")):
            raise ValueError(f"balance_factor must be 0 (off) or >= 1.0, got {balance_factor!r}")
        self.table_size = m
        self.balance_factor = f
        self._names = names
        self._offset = [hash64(nm, 0) % m for nm in names]
        self._skip = [hash64(nm, 1) % (m - 1) + 1 for nm in names]
        self._order = sorted(range(n), key=names.__getitem__)
        self._build()
        self._changed()

    def _build(self):
        m = self.table_size
        table = [-1] * m
        weight = self._weight
        entries = [i for i in self._order if weight[i] > 0]
        if entries:
            wmax = max(weight[i] for i in entries)
            pos = {i: self._offset[i] for i in entries}
            target = {i: 0 for i in entries}
            filled = 0
            it = 1
            while filled < m:
                for i in entries:
                    w = weight[i]
                    if it * w < target[i]:
                        continue
                    target[i] += wmax
                    c = pos[i]
                    sk = self._skip[i]
                    while table[c] >= 0:
                        c += sk
                        if c >= m:
                            c -= m
                    table[c] = i
                    c += sk
                    pos[i] = c - m if c >= m else c
                    filled += 1
                    if filled == m:
                        break
                it += 1
        self._table = table

    def _changed(self):
        nlive = lw = lf = 0
        for i in range(self.n):
            if self._live[i]:
                nlive += 1
                lw += self._weight[i]
                lf += self._inflight[i]
        self._nlive = nlive
        self._lw = lw
        self._lf = lf

    def set_weight(self, idx, w):
        self._check(idx)
        w = _check_weight(w)
        if w != self._weight[idx]:
            self._weight[idx] = w
            self._live[idx] = self._eligible[idx] and w > 0
            self._build()
        self._changed()

    def release(self, idx):
        self._check(idx)
        if self._inflight[idx] > 0:
            self._inflight[idx] -= 1
            if self._live[idx]:
                self._lf -= 1

    def select(self, key=b""):
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._live, self._nlive)

    def select_excluding(self, exclude, key=b""):
        # select's walk from the key's entry, passing excluded backends too; the
        # bounded load still compares with the mean over every live backend
        live, left = self._exclude(exclude)
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, live, left)

    def _walk(self, key, live, nlive):
        """The table walk from the key's entry to the first backend ``live`` allows
        (and, with a balance factor, under the load bound)."""
        if not key:
            return -2
        if nlive == 0:
            return -1
        m = self.table_size
        table = self._table
        c = hash64(key) % m
        f = self.balance_factor
        inf = self._inflight
        pick = -1
        if f == 0.0:
            for _ in range(m):
                b = table[c]
                if live[b]:
                    pick = b
                    break
                c = c + 1 if c + 1 < m else 0
        else:
            first = -1
            lim = f * float(self._lf + 1)
            lw = float(self._lw)
            weight = self._weight
            for _ in range(m):
                b = table[c]
                if live[b]:
                    if float(inf[b]) * lw < lim * float(weight[b]):
                        pick = b
                        break
                    if first < 0:
                        first = b
                c = c + 1 if c + 1 < m else 0
            if pick < 0:
                pick = first
        if pick < 0:
            return -1
        inf[pick] += 1
        self._lf += 1
        return pick


def pick_many(selector, n, key=b"", exclude=None):
    """``n`` picks (``select(key)``, then ``release(idx)`` if ``idx >= 0``); the sum of the indices.

    What the data path does per request, ``n`` times in a row (the compiled
    twin loops in C, calling the selector's methods as C calls). With
    ``exclude`` (not None) each pick is ``select_excluding(exclude, key)``, as
    a retry makes it. TypeError unless ``selector`` is a ``Selector`` or ``n``
    an integer; ValueError when ``n`` is negative; whatever ``select`` or
    ``select_excluding`` raises (Maglev: a non-bytes key).
    """
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a Selector, not {type(selector).__name__}")
    n = _index(n)
    if n < 0:
        raise ValueError("n must not be negative")
    release = selector.release
    total = 0
    if exclude is None:
        select = selector.select
        for _ in range(n):
            idx = select(key)
            if idx >= 0:
                release(idx)
                total += idx
    else:
        select_excluding = selector.select_excluding
        for _ in range(n):
            idx = select_excluding(exclude, key)
            if idx >= 0:
                release(idx)
                total += idx
    return total


# ---------------------------------------------------------------- framing

def find_head_end(data, start=0):
    """Index just past the first CRLF CRLF at or after ``start`` in ``data``, or -1.

    ``data`` is bytes. The caller still bounds the head's size itself.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    if start < 0:
        raise ValueError("start must not be negative")
    i = data.find(b"\r\n\r\n", start)
    return -1 if i < 0 else i + 4


# ---------------------------------------------------------------- access log

LOG_COMBINED = 0
LOG_JSON = 1
_LOG_MAX_SECONDS = 1e9      # longer durations (or NaN, or negative) are clamped

# nginx's escape=default: '"', '\\', control bytes and bytes >= 0x7F as \xHH
_LOG_ESC = _re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')


def _esc(m):
    return b"\\x%02X" % m.group()[0]


def _esc_json(m):
    # the same text inside a JSON string, where its backslash is written \\
    return b"\\\\x%02X" % m.group()[0]


def _ms(seconds):
    if not seconds >= 0.0:
        seconds = 0.0
    elif seconds > _LOG_MAX_SECONDS:
        seconds = _LOG_MAX_SECONDS
    us = int(seconds * 1e6 + 0.5)
    return b"%d.%03d" % (us // 1000, us % 1000)


# a field line, from the LF before it (a literal first byte: the search skips fast)
_LOG_COMBINED_FIELDS = _re.compile(rb"\n(referer|user-agent):([^\n]*)", _re.I)
_LOG_JSON_FIELDS = _re.compile(rb"\n(x-request-id):([^\n]*)", _re.I)


def _log_parts(head, fields, found):
    """The request line of ``head``; fills ``found`` (lowercase names: None)
    with the first value of each header ``fields`` (a regex) matches.

    The request line ends at the first LF (a CR before it is dropped); with no
    LF, it is all of ``head`` (a line cut short). Header lines follow, up to
    an empty line or the end of ``head``; a value loses one CR at the end of
    its line, then SP and HTAB on both sides.
    """
    lf = head.find(b"\n")
    if lf < 0:
        return head
    line = head[:lf - 1] if lf and head[lf - 1] == 13 else head[:lf]
    # the field lines end before the first empty line ("\n" or "\r\n" after an LF)
    end = len(head)
    for sep in (b"\n\n", b"\n\r\n"):
        i = head.find(sep, lf)
        if 0 <= i < end:
            end = i
    for m in fields.finditer(head, lf, end):
        name = m.group(1).lower()
        if found[name] is None:
            v = m.group(2)
            if v.endswith(b"\r"):
                v = v[:-1]
            found[name] = v.strip(b" \t")
    return line


def access_log_line(fmt, head, client, stamp, status, sent, backend, upstream, total):
    r"""One access log line, as bytes ending in LF.

    ``fmt``: LOG_COMBINED (0) or LOG_JSON (1). ``head``: the request head as
    received (or the part of it received; None: nothing to show). ``client``:
    the client address; ``stamp``: the time, written as given (the caller
    formats it for ``fmt``); ``status``, ``sent`` (bytes sent to the client):
    ints; ``backend``: bytes or None; ``upstream`` (request sent upstream to
    response head; negative: no backend answered) and ``total``: seconds,
    written as milliseconds with 3 decimals (clamped to 0..1e9 s).

    Every field from the client (request line, its parts, Referer,
    User-Agent, X-Request-Id, the address) is escaped as nginx's
    escape=default: '"', '\', control bytes and bytes >= 0x7F become \xHH
    (uppercase hex). In JSON the same text is a JSON string (its backslashes
    written \\), so ``json.loads`` returns exactly the combined field's text
    and every line is valid JSON whatever the input bytes.

    Combined: nginx's combined with fastlb's bytes_sent (the head included),
    then the backend, the total and the upstream time::

        CLIENT - - [STAMP] "REQUEST LINE" STATUS BYTES "REFERER" "USER-AGENT" BACKEND TOTALms UPSTREAMms

    ("-" for a missing request line, Referer, User-Agent, backend or upstream
    time). JSON, keys always in this order::

        {"time":..,"client":..,"method":..,"target":..,"version":..,"status":..,
         "bytes_sent":..,"backend":..,"upstream_ms":..,"total_ms":..,"request_id":..}

    (null for a missing part, backend, upstream time or X-Request-Id). The
    method is the request line up to its first SP, the version what follows
    its last SP, the target what lies between (no SP: all of it is the
    method; one SP: no version).
    """
    if fmt != LOG_COMBINED and fmt != LOG_JSON:
        raise ValueError("fmt must be LOG_COMBINED (0) or LOG_JSON (1)")
    for what, v, opt in (("head", head, True), ("client", client, False),
                         ("stamp", stamp, False), ("backend", backend, True)):
        if not (type(v) is bytes or (opt and v is None)):
            raise TypeError(f"{what} must be bytes")
    status = _index(status)
    sent = _index(sent)
    upstream = float(upstream)
    total = float(total)
    sub = _LOG_ESC.sub
    if fmt == LOG_COMBINED:
        if head is None:
            line = b"-"
            ref = ua = b"-"
        else:
            found = {b"referer": None, b"user-agent": None}
            line = sub(_esc, _log_parts(head, _LOG_COMBINED_FIELDS, found))
            ref = found[b"referer"]
            ua = found[b"user-agent"]
            ref = b"-" if ref is None else sub(_esc, ref)
            ua = b"-" if ua is None else sub(_esc, ua)
        return b'%s - - [%s] "%s" %d %d "%s" "%s" %s %sms %s\n' % (
            sub(_esc, client), stamp, line, status, sent, ref, ua,
            b"-" if backend is None else backend, _ms(total),
            _ms(upstream) + b"ms" if upstream >= 0.0 else b"-")

    def q(v):
        return b"null" if v is None else b'"' + sub(_esc_json, v) + b'"'

    method = target = version = rid = None
    if head is not None:
        found = {b"x-request-id": None}
        line = _log_parts(head, _LOG_JSON_FIELDS, found)
        rid = found[b"x-request-id"]
        sp1 = line.find(b" ")
        if sp1 < 0:
            method = line
        else:
            method = line[:sp1]
            sp2 = line.rfind(b" ")
            if sp2 == sp1:
                target = line[sp1 + 1:]
            else:
                target = line[sp1 + 1:sp2]
                version = line[sp2 + 1:]
    return (b'{"time":"%s","client":%s,"method":%s,"target":%s,"version":%s,"status":%d,'
            b'"bytes_sent":%d,"backend":%s,"upstream_ms":%s,"total_ms":%s,"request_id":%s}\n' % (
                stamp, q(client), q(method), q(target), q(version), status, sent,
                b"null" if backend is None else b'"' + backend + b'"',
                _ms(upstream) if upstream >= 0.0 else b"null", _ms(total), q(rid)))


class AccessLogBuffer:
    """A batch of access log lines (the data path's form of ``access_log_line``).

    ``fmt``: LOG_COMBINED or LOG_JSON; ``stamp``: the time field of the next
    lines (bytes, set by the caller as the clock moves); ``limit``: the batch
    size, in bytes, at which ``add`` says it is time to ``take``.
    """

    __slots__ = ("fmt", "limit", "stamp", "_buf")

    def __init__(self, fmt=LOG_COMBINED, limit=65536):
        if fmt != LOG_COMBINED and fmt != LOG_JSON:
            raise ValueError("fmt must be LOG_COMBINED (0) or LOG_JSON (1)")
        limit = _index(limit)
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.fmt = fmt
        self.limit = limit
        self.stamp = b""
        self._buf = bytearray()

    def __len__(self):
        return len(self._buf)

    def add(self, head, client, status, sent, backend, upstream, total):
        """Append the line of ``access_log_line(self.fmt, head, client, self.stamp, ...)``.
        Returns True once the batch holds ``limit`` bytes or more (time to ``take``)."""
        buf = self._buf
        buf += access_log_line(self.fmt, head, client, self.stamp, status, sent, backend,
                               upstream, total)
        return len(buf) >= self.limit

    def take(self):
        """The lines added since the last ``take``, as one bytes object; the batch is emptied."""
        out = bytes(self._buf)
        self._buf = bytearray()
        return out
