"""Request heads: parse_request_head, RequestHead, write_request_head.

The pure twin of ``request.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from operator import index as _index

from fastlb.errors import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    KEY_COOKIE,
    KEY_HEADER,
    KEY_NONE,
    KEY_PATH,
    KEY_QUERY,
    REQ_EXPECT_CONTINUE,
    REQ_HEAD,
    REQ_HTTP10,
    REQ_IDEMPOTENT,
    REQ_KEEP_ALIVE,
    REQ_UPGRADE,
    BadRequest,
)
from fastlb.wire.authorities import _as_bytes, _split_target, _valid_authority
from fastlb.wire.characters import (
    _H_CONNECTION,
    _H_CONTENT_LENGTH,
    _H_EXPECT,
    _H_FORWARDED,
    _H_HOST,
    _H_OTHER,
    _H_TRAILER,
    _H_TRANSFER_ENCODING,
    _H_UPGRADE,
    _H_XF_HOST,
    _H_XF_PROTO,
    _H_XFF,
    _IDEMPOTENT,
    _KINDS,
    _OWS,
    _PROTECTED,
    _TARGET,
)
from fastlb.wire.helpers import _connection_tokens, _is_token, _parse_length, _split_fields
from fastlb.wire.requestid import new_request_id, valid_request_id

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
    key asked for (b"" when absent or none was asked for); ``forwarded_for``
    the values of its X-Forwarded-For fields, joined by ", " (b"" when none);
    ``request_id`` its id once ``assign_request_id`` gave it one (else None).
    Only ``parse_request_head`` makes them; ``write_request_head`` writes one.
    """

    __slots__ = ("method", "target", "version", "host", "path", "flags", "framing", "length",
                 "key", "_line", "_fields", "_tfields", "_xff", "_xfp", "_xfh", "_host_field",
                 "_chunked", "_http10", "_rid")

    def __init__(self):
        raise TypeError("RequestHead objects are made by parse_request_head")

    @property
    def forwarded_for(self):
        return b", ".join(self._xff)

    @property
    def request_id(self):
        return self._rid


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
    upgrade = False
    conn_upgrade = False
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
                    if tok == b"upgrade":
                        conn_upgrade = True
                    if drop is None:
                        drop = set()
                    drop.add(tok)
        elif kind == _H_UPGRADE:
            if value:
                upgrade = True
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
    # RFC 9110 7.8: Upgrade is ignored in HTTP/1.0, needs the "upgrade" option
    # in Connection, and the protocol switches only after the whole request:
    # one with a body is forwarded without it
    if upgrade and conn_upgrade and not http10 and not chunked and length <= 0:
        flags |= REQ_UPGRADE

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
    r._xfp = r._xfh = False
    r._rid = None
    # _fields: what every backend gets; _tfields (None: the same) what it gets
    # when the client is a trusted proxy, whose X-Forwarded-Proto,
    # X-Forwarded-Host and Forwarded go on too
    out = r._fields = []
    tout = None
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
        elif kind == _H_UPGRADE:
            if not flags & REQ_UPGRADE:
                continue
        elif kind == _H_XF_PROTO or kind == _H_XF_HOST or kind == _H_FORWARDED:
            if kind == _H_XF_PROTO:
                r._xfp = True
            elif kind == _H_XF_HOST:
                r._xfh = True
            if tout is None:
                tout = list(out)
            tout.append((name, value))
            continue
        elif kind != _H_CONTENT_LENGTH:
            continue
        out.append((name, value))
        if tout is not None:
            tout.append((name, value))
    r._tfields = tout

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


def assign_request_id(parsed, request_id_header):
    """Give a parsed head its request id (``RequestHead.request_id``), and return it.

    ``request_id_header`` is the id's field name (bytes, not empty). The id
    is the client's when it sent exactly one field of that name (compared
    case-insensitively) that goes to the backend (not named in Connection)
    and whose value ``valid_request_id`` accepts: that field stays in its
    place. Otherwise it is a new one (``new_request_id``), which
    ``write_request_head`` writes as ``NAME: ID`` after the client's fields,
    in place of every field of that name the client sent. A head that has an
    id keeps it (a second call returns it). The name is fastlb's
    configuration, not checked here: a field the parser handles itself
    (Host, Connection, ...) is never the id.
    """
    if type(parsed) is not RequestHead:
        raise TypeError(f"parsed must be a RequestHead, not {type(parsed).__name__}")
    if type(request_id_header) is not bytes or not request_id_header:
        raise TypeError("request_id_header must be a field name (bytes)")
    if parsed._rid is not None:
        return parsed._rid
    want = request_id_header.lower()
    # the client's fields of that name that go to the backend (those named
    # in Connection do not); none for a field the parser handles itself
    sent = [] if want in _KINDS else [v for n, v in parsed._fields if n.lower() == want]
    if len(sent) == 1 and valid_request_id(sent[0]):
        parsed._rid = sent[0]
        return parsed._rid
    rid = parsed._rid = new_request_id()
    for fields in (parsed._fields, parsed._tfields):
        if fields is not None:
            if sent:
                fields[:] = [f for f in fields if f[0].lower() != want]
            fields.append((request_id_header, rid))
    return rid


def write_request_head(parsed, client_ip, proto=b"http", via=b"fastlb", backend_authority=b"",
                       trusted=False):
    """The head to send upstream for ``parsed`` (a ``RequestHead``), as HTTP/1.1.

    The request line with the target in origin form; the fields in their
    order, without the hop-by-hop ones and those named in Connection, and
    with ``Host`` set to ``parsed.host``; ``backend_authority`` as Host for an
    HTTP/1.0 request that had none (``None`` or empty: no Host); then
    ``Connection: upgrade`` for an upgrade request (``REQ_UPGRADE``, whose
    Upgrade fields are kept in place), ``Transfer-Encoding: chunked`` for a
    chunked body, ``X-Forwarded-For``, ``X-Forwarded-Proto: proto``,
    ``X-Forwarded-Host`` (``parsed.host``, when not empty) and ``Via: 1.1
    via`` (1.0 for HTTP/1.0 clients; ``None`` or empty: no Via). A new
    request id (``assign_request_id``) follows the client's fields.

    ``trusted``: whether the client (``client_ip``) is a trusted proxy. If
    not, the X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and
    Forwarded fields it sent are dropped: X-Forwarded-For is ``client_ip``
    alone. If it is, its X-Forwarded-For list is extended with
    ``client_ip``, and its X-Forwarded-Proto, X-Forwarded-Host and
    Forwarded fields go on in place (fastlb's own X-Forwarded-Proto and
    X-Forwarded-Host only when it sent none).
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
    fields = parsed._tfields if trusted and parsed._tfields is not None else parsed._fields
    for name, value in fields:
        out += (name, b": ", value, b"\r\n")
    if not parsed._host_field:
        if host is not None:
            out += (b"Host: ", host, b"\r\n")
        elif backend_authority:
            out += (b"Host: ", backend_authority, b"\r\n")
    if parsed.flags & REQ_UPGRADE:
        out.append(b"Connection: upgrade\r\n")
    if parsed._chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(b"X-Forwarded-For: ")
    if trusted:
        for v in parsed._xff:
            out += (v, b", ")
    out += (client_ip, b"\r\n")
    if not (trusted and parsed._xfp):
        out += (b"X-Forwarded-Proto: ", proto, b"\r\n")
    if host and not (trusted and parsed._xfh):
        out += (b"X-Forwarded-Host: ", host, b"\r\n")
    if via:
        out += (b"Via: 1.0 " if parsed._http10 else b"Via: 1.1 ", via, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)
