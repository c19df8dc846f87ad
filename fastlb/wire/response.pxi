# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/response.py.

# ---------------------------------------------------------------- responses

cdef struct RidField:
    const char* name        # the request-id field: "name: id" (not NUL-terminated)
    Py_ssize_t nl
    const char* id
    Py_ssize_t il


cpdef tuple rewrite_response_head(head, req_flags, Py_ssize_t start=0, Py_ssize_t end=-1,
                                  Py_ssize_t tail_max=0):
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    See ``fastlb._core_py.rewrite_response_head``: this is its compiled twin.
    """
    return _rewrite_response(head, req_flags, NULL, start, end, tail_max)


cpdef tuple rewrite_response_head_with_id(head, req_flags, request_id_header, request_id,
                                          Py_ssize_t start=0, Py_ssize_t end=-1,
                                          Py_ssize_t tail_max=0):
    """``rewrite_response_head``, with the request's id on a final response.

    See ``fastlb._core_py.rewrite_response_head_with_id``: this is its
    compiled twin; a C call for the modules that cimport it (``_core.pxd``).
    """
    cdef RidField rid
    if request_id_header is None or request_id is None:
        return _rewrite_response(head, req_flags, NULL, start, end, tail_max)
    if not (PyBytes_CheckExact(request_id_header) and PyBytes_CheckExact(request_id)):
        raise TypeError("request_id_header and request_id must be bytes or None")
    rid.nl = PyBytes_GET_SIZE(request_id_header)
    rid.il = PyBytes_GET_SIZE(request_id)
    if rid.nl == 0 or rid.il == 0:
        return _rewrite_response(head, req_flags, NULL, start, end, tail_max)
    rid.name = PyBytes_AS_STRING(request_id_header)
    rid.id = PyBytes_AS_STRING(request_id)
    return _rewrite_response(head, req_flags, &rid, start, end, tail_max)


cdef inline tuple _rewrite_response(object head, object req_flags, RidField* rid,
                                    Py_ssize_t start, Py_ssize_t end, Py_ssize_t tail_max):
    cdef bytes h = _as_bytes(head, "head")
    cdef long rf = req_flags
    cdef Py_ssize_t size = PyBytes_GET_SIZE(h)
    if end < 0:
        end = size
    if start < 0 or start > end or end > size:
        raise ValueError("start and end must lie within head")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(h) + start
    cdef Py_ssize_t n = end - start
    cdef Field stack[STACK_FIELDS]
    cdef Fields fb
    cdef Py_ssize_t eol, i
    cdef int status
    cdef bint http10

    if n < 4 or memcmp(p + n - 4, b"\r\n\r\n", 4) != 0:
        raise _BadGateway("incomplete response head")
    eol = _find_crlf(p, 0, n)
    if eol < 12 or memcmp(p, b"HTTP/1.", 7) != 0 or (p[7] != b'0' and p[7] != b'1') or p[8] != 0x20:
        raise _BadGateway("invalid status line")
    http10 = p[7] == b'0'
    for i in range(9, 12):
        if p[i] < 0x30 or p[i] > 0x39:
            raise _BadGateway("invalid status code")
    if eol > 12 and p[12] != 0x20:
        raise _BadGateway("invalid status code")
    for i in range(13, eol):
        if not _vchar[p[i]]:
            raise _BadGateway("invalid reason phrase")
    status = (p[9] - 0x30) * 100 + (p[10] - 0x30) * 10 + (p[11] - 0x30)
    if status < 100:
        raise _BadGateway("invalid status code")
    if status == 101 and not (rf & REQ_UPGRADE):
        raise _BadGateway("unexpected protocol switch")

    fb.f = fb.stack = stack
    fb.n = 0
    fb.cap = STACK_FIELDS
    try:
        _parse_fields(p, n, eol + 2, &fb, _BadGateway)
        if status == 101:
            return _switch_out(h, p, n, &fb, eol, http10, rid)
        return _response_out(h, p, n, &fb, eol, status, http10, rf, rid,
                             size - end if tail_max > 0 else 0, tail_max)
    finally:
        if fb.f != fb.stack:
            free(fb.f)


cdef bint _has_field(const unsigned char* p, Fields* fb, RidField* rid) noexcept:
    """A field of ``fb`` that goes out (``keep``) is called ``rid.name`` (case-insensitively)."""
    cdef Py_ssize_t k
    cdef Field* f
    for k in range(fb.n):
        f = &fb.f[k]
        if f.keep and f.name_len == rid.nl and \
                _ieq2(p + f.start, <const unsigned char*>rid.name, rid.nl):
            return True
    return False


cdef inline char* _put_rid(char* w, RidField* rid) noexcept nogil:
    w = _put(w, rid.name, rid.nl)
    w = _put(w, b": ", 2)
    w = _put(w, rid.id, rid.il)
    return _put(w, b"\r\n", 2)


cdef tuple _switch_out(bytes h, const unsigned char* p, Py_ssize_t n, Fields* fb,
                       Py_ssize_t eol, bint http10, RidField* rid):
    """A 101 to an upgrade request (see the twin): validated as any head, then
    written with its Upgrade fields and Connection: upgrade."""
    cdef Py_ssize_t k, size
    cdef long long length = -1, v
    cdef bint chunked = False, te_seen = False, upgrade = False
    cdef Conn cn
    cdef Field* f
    cdef int kind
    cdef object drop = None
    cdef bytes out
    cdef char* w

    cn.close = cn.keep_alive = cn.upgrade = False
    cn.ntoks = 0
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        if kind == H_CONTENT_LENGTH:
            v = _parse_length(p + f.vs, f.ve - f.vs, _BadGateway)
            if length >= 0 and v != length:
                raise _BadGateway("conflicting Content-Length")
            length = v
        elif kind == H_TRANSFER_ENCODING:
            if te_seen:
                raise _BadGateway("duplicate Transfer-Encoding")
            te_seen = True
            if not (f.ve - f.vs == 7 and _ieq(p + f.vs, b"chunked", 7)):
                raise _BadGateway("unsupported transfer coding")
            chunked = True
        elif kind == H_CONNECTION:
            _connection(p, f, &cn)
        elif kind == H_UPGRADE:
            if f.ve > f.vs:
                upgrade = True
    if chunked and length >= 0:
        raise _BadGateway("both Content-Length and Transfer-Encoding")
    if not upgrade:
        raise _BadGateway("101 without Upgrade")

    if cn.ntoks > MAX_DROP_TOKENS:
        drop = _drop_set(p, fb)
    size = 8 + (eol - 8) + 2
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        if kind == H_UPGRADE:
            f.keep = True       # the new protocol (Connection names it, and goes)
        else:
            f.keep = (kind != H_TRANSFER_ENCODING and kind != H_CONNECTION and kind != H_HOP
                      and kind != H_TRAILER and not _dropped(p, f, &cn, drop))
        if f.keep:
            size += f.name_len + (f.ve - f.vs) + 4
    size += 21 + 2
    if rid != NULL and _has_field(p, fb, rid):
        rid = NULL          # the backend's goes to the client: no second one
    if rid != NULL:
        size += rid.nl + rid.il + 4

    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    if http10:
        w = _put(w, b"HTTP/1.1", 8)
        w = _put(w, p + 8, eol - 8 + 2)
        w = _put_fields(w, p, fb, -1, -1)
    else:
        w = _put_fields(w, p, fb, 0, eol + 2)
    if rid != NULL:
        w = _put_rid(w, rid)
    w = _put(w, b"Connection: upgrade\r\n", 21)
    w = _put(w, b"\r\n", 2)
    return (out, 101, RESP_UPGRADE, BODY_NONE, 0)


cdef tuple _response_out(bytes h, const unsigned char* p, Py_ssize_t n, Fields* fb,
                         Py_ssize_t eol, int status, bint http10, long rf, RidField* rid,
                         Py_ssize_t tail, Py_ssize_t tail_max):
    # ``tail``: the bytes after the head (p[n:n + tail]), written after it
    # when they are the whole body and at most ``tail_max`` (see the twin)
    cdef Py_ssize_t k, size
    cdef long long length = -1, v
    cdef bint chunked = False, te_seen = False, dechunk, client_http10, chunked_out
    cdef Conn cn
    cdef Field* f
    cdef int kind, flags = 0, framing
    cdef object drop = None
    cdef bytes out
    cdef char* w

    cn.close = cn.keep_alive = False
    cn.ntoks = 0
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        if kind == H_CONTENT_LENGTH:
            v = _parse_length(p + f.vs, f.ve - f.vs, _BadGateway)
            if length >= 0 and v != length:
                raise _BadGateway("conflicting Content-Length")
            length = v
        elif kind == H_TRANSFER_ENCODING:
            if te_seen:
                raise _BadGateway("duplicate Transfer-Encoding")
            te_seen = True
            if not (f.ve - f.vs == 7 and _ieq(p + f.vs, b"chunked", 7)):
                raise _BadGateway("unsupported transfer coding")
            chunked = True
        elif kind == H_CONNECTION:
            _connection(p, f, &cn)
    if chunked and length >= 0:
        raise _BadGateway("both Content-Length and Transfer-Encoding")

    client_http10 = (rf & REQ_HTTP10) != 0
    if status < 200:
        flags |= RESP_INFORMATIONAL
        framing = BODY_NONE
    elif (rf & REQ_HEAD) or status == 204 or status == 304:
        framing = BODY_NONE
    elif chunked:
        framing = BODY_CHUNKED
    elif length >= 0:
        framing = BODY_LENGTH if length > 0 else BODY_NONE
    else:
        framing = BODY_CLOSE
    if framing != BODY_CLOSE and not cn.close and (cn.keep_alive or not http10):
        flags |= RESP_UPSTREAM_KEEP_ALIVE
    dechunk = framing == BODY_CHUNKED and client_http10
    if dechunk:
        flags |= RESP_DECHUNK
    if (rf & REQ_KEEP_ALIVE) and framing != BODY_CLOSE and not dechunk:
        flags |= RESP_CLIENT_KEEP_ALIVE

    if cn.ntoks > MAX_DROP_TOKENS:
        drop = _drop_set(p, fb)
    # the trailers are relayed, and announced by Trailer, when the body goes on chunked
    chunked_out = chunked and not client_http10
    size = 8 + (eol - 8) + 2
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        # H_TRANSFER_ENCODING, H_CONNECTION, H_HOP and H_UPGRADE are 3 to 6
        f.keep = ((kind < H_TRANSFER_ENCODING or kind > H_UPGRADE)
                  and (kind != H_TRAILER or chunked_out) and not _dropped(p, f, &cn, drop))
        if f.keep:
            size += f.name_len + (f.ve - f.vs) + 4
    if rid != NULL:
        # a final response without the field gets it
        if (flags & RESP_INFORMATIONAL) or _has_field(p, fb, rid):
            rid = NULL
        else:
            size += rid.nl + rid.il + 4
    if chunked_out:
        size += 28
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            size += 19
        elif client_http10:
            size += 24
    size += 2
    if not (0 < tail <= tail_max and framing == BODY_LENGTH and tail == length):
        tail = 0
    size += tail

    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    if http10:
        w = _put(w, b"HTTP/1.1", 8)
        w = _put(w, p + 8, eol - 8 + 2)
        w = _put_fields(w, p, fb, -1, -1)
    else:
        w = _put_fields(w, p, fb, 0, eol + 2)
    if rid != NULL:
        w = _put_rid(w, rid)
    if chunked_out:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            w = _put(w, b"Connection: close\r\n", 19)
        elif client_http10:
            w = _put(w, b"Connection: keep-alive\r\n", 24)
    w = _put(w, b"\r\n", 2)
    if tail:
        _put(w, p + n, tail)
    return (out, status, flags, framing, length if length > 0 else 0)
