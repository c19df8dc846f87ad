"""Response heads: rewrite_response_head.

The pure twin of ``response.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    REQ_HEAD,
    REQ_HTTP10,
    REQ_KEEP_ALIVE,
    REQ_UPGRADE,
    RESP_CLIENT_KEEP_ALIVE,
    RESP_DECHUNK,
    RESP_INFORMATIONAL,
    RESP_UPGRADE,
    RESP_UPSTREAM_KEEP_ALIVE,
    BadGateway,
)
from fastlb.wire.characters import (
    _DIGITS,
    _H_CONNECTION,
    _H_CONTENT_LENGTH,
    _H_HOP,
    _H_OTHER,
    _H_TRAILER,
    _H_TRANSFER_ENCODING,
    _H_UPGRADE,
    _KINDS,
    _PROTECTED,
    _VCHAR,
)
from fastlb.wire.helpers import _connection_tokens, _parse_length, _split_fields

# ---------------------------------------------------------------- responses

def rewrite_response_head(head, req_flags, start=0, end=-1, tail_max=0):
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    ``req_flags`` are the flags of the request this answers (``REQ_HEAD``,
    ``REQ_HTTP10``, ``REQ_KEEP_ALIVE``, ``REQ_UPGRADE``; clear
    ``REQ_KEEP_ALIVE`` to make fastlb close the client connection after this
    response). ``out`` is the head to send the client, as HTTP/1.1.
    ``flags`` is an OR of ``RESP_*``.

    A 101 (Switching Protocols) answers only an upgrade request
    (``REQ_UPGRADE``; else it is invalid) and must name the new protocol in
    Upgrade: it is final (``RESP_UPGRADE`` alone, ``BODY_NONE``: the bytes
    after it are the new protocol), and goes to the client with its fields
    but the hop-by-hop ones (Upgrade kept) and ``Trailer``, then
    ``Connection: upgrade``.

    The head is ``head[start:end]`` (``end`` -1: to the end), so that a read
    holding a head and more is passed as it is. With ``tail_max`` > 0, a
    response framed by Content-Length (``BODY_LENGTH``) whose whole body is
    ``head[end:]``, at most ``tail_max`` bytes, is written with it: ``out``
    is then the head and the body (one copy, where the caller would take a
    slice and join the two).
    """
    return _rewrite_response(head, req_flags, b"", None, None, start, end, tail_max)


def rewrite_response_head_with_id(head, req_flags, request_id_header, request_id,
                                  start=0, end=-1, tail_max=0):
    """``rewrite_response_head``, with the request's id on a final response.

    ``request_id_header`` and ``request_id``: bytes (None or b"": no id,
    as ``rewrite_response_head``). A final response (not a 1xx interim one;
    a 101 is final) that goes to the client without a field of that name
    (compared case-insensitively) gets ``NAME: ID`` after its own fields.
    Both are the caller's (a configured name, an id from
    ``assign_request_id``) and are written as they are.
    """
    if request_id_header is None or request_id is None:
        return _rewrite_response(head, req_flags, b"", None, None, start, end, tail_max)
    if type(request_id_header) is not bytes or type(request_id) is not bytes:
        raise TypeError("request_id_header and request_id must be bytes or None")
    if not request_id_header or not request_id:
        return _rewrite_response(head, req_flags, b"", None, None, start, end, tail_max)
    return _rewrite_response(head, req_flags, request_id_header.lower(), request_id_header,
                             request_id, start, end, tail_max)


def _rewrite_response(head, req_flags, rid, rid_name, rid_value, start, end, tail_max):
    # rid: the request-id field's lowercase name (b"": none), rid_name as written
    if end < 0:
        end = len(head)
    if not 0 <= start <= end <= len(head):
        raise ValueError("start and end must lie within head")
    rest = head[end:] if tail_max > 0 else b""
    if start or end != len(head):
        head = head[start:end]
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
    if status == 101 and not req_flags & REQ_UPGRADE:
        raise BadGateway("unexpected protocol switch")

    fields = list(_split_fields(head, eol + 2, BadGateway))
    if status == 101:
        return _switch_out(line, fields, rid, rid_name, rid_value)
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
        if kind == _H_TRANSFER_ENCODING or kind == _H_CONNECTION or kind == _H_HOP \
                or kind == _H_UPGRADE:
            continue
        if kind == _H_TRAILER and not chunked_out:
            continue
        if drop is not None and lname in drop:
            continue
        out += (name, b": ", value, b"\r\n")
        if lname == rid:
            rid = b""   # the backend's goes to the client: no second one
    if rid and not flags & RESP_INFORMATIONAL:
        out += (rid_name, b": ", rid_value, b"\r\n")
    if chunked_out:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            out.append(b"Connection: close\r\n")
        elif client_http10:
            out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    if 0 < len(rest) <= tail_max and framing == BODY_LENGTH and len(rest) == length:
        out.append(bytes(rest))
    return b"".join(out), status, flags, framing, (length if length > 0 else 0)


def _switch_out(line, fields, rid, rid_name, rid_value):
    """A 101 to an upgrade request: validated as any response head, then
    written with its Upgrade fields and Connection: upgrade."""
    length = -1
    chunked = False
    te_seen = False
    upgrade = False
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
                if tok not in _PROTECTED and tok != b"close" and tok != b"keep-alive":
                    if drop is None:
                        drop = set()
                    drop.add(tok)
        elif kind == _H_UPGRADE:
            if value:
                upgrade = True
    if chunked and length >= 0:
        raise BadGateway("both Content-Length and Transfer-Encoding")
    if not upgrade:
        raise BadGateway("101 without Upgrade")
    out = [b"HTTP/1.1", line[8:], b"\r\n"]
    for name, lname, value in fields:
        kind = _KINDS.get(lname, _H_OTHER)
        if kind != _H_UPGRADE:      # the new protocol (Connection names it, and goes)
            if kind == _H_TRANSFER_ENCODING or kind == _H_CONNECTION or kind == _H_HOP \
                    or kind == _H_TRAILER or (drop is not None and lname in drop):
                continue
        out += (name, b": ", value, b"\r\n")
        if lname == rid:
            rid = b""
    if rid:
        out += (rid_name, b": ", rid_value, b"\r\n")
    out.append(b"Connection: upgrade\r\n\r\n")
    return b"".join(out), 101, RESP_UPGRADE, BODY_NONE, 0
