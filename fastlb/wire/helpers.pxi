# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/helpers.py.

# ---------------------------------------------------------------- helpers

cdef struct Field:
    Py_ssize_t start      # start of the line (= of the name)
    Py_ssize_t name_len
    Py_ssize_t vs         # value, OWS stripped: [vs, ve)
    Py_ssize_t ve
    Py_ssize_t eol        # the CR of the line's CRLF
    int kind
    bint verbatim         # the line is exactly "name: value\r\n"
    bint keep             # written to the output


cdef struct Fields:
    Field* f
    Field* stack
    Py_ssize_t n
    Py_ssize_t cap


cdef struct Tok:
    Py_ssize_t off
    Py_ssize_t len


cdef struct Conn:
    bint close
    bint keep_alive
    bint upgrade          # an "upgrade" token
    int ntoks             # > MAX_DROP_TOKENS: overflowed, use a Python set
    Tok toks[MAX_DROP_TOKENS]


cdef inline bint _ows(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x09


cdef inline bint _ieq(const unsigned char* s, const char* low, Py_ssize_t n) noexcept nogil:
    """``s[:n].lower() == low`` for ``low`` made of lowercase letters, digits and '-'.

    ``c | 0x20`` is exact here: the bytes compared were validated (no
    controls), and only 'A'-'Z' fold onto the letters of ``low``. Compared
    eight or four bytes at a time (the last word overlapping the one before),
    so a field name costs a few instructions whatever its length.
    """
    cdef Py_ssize_t i
    cdef uint64_t a, b
    cdef uint32_t c, d
    if n >= 8:
        i = 0
        while i + 8 <= n:
            memcpy(&a, s + i, 8)
            memcpy(&b, low + i, 8)
            if (a | <uint64_t>0x2020202020202020) != b:
                return False
            i += 8
        if i < n:
            memcpy(&a, s + n - 8, 8)
            memcpy(&b, low + n - 8, 8)
            return (a | <uint64_t>0x2020202020202020) == b
        return True
    if n >= 4:
        memcpy(&c, s, 4)
        memcpy(&d, low, 4)
        if (c | <uint32_t>0x20202020) != d:
            return False
        memcpy(&c, s + n - 4, 4)
        memcpy(&d, low + n - 4, 4)
        return (c | <uint32_t>0x20202020) == d
    for i in range(n):
        if (s[i] | 0x20) != <unsigned char>low[i]:
            return False
    return True


cdef inline bint _ieq2(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if _lower[a[i]] != _lower[b[i]]:
            return False
    return True


cdef inline Py_ssize_t _find_crlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    cdef const unsigned char* q
    while pos < n - 1:
        q = <const unsigned char*>memchr(p + pos, 0x0D, n - 1 - pos)
        if q == NULL:
            return -1
        pos = q - p
        if p[pos + 1] == 0x0A:
            return pos
        pos += 1
    return -1


cdef inline int _classify(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef unsigned char c = s[0] | 0x20
    if n == 2:
        if _ieq(s, b"te", 2):
            return H_HOP
    elif n == 4:
        if _ieq(s, b"host", 4):
            return H_HOST
    elif n == 6:
        if _ieq(s, b"expect", 6):
            return H_EXPECT
    elif n == 7:
        if c == b't':
            if _ieq(s, b"trailer", 7):
                return H_TRAILER
        elif c == b'u':
            if _ieq(s, b"upgrade", 7):
                return H_UPGRADE
    elif n == 9:
        if _ieq(s, b"forwarded", 9):
            return H_FORWARDED
    elif n == 10:
        if c == b'c':
            if _ieq(s, b"connection", 10):
                return H_CONNECTION
        elif c == b'k':
            if _ieq(s, b"keep-alive", 10):
                return H_HOP
    elif n == 14:
        if _ieq(s, b"content-length", 14):
            return H_CONTENT_LENGTH
    elif n == 15:
        if _ieq(s, b"x-forwarded-for", 15):
            return H_XFF
    elif n == 16:
        if c == b'p':
            if _ieq(s, b"proxy-connection", 16):
                return H_HOP
        elif c == b'x':
            if _ieq(s, b"x-forwarded-host", 16):
                return H_XF_HOST
    elif n == 17:
        if c == b't':
            if _ieq(s, b"transfer-encoding", 17):
                return H_TRANSFER_ENCODING
        elif c == b'x':
            if _ieq(s, b"x-forwarded-proto", 17):
                return H_XF_PROTO
    return H_OTHER


cdef extern from *:
    """
    #if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define FASTLB_CTZ_LE 1
    #define fastlb_first_byte(m) ((Py_ssize_t)(__builtin_ctzll(m) >> 3))
    #else
    #define FASTLB_CTZ_LE 0
    #define fastlb_first_byte(m) ((Py_ssize_t)0)
    #endif
    """
    const bint FASTLB_CTZ_LE
    Py_ssize_t fastlb_first_byte(uint64_t m) noexcept nogil


# 16 bytes at a time with SSE2 (every x86-64 CPU has it): where a field name
# or value ends. Where fewer than 16 bytes are left they stop, and the
# caller's loops go on from there, so the result is the same as without them
# (they are left out where SSE2 is not available: FASTLB_SSE2 is 0).
cdef extern from *:
    """
    #if defined(__SSE2__) && defined(__GNUC__)
    #include <emmintrin.h>
    #define FASTLB_SSE2 1
    /* the first byte at or after q that is not a letter, digit or '-' */
    static inline Py_ssize_t fastlb_skip_name16(const unsigned char* p, Py_ssize_t q, Py_ssize_t n) {
        const __m128i c20 = _mm_set1_epi8(0x20), ca = _mm_set1_epi8('a'), c25 = _mm_set1_epi8(25);
        const __m128i c0 = _mm_set1_epi8('0'), c9 = _mm_set1_epi8(9), dash = _mm_set1_epi8('-');
        while (q + 16 <= n) {
            __m128i x = _mm_loadu_si128((const __m128i*)(p + q));
            __m128i l = _mm_sub_epi8(_mm_or_si128(x, c20), ca);
            __m128i d = _mm_sub_epi8(x, c0);
            __m128i ok = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(l, c25), l),
                             _mm_cmpeq_epi8(_mm_min_epu8(d, c9), d)),
                _mm_cmpeq_epi8(x, dash));
            unsigned m = (~(unsigned)_mm_movemask_epi8(ok)) & 0xFFFFu;
            if (m)
                return q + __builtin_ctz(m);
            q += 16;
        }
        return q;
    }
    /* 1 with *q at the first byte from *q on below 0x20 or equal to 0x7F but
       HTAB (a byte that ends a field value); 0 with *q where fewer than 16
       bytes are left, none found before it */
    static inline int fastlb_value16(const unsigned char* p, Py_ssize_t* pq, Py_ssize_t n) {
        const __m128i c1f = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F);
        Py_ssize_t q = *pq;
        while (q + 16 <= n) {
            __m128i x = _mm_loadu_si128((const __m128i*)(p + q));
            __m128i bad = _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(x, c1f), x),
                                       _mm_cmpeq_epi8(x, del));
            unsigned m = (unsigned)_mm_movemask_epi8(bad);
            if (m == 0) {
                q += 16;
                continue;
            }
            q += __builtin_ctz(m);
            if (p[q] != 0x09) {
                *pq = q;
                return 1;
            }
            q += 1;
        }
        *pq = q;
        return 0;
    }
    #else
    #define FASTLB_SSE2 0
    #define fastlb_skip_name16(p, q, n) (q)
    #define fastlb_value16(p, pq, n) 0
    #endif
    """
    const bint FASTLB_SSE2
    Py_ssize_t fastlb_skip_name16(const unsigned char* p, Py_ssize_t q, Py_ssize_t n) noexcept nogil
    bint fastlb_value16(const unsigned char* p, Py_ssize_t* q, Py_ssize_t n) noexcept nogil


cdef inline Py_ssize_t _scan_value(const unsigned char* p, Py_ssize_t q, Py_ssize_t n) noexcept nogil:
    """Index of the first byte at or after ``q`` that is not a field-value byte.

    Eight bytes at a time while no byte is below 0x20 or equal to 0x7F (exact
    "has less than" / "has zero" bit tricks), then byte by byte with the table.
    The caller guarantees a non-value byte (the head's final CR) before ``n``.
    """
    cdef uint64_t x, y, m
    if FASTLB_SSE2 and fastlb_value16(p, &q, n):
        return q
    while q + 8 <= n:
        memcpy(&x, p + q, 8)
        y = x ^ <uint64_t>0x7F7F7F7F7F7F7F7F
        m = (((x - <uint64_t>0x2020202020202020) & ~x) | ((y - <uint64_t>0x0101010101010101) & ~y)) \
            & <uint64_t>0x8080808080808080
        if m == 0:
            q += 8
            continue
        if FASTLB_CTZ_LE:
            # the lowest flagged byte is a true hit (borrows only run upwards)
            q += fastlb_first_byte(m)
            if p[q] != 0x09:
                return q
            q += 1
            continue
        for q in range(q, q + 8):
            if not _vchar[p[q]]:
                return q
        q += 1
    while _vchar[p[q]]:
        q += 1
    return q


cdef int _grow(Fields* fb) except -1:
    cdef Py_ssize_t cap = fb.cap * 2
    cdef Field* f
    if fb.f == fb.stack:
        f = <Field*>malloc(cap * sizeof(Field))
        if f != NULL:
            memcpy(f, fb.stack, fb.n * sizeof(Field))
    else:
        f = <Field*>realloc(fb.f, cap * sizeof(Field))
    if f == NULL:
        raise MemoryError()
    fb.f = f
    fb.cap = cap
    return 0


cdef int _field_error(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos, object exc) except -1:
    """Raise the twin's error for a field line whose name is not a token before ':'."""
    cdef Py_ssize_t eol = _find_crlf(p, pos, n)
    cdef const void* colon = memchr(p + pos, 0x3A, eol - pos)
    if colon == NULL or colon == <const void*>(p + pos):
        raise exc("invalid header line")
    raise exc("invalid header name")


cdef int _parse_fields(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos, Fields* fb, object exc) except -1:
    """Validate every field line from ``pos`` and record it in ``fb``.

    The head ends with CRLF CRLF, so every scan below stops inside it.
    """
    cdef Py_ssize_t end = n - 2
    cdef Py_ssize_t q, colon, vs, ve
    cdef Field* f
    while pos < end:
        q = pos
        if FASTLB_SSE2:
            q = fastlb_skip_name16(p, q, n)
        while _tchar[p[q]]:
            q += 1
        if p[q] != 0x3A or q == pos:
            return _field_error(p, n, pos, exc)
        colon = q
        q = _scan_value(p, q + 1, n)
        if p[q] != 0x0D or p[q + 1] != 0x0A:
            raise exc("invalid byte in header value")
        vs = colon + 1
        while vs < q and _ows(p[vs]):
            vs += 1
        ve = q
        while ve > vs and _ows(p[ve - 1]):
            ve -= 1
        if fb.n == fb.cap:
            _grow(fb)
        f = &fb.f[fb.n]
        fb.n += 1
        f.start = pos
        f.name_len = colon - pos
        f.vs = vs
        f.ve = ve
        f.eol = q
        f.kind = _classify(p + pos, colon - pos)
        f.verbatim = vs == colon + 2 and ve == q and p[colon + 1] == 0x20
        f.keep = False
        pos = q + 2
    return 0


cdef long long _parse_length(const unsigned char* s, Py_ssize_t n, object exc) except -1:
    cdef unsigned long long v = 0
    cdef Py_ssize_t i
    if n == 0 or n > 19:
        raise exc("invalid Content-Length")
    for i in range(n):
        if s[i] < 0x30 or s[i] > 0x39:
            raise exc("invalid Content-Length")
        v = v * 10 + (s[i] - 0x30)
    if v > MAX_CONTENT_LENGTH:
        raise exc("Content-Length too large")
    return <long long>v


cdef inline Py_ssize_t _next_token(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end,
                                   Py_ssize_t* tlen) noexcept nogil:
    """Next non-empty, OWS-stripped, comma-separated token of p[pos:end]; -1 when none."""
    cdef Py_ssize_t i = pos[0], s, e
    while i < end:
        s = i
        while i < end and p[i] != 0x2C:
            i += 1
        e = i
        if i < end:
            i += 1
        while s < e and _ows(p[s]):
            s += 1
        while e > s and _ows(p[e - 1]):
            e -= 1
        if e > s:
            pos[0] = i
            tlen[0] = e - s
            return s
    pos[0] = i
    return -1


cdef inline void _connection(const unsigned char* p, Field* f, Conn* cn) noexcept nogil:
    cdef Py_ssize_t pos = f.vs, s, tl
    while True:
        s = _next_token(p, &pos, f.ve, &tl)
        if s < 0:
            return
        if tl == 5 and _ieq(p + s, b"close", 5):
            cn.close = True
        elif tl == 10 and _ieq(p + s, b"keep-alive", 10):
            cn.keep_alive = True
        elif (tl == 4 and _ieq(p + s, b"host", 4)) or (tl == 14 and _ieq(p + s, b"content-length", 14)):
            pass
        else:
            if tl == 7 and _ieq(p + s, b"upgrade", 7):
                cn.upgrade = True
            if cn.ntoks < MAX_DROP_TOKENS:
                cn.toks[cn.ntoks].off = s
                cn.toks[cn.ntoks].len = tl
                cn.ntoks += 1
            else:
                cn.ntoks = MAX_DROP_TOKENS + 1


cdef inline bint _in_drop(const unsigned char* p, Field* f, Conn* cn) noexcept nogil:
    cdef int t
    for t in range(cn.ntoks):
        if cn.toks[t].len == f.name_len and _ieq2(p + f.start, p + cn.toks[t].off, f.name_len):
            return True
    return False


cdef bytes _lower_bytes(const unsigned char* s, Py_ssize_t n):
    # NULL then fill: never write into the interpreter's shared 1-byte bytes objects
    cdef bytes b = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t i
    for i in range(n):
        w[i] = _lower[s[i]]
    return b


cdef set _drop_set(const unsigned char* p, Fields* fb):
    """The twin's ``drop`` set, for heads naming more than MAX_DROP_TOKENS fields."""
    cdef set drop = set()
    cdef Py_ssize_t k, pos, s, tl
    cdef Field* f
    for k in range(fb.n):
        f = &fb.f[k]
        if f.kind != H_CONNECTION:
            continue
        pos = f.vs
        while True:
            s = _next_token(p, &pos, f.ve, &tl)
            if s < 0:
                break
            tok = _lower_bytes(p + s, tl)
            if tok not in (b"close", b"keep-alive", b"host", b"content-length"):
                drop.add(tok)
    return drop


cdef inline bint _dropped(const unsigned char* p, Field* f, Conn* cn, object drop) except -1:
    if cn.ntoks == 0:
        return False
    if cn.ntoks <= MAX_DROP_TOKENS:
        return _in_drop(p, f, cn)
    return _lower_bytes(p + f.start, f.name_len) in drop


cdef inline bytes _as_bytes(object o, str what):
    if PyBytes_CheckExact(o):
        return <bytes>o
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o)
    raise TypeError(f"{what} must be bytes, not {type(o).__name__}")


cdef inline bytes _opt_bytes(object o, str what):
    if PyBytes_CheckExact(o):
        return <bytes>o
    if o is None:
        return b""
    return _as_bytes(o, what)


cdef inline char* _put(char* w, const void* s, Py_ssize_t n) noexcept nogil:
    memcpy(w, s, n)
    return w + n


cdef inline char* _put_field(char* w, const unsigned char* p, Field* f) noexcept nogil:
    memcpy(w, p + f.start, f.name_len)
    w += f.name_len
    w[0] = b':'
    w[1] = b' '
    w += 2
    memcpy(w, p + f.vs, f.ve - f.vs)
    w += f.ve - f.vs
    w[0] = b'\r'
    w[1] = b'\n'
    return w + 2


cdef inline char* _put_fields(char* w, const unsigned char* p, Fields* fb,
                              Py_ssize_t run_s, Py_ssize_t run_e) noexcept nogil:
    """Write the kept fields; verbatim lines adjacent to ``[run_s, run_e)`` join one memcpy."""
    cdef Py_ssize_t k
    cdef Field* f
    for k in range(fb.n):
        f = &fb.f[k]
        if not f.keep:
            continue
        if f.verbatim:
            if f.start == run_e:
                run_e = f.eol + 2
                continue
            if run_e > run_s:
                w = _put(w, p + run_s, run_e - run_s)
            run_s = f.start
            run_e = f.eol + 2
        else:
            if run_e > run_s:
                w = _put(w, p + run_s, run_e - run_s)
            run_s = run_e = -1
            w = _put_field(w, p, f)
    if run_e > run_s:
        w = _put(w, p + run_s, run_e - run_s)
    return w
