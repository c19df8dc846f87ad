# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/request.py.

# ---------------------------------------------------------------- requests

@cython.final
@cython.freelist(8)
cdef class RequestHead:
    """A validated request head, as ``parse_request_head`` returns it.

    See ``fastlb._core_py.RequestHead``: this is its compiled twin. ``flags``,
    ``framing``, ``length`` and ``key`` are C fields (``_core.pxd``); the
    other attributes are built from the head when read.
    """

    def __init__(self):
        raise TypeError("RequestHead objects are made by parse_request_head")

    def __dealloc__(self):
        if self._segs != NULL and self._segs != self._inline:
            free(self._segs)
        self._segs = NULL

    @property
    def method(self):
        return None if self._head is None else _span(self, 0, self._sp1)

    @property
    def target(self):
        return None if self._head is None else _span(self, self._sp1 + 1, self._sp2)

    @property
    def version(self):
        return None if self._head is None else _span(self, self._sp2 + 1, self._eol)

    @property
    def host(self):
        return None if self._head is None or self._hs < 0 else _span(self, self._hs, self._he)

    @property
    def path(self):
        if self._head is None:
            return None
        if self._slash:
            return b"/" + _span(self, self._ps, self._pe)
        return _span(self, self._ps, self._pe)

    @property
    def request_id(self):
        return self._rid if self._rid_on else None

    @property
    def forwarded_for(self):
        cdef Py_ssize_t k
        cdef Seg* s
        if self._head is None:
            return None
        parts = []
        for k in range(self._nseg):
            s = &self._segs[k]
            if s.kind == SEG_XFF:
                parts.append(_span(self, s.a, s.b))
        return b", ".join(parts)


# The RequestHead last made. A caller that dropped it (the data path drops each
# one once the head is written) leaves it referenced from here only: the next
# parse fills it again instead of allocating. One still held elsewhere is
# never touched.
cdef RequestHead _spare = None


cdef RequestHead _new_head():
    global _spare
    cdef RequestHead r = _spare
    if r is not None and Py_REFCNT(r) == 2:     # _spare and r
        if r._segs != r._inline:
            free(r._segs)
            r._segs = r._inline
        r.length = 0
        r.framing = BODY_NONE
        r._nseg = 0
        r._size = 0
        r._tsize = 0
        r._xfp = r._xfh = False
        r._rid_on = False
        return r
    r = RequestHead.__new__(RequestHead)
    _spare = r
    return r


cdef inline bytes _span(RequestHead r, Py_ssize_t s, Py_ssize_t e):
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(r._head) + s, e - s)


cdef int _grow_segs(RequestHead r) except -1:
    cdef Py_ssize_t cap = r._cap * 2
    cdef Seg* s
    if r._segs == r._inline:
        s = <Seg*>malloc(cap * sizeof(Seg))
        if s != NULL:
            memcpy(s, r._inline, r._nseg * sizeof(Seg))
    else:
        s = <Seg*>realloc(r._segs, cap * sizeof(Seg))
    if s == NULL:
        raise MemoryError()
    r._segs = s
    r._cap = cap
    return 0


cdef inline int _add(RequestHead r, int kind, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c,
                     Py_ssize_t d) except -1:
    """Append a segment to the plan of ``r`` and count its bytes."""
    cdef Seg* s
    if r._nseg == r._cap:
        _grow_segs(r)
    s = &r._segs[r._nseg]
    r._nseg += 1
    s.kind = kind
    s.a = a
    s.b = b
    s.c = c
    s.d = d
    if kind == SEG_COPY:
        r._size += b - a
    elif kind == SEG_FIELD:
        r._size += (b - a) + (d - c) + 4
    elif kind == SEG_TFIELD:
        r._tsize += (b - a) + (d - c) + 4
    else:
        r._tsize += (b - a) + 2
    return 0


cpdef RequestHead parse_request_head(head, int key_kind=0, key_name=b""):
    """Validate a request head strictly and return a ``RequestHead``.

    See ``fastlb._core_py.parse_request_head``: this is its compiled twin.
    """
    cdef bytes h = _as_bytes(head, "head")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(h)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(h)
    cdef Field stack[STACK_FIELDS]
    cdef Fields fb
    cdef Py_ssize_t eol, sp1, sp2, i, ts, te, hs = -1, he = -1
    cdef bint http10, slash = False
    cdef const void* sp

    if key_kind < KEY_NONE or key_kind > KEY_COOKIE:
        raise ValueError(f"unknown key kind: {key_kind!r}")
    if key_kind > KEY_PATH:
        if type(key_name) is not bytes:
            raise TypeError("key_name must be bytes")
        if PyBytes_GET_SIZE(key_name) == 0:
            raise ValueError("this key kind needs a key_name")
    if n < 4 or memcmp(p + n - 4, b"\r\n\r\n", 4) != 0:
        raise _BadRequest("incomplete request head")
    eol = _find_crlf(p, 0, n)
    sp = memchr(p, 0x20, eol)
    sp1 = (<const unsigned char*>sp - p) if sp != NULL else -1
    sp2 = eol - 1
    while sp2 >= 0 and p[sp2] != 0x20:
        sp2 -= 1
    if sp1 <= 0 or sp2 <= sp1 + 1:
        raise _BadRequest("invalid request line")
    for i in range(sp1):
        if not _tchar[p[i]]:
            raise _BadRequest("invalid method")
    for i in range(sp1 + 1, sp2):
        if not _target[p[i]]:
            raise _BadRequest("invalid request target")
    if eol - sp2 != 9 or memcmp(p + sp2 + 1, b"HTTP/1.", 7) != 0:
        raise _BadRequest("unsupported HTTP version")
    if p[eol - 1] == b'1':
        http10 = False
    elif p[eol - 1] == b'0':
        http10 = True
    else:
        raise _BadRequest("unsupported HTTP version")

    # the target's form: origin ("/..."), asterisk ("*") or absolute (http(s)://authority...)
    ts = sp1 + 1
    te = sp2
    if not (p[ts] == 0x2F or (te - ts == 1 and p[ts] == 0x2A)):
        if te - ts >= 7 and _ieq(p + ts, b"http://", 7):
            hs = ts + 7
        elif te - ts >= 8 and _ieq(p + ts, b"https://", 8):
            hs = ts + 8
        else:
            raise _BadRequest("invalid request target")
        he = hs
        while he < te and p[he] != 0x2F and p[he] != 0x3F and p[he] != 0x23:
            he += 1
        if not _valid_authority(p, hs, he):
            raise _BadRequest("invalid request target")
        ts = he
        slash = he == te or p[he] != 0x2F

    fb.f = fb.stack = stack
    fb.n = 0
    fb.cap = STACK_FIELDS
    try:
        _parse_fields(p, n, eol + 2, &fb, _BadRequest)
        return _request_head(h, p, &fb, eol, sp1, sp2, http10, ts, te, slash, hs, he,
                             key_kind, key_name)
    finally:
        if fb.f != fb.stack:
            free(fb.f)


cdef RequestHead _request_head(bytes h, const unsigned char* p, Fields* fb,
                               Py_ssize_t eol, Py_ssize_t sp1, Py_ssize_t sp2, bint http10,
                               Py_ssize_t ps, Py_ssize_t pe, bint slash, Py_ssize_t hs,
                               Py_ssize_t he, int key_kind, object key_name):
    """The semantic pass over the recorded fields, in field order; then the output plan."""
    cdef Py_ssize_t k, host_k = -1, run_s, run_e
    cdef long long length = -1
    cdef bint chunked = False, te_seen = False, expect_continue = False, keep, upgrade = False
    cdef bint absolute = hs >= 0
    cdef Conn cn
    cdef Field* f
    cdef int kind, flags = 0
    cdef object drop = None
    cdef RequestHead r

    cn.close = cn.keep_alive = cn.upgrade = False
    cn.ntoks = 0
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        if kind == H_OTHER or kind == H_TRAILER:
            continue
        if kind == H_HOST:
            if host_k >= 0:
                raise _BadRequest("duplicate Host")
            if f.ve > f.vs and not _valid_authority(p, f.vs, f.ve):
                raise _BadRequest("invalid Host")
            host_k = k
        elif kind == H_CONTENT_LENGTH:
            if length >= 0:
                raise _BadRequest("duplicate Content-Length")
            length = _parse_length(p + f.vs, f.ve - f.vs, _BadRequest)
        elif kind == H_TRANSFER_ENCODING:
            if http10:
                raise _BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if te_seen:
                raise _BadRequest("duplicate Transfer-Encoding")
            te_seen = True
            if not (f.ve - f.vs == 7 and _ieq(p + f.vs, b"chunked", 7)):
                raise _BadRequest("unsupported transfer coding", 501)
            chunked = True
        elif kind == H_CONNECTION:
            _connection(p, f, &cn)
        elif kind == H_UPGRADE:
            if f.ve > f.vs:
                upgrade = True
        elif kind == H_EXPECT:
            if f.ve - f.vs == 12 and _ieq(p + f.vs, b"100-continue", 12):
                expect_continue = True
    if chunked and length >= 0:
        raise _BadRequest("both Content-Length and Transfer-Encoding")
    if host_k < 0 and not http10:
        raise _BadRequest("missing Host")

    if http10:
        flags |= REQ_HTTP10
        if cn.keep_alive and not cn.close:
            flags |= REQ_KEEP_ALIVE
    elif not cn.close:
        flags |= REQ_KEEP_ALIVE
    if sp1 == 3:
        if memcmp(p, b"GET", 3) == 0 or memcmp(p, b"PUT", 3) == 0:
            flags |= REQ_IDEMPOTENT
    elif sp1 == 4:
        if memcmp(p, b"HEAD", 4) == 0:
            flags |= REQ_HEAD | REQ_IDEMPOTENT
    elif sp1 == 5:
        if memcmp(p, b"TRACE", 5) == 0:
            flags |= REQ_IDEMPOTENT
    elif sp1 == 6:
        if memcmp(p, b"DELETE", 6) == 0:
            flags |= REQ_IDEMPOTENT
    elif sp1 == 7:
        if memcmp(p, b"OPTIONS", 7) == 0:
            flags |= REQ_IDEMPOTENT
    if expect_continue and not http10:
        flags |= REQ_EXPECT_CONTINUE
    # RFC 9110 7.8 (see the twin)
    if upgrade and cn.upgrade and not http10 and not chunked and length <= 0:
        flags |= REQ_UPGRADE

    r = _new_head()
    r._head = h
    r.key = b""
    r.flags = flags
    if chunked:
        r.framing = BODY_CHUNKED
    elif length > 0:
        r.framing = BODY_LENGTH
        r.length = length
    r._sp1 = sp1
    r._sp2 = sp2
    r._eol = eol
    if not absolute and host_k >= 0:
        # RFC 9112 3.2.2: an absolute-form target's authority overrides Host
        hs = fb.f[host_k].vs
        he = fb.f[host_k].ve
    r._hs = hs
    r._he = he
    r._ps = ps
    r._pe = pe
    r._slash = slash
    r._host_field = host_k >= 0
    r._chunked = chunked
    r._http10 = http10
    r._segs = r._inline
    r._cap = INLINE_SEGS

    # The plan: kept lines in order, verbatim neighbours joined into one copy.
    if cn.ntoks > MAX_DROP_TOKENS:
        drop = _drop_set(p, fb)
    r._line_copied = not http10 and not absolute
    if r._line_copied:
        run_s = 0
        run_e = eol + 2
    else:
        run_s = run_e = 0
        r._size = sp1 + 1 + slash + (pe - ps) + 11
    for k in range(fb.n):
        f = &fb.f[k]
        kind = f.kind
        if kind == H_OTHER:
            keep = not _dropped(p, f, &cn, drop)
        elif kind == H_HOST or kind == H_CONTENT_LENGTH:
            keep = True
        elif kind == H_EXPECT:
            keep = not http10 and not _dropped(p, f, &cn, drop)
        elif kind == H_TRAILER:
            # announces trailers: kept when they are relayed, i.e. the body is chunked
            keep = chunked and not _dropped(p, f, &cn, drop)
        elif kind == H_UPGRADE:
            keep = (flags & REQ_UPGRADE) != 0
        elif kind == H_XF_PROTO or kind == H_XF_HOST or kind == H_FORWARDED:
            # in place, for a trusted proxy only: ends the run of copied lines
            if kind == H_XF_PROTO:
                r._xfp = True
            elif kind == H_XF_HOST:
                r._xfh = True
            if run_e > run_s:
                _add(r, SEG_COPY, run_s, run_e, 0, 0)
            run_s = run_e = 0
            _add(r, SEG_TFIELD, f.start, f.start + f.name_len, f.vs, f.ve)
            continue
        else:
            if kind == H_XFF and f.ve > f.vs:   # an empty one adds no empty element
                _add(r, SEG_XFF, f.vs, f.ve, 0, 0)
            keep = False
        if not keep:
            continue
        if f.verbatim and not (absolute and kind == H_HOST):
            if f.start != run_e:
                if run_e > run_s:
                    _add(r, SEG_COPY, run_s, run_e, 0, 0)
                run_s = f.start
            run_e = f.eol + 2
        else:
            if run_e > run_s:
                _add(r, SEG_COPY, run_s, run_e, 0, 0)
            run_s = run_e = 0
            if kind == H_HOST:
                _add(r, SEG_FIELD, f.start, f.start + f.name_len, hs, he)
            else:
                _add(r, SEG_FIELD, f.start, f.start + f.name_len, f.vs, f.ve)
    if run_e > run_s:
        _add(r, SEG_COPY, run_s, run_e, 0, 0)
    if host_k < 0 and absolute:
        r._size += 6 + (he - hs) + 2
    if flags & REQ_UPGRADE:
        r._size += 21                # Connection: upgrade\r\n
    if chunked:
        r._size += 28
    r._size += 17 + 21 + 2           # X-Forwarded-For: ... \r\nX-Forwarded-Proto: ... \r\n
    if he > hs:
        r._size += 18 + (he - hs) + 2
    r._size += 2

    if key_kind != KEY_NONE:
        _request_key(r, p, fb, key_kind, key_name)
    return r


# ---------------------------------------------------------------- request ids
#
# After the parse, on its plan (see the twin for what is kept): the head's
# field lines are found again (they are valid: a line is NAME ":" value CRLF),
# and a client's field of that name is kept if it is the only one, valid, and
# in the plan (not dropped as named in Connection); otherwise its lines leave
# the plan and a new id is written after the client's fields (SEG_RID).

cdef Py_ssize_t _plan_seg(RequestHead r, Py_ssize_t s) noexcept:
    """The segment of the plan that writes the field line starting at ``s``, or -1."""
    cdef Py_ssize_t k
    cdef Seg* g
    for k in range(r._nseg):
        g = &r._segs[k]
        if g.kind == SEG_COPY:
            if g.a <= s < g.b:
                return k
        elif g.kind == SEG_FIELD and g.a == s:
            return k
    return -1


cdef int _plan_drop(RequestHead r, Py_ssize_t s, Py_ssize_t e) except -1:
    """Leave the field line p[s:e] (CRLF included) out of the plan."""
    cdef Py_ssize_t k = _plan_seg(r, s)
    cdef Seg* g
    if k < 0:
        return 0
    g = &r._segs[k]
    if g.kind == SEG_FIELD:
        r._size -= (g.b - g.a) + (g.d - g.c) + 4
    else:
        r._size -= e - s
        if g.a < s and e < g.b:     # in the middle of a run: split it in two
            if r._nseg == r._cap:
                _grow_segs(r)
                g = &r._segs[k]
            memmove(&r._segs[k + 2], &r._segs[k + 1], (r._nseg - k - 1) * sizeof(Seg))
            r._nseg += 1
            r._segs[k + 1] = r._segs[k]
            r._segs[k + 1].a = e
            g.b = s
            return 0
        if g.a < s:
            g.b = s
            return 0
        if e < g.b:
            g.a = e
            return 0
    memmove(&r._segs[k], &r._segs[k + 1], (r._nseg - k - 1) * sizeof(Seg))
    r._nseg -= 1
    return 0


# the fields _classify gives a kind (the twin's _KINDS)
_PARSED_FIELDS = frozenset([
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"expect"])
cdef object _plain_name = None     # the last name _plain_field said True of


cdef bint _plain_field(bytes name) except -1:
    """``name`` is a field the parser gives no meaning to (H_OTHER)."""
    global _plain_name
    if name is _plain_name:
        return True
    if name.lower() in _PARSED_FIELDS:
        return False
    _plain_name = name
    return True


cpdef bytes assign_request_id(parsed, request_id_header):
    """Give a parsed head its request id, and return it.

    See ``fastlb._core_py.assign_request_id``: this is its compiled twin; a
    C call for the modules that cimport it (``_core.pxd``).
    """
    if type(parsed) is not RequestHead:
        raise TypeError(f"parsed must be a RequestHead, not {type(parsed).__name__}")
    cdef RequestHead r = <RequestHead>parsed
    if r._head is None:
        raise TypeError("parsed must come from parse_request_head")
    if not PyBytes_CheckExact(request_id_header) or PyBytes_GET_SIZE(request_id_header) == 0:
        raise TypeError("request_id_header must be a field name (bytes)")
    if not r._rid_on:
        _request_id(r, <bytes>request_id_header)
    return r._rid


cdef int _request_id(RequestHead r, bytes rid_name) except -1:
    """The request's id, on the parsed head ``r`` (see the comment above)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(r._head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(r._head) - 2     # the final CRLF
    cdef const unsigned char* nm = <const unsigned char*>PyBytes_AS_STRING(rid_name)
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(rid_name)
    cdef Py_ssize_t pos = r._eol + 2, eol, first = -1, count = 0, vs = 0, ve = 0
    cdef const unsigned char* q
    cdef Seg* g
    r._rid_name = rid_name
    r._rid_on = True
    if not _plain_field(rid_name):
        n = 0                       # a field the parser handles itself: never the id
    while pos < n:
        q = <const unsigned char*>memchr(p + pos, 0x0D, n - pos)
        eol = q - p
        if eol - pos > nl and p[pos + nl] == 0x3A and _ieq2(p + pos, nm, nl):
            count += 1
            if first < 0:
                first = pos
                vs = pos + nl + 1
                while _ows(p[vs]):
                    vs += 1
                ve = eol
                while ve > vs and _ows(p[ve - 1]):
                    ve -= 1
        pos = eol + 2
    if count and _plan_seg(r, first) >= 0:
        if count == 1 and _valid_rid(p + vs, ve - vs):
            r._rid = PyBytes_FromStringAndSize(<const char*>p + vs, ve - vs)
            return 0
        pos = first
        while pos < n:
            q = <const unsigned char*>memchr(p + pos, 0x0D, n - pos)
            eol = q - p
            if eol - pos > nl and p[pos + nl] == 0x3A and _ieq2(p + pos, nm, nl):
                _plan_drop(r, pos, eol + 2)
            pos = eol + 2
    r._rid = new_request_id()
    if r._nseg == r._cap:
        _grow_segs(r)
    g = &r._segs[r._nseg]
    r._nseg += 1
    g.kind = SEG_RID
    g.a = g.b = g.c = g.d = 0
    r._size += nl + 2 + RID_LEN + 2
    return 0


cdef int _request_key(RequestHead r, const unsigned char* p, Fields* fb, int key_kind,
                      object key_name) except -1:
    cdef const unsigned char* nm = NULL
    cdef Py_ssize_t nl = 0, k, s, e, j
    cdef Field* f
    if key_kind != KEY_PATH:
        nm = <const unsigned char*>PyBytes_AS_STRING(key_name)   # bytes, checked by the caller
        nl = PyBytes_GET_SIZE(key_name)
    if key_kind == KEY_PATH:
        if r._slash:
            r.key = b"/"
            return 0
        e = r._pe
        j = _find(p, r._ps, e, 0x3F)  # '?'
        if j >= 0:
            e = j
        j = _find(p, r._ps, e, 0x23)  # '#'
        if j >= 0:
            e = j
        r.key = PyBytes_FromStringAndSize(<const char*>p + r._ps, e - r._ps)
    elif key_kind == KEY_QUERY:
        if _query_span(p, r._sp1 + 1, r._sp2, nm, nl, &s, &e):
            r.key = PyBytes_FromStringAndSize(<const char*>p + s, e - s)
    elif key_kind == KEY_HEADER:
        for k in range(fb.n):
            f = &fb.f[k]
            if f.name_len == nl and _ieq2(p + f.start, nm, nl):
                r.key = PyBytes_FromStringAndSize(<const char*>p + f.vs, f.ve - f.vs)
                return 0
    else:
        for k in range(fb.n):
            f = &fb.f[k]
            if f.name_len == 6 and _ieq(p + f.start, b"cookie", 6):
                if _cookie_span(p, f.vs, f.ve, nm, nl, &s, &e):
                    r.key = PyBytes_FromStringAndSize(<const char*>p + s, e - s)
                    return 0
    return 0


cpdef bytes write_request_head(parsed, client_ip, proto=b"http", via=b"fastlb", backend_authority=b"",
                               bint trusted=False):
    """The head to send upstream for ``parsed`` (a ``RequestHead``), as HTTP/1.1.

    See ``fastlb._core_py.write_request_head``: this is its compiled twin.
    """
    if type(parsed) is not RequestHead:
        raise TypeError(f"parsed must be a RequestHead, not {type(parsed).__name__}")
    cdef RequestHead r = <RequestHead>parsed
    if r._head is None:
        raise TypeError("parsed must come from parse_request_head")
    cdef bytes ip = _as_bytes(client_ip, "client_ip")
    cdef bytes pr = _as_bytes(proto, "proto")
    cdef bytes vi = _opt_bytes(via, "via")
    cdef bytes hd = _opt_bytes(backend_authority, "backend_authority")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(r._head)
    cdef Py_ssize_t vl = PyBytes_GET_SIZE(vi), hl = PyBytes_GET_SIZE(hd), k
    cdef Py_ssize_t size = r._size + PyBytes_GET_SIZE(ip) + PyBytes_GET_SIZE(pr)
    cdef bint default_host = not r._host_field and r._hs < 0 and hl > 0
    cdef Seg* s
    cdef bytes out
    cdef char* w
    cdef char* start
    if vl:
        size += 9 + vl + 2
    if default_host:
        size += 6 + hl + 2
    if trusted:
        # its own fields go on, and fastlb's X-Forwarded-Proto / -Host only
        # when it sent none
        size += r._tsize
        if r._xfp:
            size -= 19 + PyBytes_GET_SIZE(pr) + 2
        if r._xfh and r._he > r._hs:
            size -= 18 + (r._he - r._hs) + 2
    out = PyBytes_FromStringAndSize(NULL, size)
    w = start = PyBytes_AS_STRING(out)
    if not r._line_copied:
        w = _put(w, p, r._sp1 + 1)
        if r._slash:
            w[0] = b'/'
            w += 1
        w = _put(w, p + r._ps, r._pe - r._ps)
        w = _put(w, b" HTTP/1.1\r\n", 11)
    for k in range(r._nseg):
        s = &r._segs[k]
        if s.kind == SEG_COPY:
            w = _put(w, p + s.a, s.b - s.a)
        elif s.kind == SEG_FIELD or (s.kind == SEG_TFIELD and trusted):
            w = _put(w, p + s.a, s.b - s.a)
            w = _put(w, b": ", 2)
            w = _put(w, p + s.c, s.d - s.c)
            w = _put(w, b"\r\n", 2)
        elif s.kind == SEG_RID:
            w = _put(w, PyBytes_AS_STRING(r._rid_name), PyBytes_GET_SIZE(r._rid_name))
            w = _put(w, b": ", 2)
            w = _put(w, PyBytes_AS_STRING(r._rid), RID_LEN)
            w = _put(w, b"\r\n", 2)
    if not r._host_field:
        if r._hs >= 0:
            w = _put(w, b"Host: ", 6)
            w = _put(w, p + r._hs, r._he - r._hs)
            w = _put(w, b"\r\n", 2)
        elif default_host:
            w = _put(w, b"Host: ", 6)
            w = _put(w, PyBytes_AS_STRING(hd), hl)
            w = _put(w, b"\r\n", 2)
    if r.flags & REQ_UPGRADE:
        w = _put(w, b"Connection: upgrade\r\n", 21)
    if r._chunked:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    w = _put(w, b"X-Forwarded-For: ", 17)
    if trusted:
        for k in range(r._nseg):
            s = &r._segs[k]
            if s.kind == SEG_XFF:
                w = _put(w, p + s.a, s.b - s.a)
                w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(ip), PyBytes_GET_SIZE(ip))
    if trusted and r._xfp:
        w = _put(w, b"\r\n", 2)
    else:
        w = _put(w, b"\r\nX-Forwarded-Proto: ", 21)
        w = _put(w, PyBytes_AS_STRING(pr), PyBytes_GET_SIZE(pr))
        w = _put(w, b"\r\n", 2)
    if r._he > r._hs and not (trusted and r._xfh):
        w = _put(w, b"X-Forwarded-Host: ", 18)
        w = _put(w, p + r._hs, r._he - r._hs)
        w = _put(w, b"\r\n", 2)
    if vl:
        w = _put(w, b"Via: 1.0 " if r._http10 else b"Via: 1.1 ", 9)
        w = _put(w, PyBytes_AS_STRING(vi), vl)
        w = _put(w, b"\r\n", 2)
    w = _put(w, b"\r\n", 2)
    if w - start != size:
        raise SystemError("write_request_head: size mismatch")
    return out
