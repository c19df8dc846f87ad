"""Pure-Python core: the reference the compiled ``_core.pyx`` must match.

Everything here is per-request, CPU-only and I/O-free:

* ``RoundRobin``: the backend selector. Selectors work on integer indices
  (0..n-1) and an eligibility mask; they never see Backend objects. Every
  selector has the same surface: ``select(key=b"") -> int`` (-1 when no
  backend is eligible), ``release(idx)``, ``set_eligible(idx, ok)``,
  ``is_eligible(idx)`` and ``n``. The walk over ineligible backends is
  bounded by ``n``.
* ``rewrite_request_head``: validates a raw request head and writes the head
  sent upstream (hop-by-hop fields removed, X-Forwarded-*, Via, Host).
* ``rewrite_response_head``: the same for a backend's response head.
* ``ChunkedScanner``: finds where a chunked body ends, strictly, and can
  de-chunk it for HTTP/1.0 clients.

Invalid client input raises ``BadRequest`` (``.status`` says 400 or 501);
invalid backend input raises ``BadGateway``. Both twins raise the same
exception for the same input.
"""
from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
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

__all__ = [
    "RoundRobin",
    "ChunkedScanner",
    "rewrite_request_head",
    "rewrite_response_head",
    "find_head_end",
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
_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
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

_KINDS = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"keep-alive": _H_HOP,
    b"proxy-connection": _H_HOP,
    b"te": _H_HOP,
    b"trailer": _H_HOP,
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


# ---------------------------------------------------------------- requests

def rewrite_request_head(head, client_ip, proto=b"http", via=b"fastlb", host_default=b""):
    """Validate a request head and return ``(out, flags, framing, length)``.

    ``head`` is the raw head, request line to the blank line inclusive.
    ``out`` is the head to send upstream, always as HTTP/1.1. ``flags`` is an
    OR of ``REQ_*``; ``framing`` is ``BODY_NONE``, ``BODY_LENGTH`` (``length``
    bytes) or ``BODY_CHUNKED``. ``via`` is the pseudonym added in ``Via``
    (``None`` or empty: no Via). ``host_default`` is sent as ``Host`` when an
    HTTP/1.0 request has none.
    """
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

    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_OTHER:
            if drop is not None and lname in drop:
                continue
        elif kind == _H_EXPECT:
            if http10 or (drop is not None and lname in drop):
                continue
        elif kind != _H_HOST and kind != _H_CONTENT_LENGTH:
            continue
        out += (name, b": ", value, b"\r\n")
    if host is None and host_default:
        out += (b"Host: ", host_default, b"\r\n")
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(b"X-Forwarded-For: ")
    for v in xff:
        out += (v, b", ")
    out += (client_ip, b"\r\nX-Forwarded-Proto: ", proto, b"\r\n")
    if host is not None:
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    if via:
        out += (b"Via: 1.0 " if http10 else b"Via: 1.1 ", via, b"\r\n")
    out.append(b"\r\n")
    framing = BODY_CHUNKED if chunked else (BODY_LENGTH if length > 0 else BODY_NONE)
    return b"".join(out), flags, framing, (length if length > 0 else 0)


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
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind == _H_TRANSFER_ENCODING or kind == _H_CONNECTION or kind == _H_HOP:
            continue
        if drop is not None and lname in drop:
            continue
        out += (name, b": ", value, b"\r\n")
    if chunked and not client_http10:
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

_MAX_SIZE_DIGITS = 15       # 16**15 - 1 bytes: well under 2**62
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
    lines or trailers).
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
                        self._digits += 1
                        if self._digits > _MAX_SIZE_DIGITS:
                            raise exc("chunk size too large")
                        self._size = self._size * 16 + v
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


# ---------------------------------------------------------------- selection

class RoundRobin:
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    ``seed`` sets the first backend tried (``seed % n``), so runs repeat.
    """

    __slots__ = ("n", "_next", "_eligible", "_weighted")

    def __init__(self, weights, seed=0):
        n = len(weights)
        if n == 0:
            raise ValueError("a balancer needs at least one backend")
        self.n = n
        self._next = seed % n
        self._eligible = [True] * n
        self._weighted = [w > 0 for w in weights]

    def select(self, key=b""):
        n = self.n
        i = self._next
        eligible = self._eligible
        weighted = self._weighted
        for _ in range(n):
            if eligible[i] and weighted[i]:
                self._next = i + 1 if i + 1 < n else 0
                return i
            i = i + 1 if i + 1 < n else 0
        return -1

    def release(self, idx):
        pass

    def set_eligible(self, idx, ok):
        if not 0 <= idx < self.n:
            raise IndexError("backend index out of range")
        self._eligible[idx] = bool(ok)

    def is_eligible(self, idx):
        if not 0 <= idx < self.n:
            raise IndexError("backend index out of range")
        return self._eligible[idx]


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
