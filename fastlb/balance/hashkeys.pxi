# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/balance/hashkeys.py.

# ---------------------------------------------------------------- hash keys

cdef inline Py_ssize_t _find(const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                             unsigned char c) noexcept nogil:
    cdef const unsigned char* q
    if start >= end:
        return -1
    q = <const unsigned char*>memchr(p + start, c, end - start)
    return -1 if q == NULL else q - p


cdef inline Py_ssize_t _find_crlf2(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    # like bytes.find(b"\r\n", pos), over p[:n]
    return _find_crlf(p, pos, n) if pos < n else -1


cdef inline void _strip_ows(const unsigned char* p, Py_ssize_t* s, Py_ssize_t* e) noexcept nogil:
    while s[0] < e[0] and _ows(p[s[0]]):
        s[0] += 1
    while e[0] > s[0] and _ows(p[e[0] - 1]):
        e[0] -= 1


cdef bint _query_span(const unsigned char* p, Py_ssize_t ts, Py_ssize_t te, const unsigned char* nm,
                      Py_ssize_t nl, Py_ssize_t* vs, Py_ssize_t* ve) noexcept nogil:
    """The value p[vs:ve] of the first query parameter ``nm`` of the target p[ts:te]; False if none."""
    cdef Py_ssize_t j, s, e, pe, eq
    j = _find(p, ts, te, 0x3F)  # '?'
    if j < 0:
        return False
    s = j + 1
    e = te
    j = _find(p, s, e, 0x23)  # '#'
    if j >= 0:
        e = j
    while True:
        pe = _find(p, s, e, 0x26)  # '&'
        if pe < 0:
            pe = e
        eq = _find(p, s, pe, 0x3D)  # '='
        if eq < 0:
            if pe - s == nl and memcmp(p + s, nm, nl) == 0:
                return False
        elif eq - s == nl and memcmp(p + s, nm, nl) == 0:
            vs[0] = eq + 1
            ve[0] = pe
            return True
        if pe >= e:
            return False
        s = pe + 1


cdef bint _cookie_span(const unsigned char* p, Py_ssize_t vs, Py_ssize_t ve, const unsigned char* nm,
                       Py_ssize_t nl, Py_ssize_t* cs, Py_ssize_t* ce) noexcept nogil:
    """The value p[cs:ce] of cookie ``nm`` in the Cookie value p[vs:ve]; False if it has none."""
    cdef Py_ssize_t s = vs, pe, eq, a, b
    while True:
        pe = _find(p, s, ve, 0x3B)  # ';'
        if pe < 0:
            pe = ve
        eq = _find(p, s, pe, 0x3D)
        if eq >= 0:
            a = s
            b = eq
            _strip_ows(p, &a, &b)
            if b - a == nl and memcmp(p + a, nm, nl) == 0:
                a = eq + 1
                b = pe
                _strip_ows(p, &a, &b)
                cs[0] = a
                ce[0] = b
                return True
        if pe >= ve:
            return False
        s = pe + 1


def hash_key(head, kind, name=b""):
    """The bytes a hash-based balancer hashes, taken from a raw request head; b"" when absent.

    See ``fastlb._core_py.hash_key``: this is its compiled twin.
    """
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    cdef int k
    if kind == "path":
        k = 0
    elif kind == "query":
        k = 1
    elif kind == "header":
        k = 2
    elif kind == "cookie":
        k = 3
    else:
        raise ValueError(f"unknown hash key kind: {kind!r}")
    if isinstance(name, str):
        name = name.encode("latin-1")
    elif type(name) is not bytes:
        raise TypeError("name must be bytes or str")
    if k != 0 and PyBytes_GET_SIZE(name) == 0:
        raise ValueError(f"a {kind} hash key needs a name")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef const unsigned char* nm = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t eol, sp1, sp2, ts, te, j, s, e, pos, colon, vs, ve
    # request line and target, as _request_target of hashkeys.py
    eol = _find_crlf2(p, 0, n)
    if eol < 0:
        eol = n
    sp1 = _find(p, 0, eol, 0x20)
    sp2 = -1
    j = eol - 1
    while j >= 0:
        if p[j] == 0x20:
            sp2 = j
            break
        j -= 1
    if sp1 < 0 or sp2 <= sp1:
        ts = te = 0
    else:
        ts = sp1 + 1
        te = sp2
    if k == 0:
        e = te
        j = _find(p, ts, e, 0x3F)  # '?'
        if j >= 0:
            e = j
        j = _find(p, ts, e, 0x23)  # '#'
        if j >= 0:
            e = j
        if e > ts and p[ts] == 0x2F:
            return PyBytes_FromStringAndSize(<const char*>p + ts, e - ts)
        j = ts
        while j + 3 <= e:
            if p[j] == 0x3A and p[j + 1] == 0x2F and p[j + 2] == 0x2F:
                s = _find(p, j + 3, e, 0x2F)
                if s >= 0:
                    return PyBytes_FromStringAndSize(<const char*>p + s, e - s)
                return b"/"
            j += 1
        return PyBytes_FromStringAndSize(<const char*>p + ts, e - ts)
    if k == 1:
        if _query_span(p, ts, te, nm, nl, &s, &e):
            return PyBytes_FromStringAndSize(<const char*>p + s, e - s)
        return b""
    # header or cookie: field lines
    cdef const unsigned char* want = <const unsigned char*>b"cookie" if k == 3 else nm
    cdef Py_ssize_t wl = 6 if k == 3 else nl
    pos = eol + 2
    while pos < n:
        e = _find_crlf2(p, pos, n)
        if e < 0:
            e = n
        if e == pos:
            break
        colon = _find(p, pos, e, 0x3A)
        if colon > pos and colon - pos == wl and _ieq2(p + pos, want, wl):
            vs = colon + 1
            ve = e
            _strip_ows(p, &vs, &ve)
            if k == 2:
                return PyBytes_FromStringAndSize(<const char*>p + vs, ve - vs)
            if _cookie_span(p, vs, ve, nm, nl, &s, &e):
                return PyBytes_FromStringAndSize(<const char*>p + s, e - s)
        pos = e + 2
    return b""


def field_value(head, name):
    """The value of the first field called ``name`` in a raw request head; None when none is.

    See ``fastlb._core_py.field_value``: this is its compiled twin.
    """
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    if isinstance(name, str):
        name = name.encode("latin-1")
    elif type(name) is not bytes:
        raise TypeError("name must be bytes or str")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(head)
    cdef const unsigned char* nm = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t pos, e, colon, vs, ve
    if nl == 0:
        return None
    e = _find_crlf2(p, 0, n)
    if e < 0:
        return None
    pos = e + 2
    while pos < n:
        e = _find_crlf2(p, pos, n)
        if e < 0:
            e = n
        if e == pos:
            break
        colon = _find(p, pos, e, 0x3A)
        if colon > pos and colon - pos == nl and _ieq2(p + pos, nm, nl):
            vs = colon + 1
            ve = e
            _strip_ows(p, &vs, &ve)
            return PyBytes_FromStringAndSize(<const char*>p + vs, ve - vs)
        pos = e + 2
    return None
