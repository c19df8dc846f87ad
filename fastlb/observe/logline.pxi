# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/observe/logline.py.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cpdef long long monotonic_us() noexcept:
    """The monotonic clock (``time.monotonic``'s) in whole microseconds; a C
    call for the modules that cimport it (``_core.pxd``)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000 + ts.tv_nsec // 1000

# ---------------------------------------------------------------- access log

cdef enum:
    FMT_COMBINED = 0
    FMT_JSON = 1
    FMT_COMBINED_ID = 2         # combined, then the request id
    LOG_STACK = 2048            # lines up to this size are built on the stack
    LOG_SLACK = 16384           # a new batch has room for limit + this many bytes

cdef double LOG_MAX_SECONDS = 1e9
cdef unsigned char _logesc[256]     # 1: written as \xHH (nginx's escape=default)
cdef const char* _HEXU = b"0123456789ABCDEF"


cdef void _init_log_tables() noexcept:
    cdef int c
    for c in range(256):
        _logesc[c] = 1 if (c < 0x20 or c >= 0x7F or c == 0x22 or c == 0x5C) else 0


_init_log_tables()


cdef struct Span:
    const unsigned char* p
    Py_ssize_t n                # -1: absent


cdef inline bint _ieq_low(const unsigned char* s, const char* low, Py_ssize_t n) noexcept nogil:
    """``s[:n].lower() == low`` for any bytes ``s`` (ASCII folding only)."""
    cdef Py_ssize_t i
    for i in range(n):
        if _lower[s[i]] != <unsigned char>low[i]:
            return False
    return True


cdef inline void _log_value(const unsigned char* p, Py_ssize_t pos, Py_ssize_t le,
                            Py_ssize_t k, Span* out) noexcept nogil:
    # the value of the field line p[pos:le] whose name is k bytes, if not seen yet
    if out.n >= 0:
        return
    cdef Py_ssize_t s = pos + k + 1, e = le
    while s < e and _ows(p[s]):
        s += 1
    while e > s and _ows(p[e - 1]):
        e -= 1
    out.p = p + s
    out.n = e - s


cdef Py_ssize_t _log_parts(const unsigned char* p, Py_ssize_t n, bint json, Span* line,
                           Span* ref, Span* ua, Span* rid) noexcept nogil:
    """The request line and Referer, User-Agent (combined) or X-Request-Id (json):
    see ``_log_parts`` of ``logline.py``; combined_id: ``_log_parts_id``."""
    cdef const unsigned char* q = <const unsigned char*>memchr(p, 10, n)
    cdef Py_ssize_t lf, pos, e, le, ln
    cdef unsigned char c
    line.p = p
    if q == NULL:
        line.n = n
        return 0
    lf = q - p
    line.n = lf - 1 if lf > 0 and p[lf - 1] == 13 else lf
    pos = lf + 1
    while pos < n:
        q = <const unsigned char*>memchr(p + pos, 10, n - pos)
        e = q - p if q != NULL else n
        le = e - 1 if e > pos and p[e - 1] == 13 else e
        if le == pos:
            break
        ln = le - pos
        c = _lower[p[pos]]
        if json:
            if c == b'x' and ln >= 13 and p[pos + 12] == b':' and _ieq_low(p + pos, b"x-request-id", 12):
                _log_value(p, pos, le, 12, rid)
        elif c == b'r':
            if ln >= 8 and p[pos + 7] == b':' and _ieq_low(p + pos, b"referer", 7):
                _log_value(p, pos, le, 7, ref)
        elif c == b'u':
            if ln >= 11 and p[pos + 10] == b':' and _ieq_low(p + pos, b"user-agent", 10):
                _log_value(p, pos, le, 10, ua)
        pos = e + 1
    return 0


cdef Py_ssize_t _log_parts_id(const unsigned char* p, Py_ssize_t n, Span* line,
                              Span* ref, Span* ua, Span* rid) noexcept nogil:
    """``_log_parts`` for combined_id: the request line, Referer, User-Agent
    and X-Request-Id."""
    cdef const unsigned char* q = <const unsigned char*>memchr(p, 10, n)
    cdef Py_ssize_t lf, pos, e, le, ln
    cdef unsigned char c
    line.p = p
    if q == NULL:
        line.n = n
        return 0
    lf = q - p
    line.n = lf - 1 if lf > 0 and p[lf - 1] == 13 else lf
    pos = lf + 1
    while pos < n:
        q = <const unsigned char*>memchr(p + pos, 10, n - pos)
        e = q - p if q != NULL else n
        le = e - 1 if e > pos and p[e - 1] == 13 else e
        if le == pos:
            break
        ln = le - pos
        c = _lower[p[pos]]
        if c == b'r':
            if ln >= 8 and p[pos + 7] == b':' and _ieq_low(p + pos, b"referer", 7):
                _log_value(p, pos, le, 7, ref)
        elif c == b'u':
            if ln >= 11 and p[pos + 10] == b':' and _ieq_low(p + pos, b"user-agent", 10):
                _log_value(p, pos, le, 10, ua)
        elif c == b'x':
            if ln >= 13 and p[pos + 12] == b':' and _ieq_low(p + pos, b"x-request-id", 12):
                _log_value(p, pos, le, 12, rid)
        pos = e + 1
    return 0


cdef inline bint _word_dirty(uint64_t x) noexcept nogil:
    """Some byte of ``x`` may need escaping (never false when one does).

    SWAR tests on 8 bytes at once, each setting the high bit of a byte that
    is < 0x20 (x - 0x20 borrows), >= 0x80 (x), 0x7F (x + 1), '"' or '\\' (the
    byte XOR it, minus 1, borrows). A byte that passes all of them is below
    0x80, so no test needs masking. A borrow or carry can only flag the byte
    after a real hit: a clean word is never flagged.
    """
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t t = ((x - ones * 0x20) | x | (x + ones)
                       | ((x ^ (ones * 0x22)) - ones) | ((x ^ (ones * 0x5C)) - ones))
    return (t & 0x8080808080808080ULL) != 0


cdef inline Py_ssize_t _clean_run(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # the first index at or after i of a byte to escape, or n
    cdef uint64_t x
    while i + 8 <= n:
        memcpy(&x, p + i, 8)
        if _word_dirty(x):
            break
        i += 8
    while i < n and not _logesc[p[i]]:
        i += 1
    return i


cdef inline char* _put_esc(char* w, const unsigned char* p, Py_ssize_t n, bint json) noexcept nogil:
    """``p[:n]`` escaped (in JSON: with the escape's backslash doubled)."""
    cdef Py_ssize_t i = 0, j
    cdef unsigned char c
    while i < n:
        j = _clean_run(p, i, n)
        if j > i:
            memcpy(w, p + i, j - i)
            w += j - i
            if j == n:
                break
        c = p[j]
        w[0] = b'\\'
        w += 1
        if json:
            w[0] = b'\\'
            w += 1
        w[0] = b'x'
        w[1] = _HEXU[c >> 4]
        w[2] = _HEXU[c & 15]
        w += 3
        i = j + 1
    return w


cdef inline char* _put_str(char* w, Span* s) noexcept nogil:
    # a JSON string, or null
    if s.n < 0:
        return _put(w, b"null", 4)
    w[0] = b'"'
    w = _put_esc(w + 1, s.p, s.n, True)
    w[0] = b'"'
    return w + 1


cdef inline char* _put_quoted(char* w, Span* s) noexcept nogil:
    # a combined field in double quotes, "-" when absent
    w[0] = b'"'
    if s.n < 0:
        w[1] = b'-'
        w += 2
    else:
        w = _put_esc(w + 1, s.p, s.n, False)
    w[0] = b'"'
    return w + 1


cdef inline char* _put_int(char* w, long long v) noexcept nogil:
    # decimal, as b"%d" % v
    cdef char tmp[24]
    cdef char* t = tmp + 24
    cdef unsigned long long u
    if 0 <= v < 1000:           # statuses, most sizes and milliseconds: no loop
        if v >= 100:
            w[0] = <char>(48 + v // 100)
            w[1] = <char>(48 + v // 10 % 10)
            w[2] = <char>(48 + v % 10)
            return w + 3
        if v >= 10:
            w[0] = <char>(48 + v // 10)
            w[1] = <char>(48 + v % 10)
            return w + 2
        w[0] = <char>(48 + v)
        return w + 1
    if v < 0:
        w[0] = b'-'
        w += 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        t -= 1
        t[0] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    return _put(w, t, tmp + 24 - t)


cdef inline char* _put_ms(char* w, double seconds) noexcept nogil:
    # milliseconds with 3 decimals, as _ms of logline.py
    if not seconds >= 0.0:
        seconds = 0.0
    elif seconds > LOG_MAX_SECONDS:
        seconds = LOG_MAX_SECONDS
    cdef long long us = <long long>(seconds * 1e6 + 0.5)
    cdef int f = <int>(us % 1000)
    w = _put_int(w, us // 1000)
    w[0] = b'.'
    w[1] = <char>(48 + f // 100)
    w[2] = <char>(48 + f // 10 % 10)
    w[3] = <char>(48 + f % 10)
    return w + 4


cdef struct LogLine:
    bint json
    bint with_id                # FMT_COMBINED_ID
    bint has_head
    Span line, ref, ua, rid     # from the head (n = -1: absent)
    Span client, stamp, backend # backend.n = -1: None
    long long status, sent
    double upstream, total


cdef inline Py_ssize_t _esc_bound(Span* s, Py_ssize_t per) noexcept nogil:
    return s.n * per if s.n > 0 else 0


cdef Py_ssize_t _log_prepare(LogLine* L, int fmt, bytes head, bytes client, bytes stamp,
                             long long status, long long sent, bytes backend, double upstream,
                             double total) except -1:
    """Fill ``L``; return the most bytes the line can take (every byte escaped)."""
    if fmt != FMT_COMBINED and fmt != FMT_JSON and fmt != FMT_COMBINED_ID:
        raise ValueError("fmt must be LOG_COMBINED (0), LOG_JSON (1) or LOG_COMBINED_ID (2)")
    L.json = fmt == FMT_JSON
    L.with_id = fmt == FMT_COMBINED_ID
    L.line.n = L.ref.n = L.ua.n = L.rid.n = -1
    L.line.p = L.ref.p = L.ua.p = L.rid.p = NULL
    L.has_head = head is not None
    if L.has_head:
        if L.with_id:
            _log_parts_id(<const unsigned char*>PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head),
                          &L.line, &L.ref, &L.ua, &L.rid)
        else:
            _log_parts(<const unsigned char*>PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head),
                       L.json, &L.line, &L.ref, &L.ua, &L.rid)
    L.client.p = <const unsigned char*>PyBytes_AS_STRING(client)
    L.client.n = PyBytes_GET_SIZE(client)
    L.stamp.p = <const unsigned char*>PyBytes_AS_STRING(stamp)
    L.stamp.n = PyBytes_GET_SIZE(stamp)
    if backend is None:
        L.backend.p = NULL
        L.backend.n = -1
    else:
        L.backend.p = <const unsigned char*>PyBytes_AS_STRING(backend)
        L.backend.n = PyBytes_GET_SIZE(backend)
    L.status = status
    L.sent = sent
    L.upstream = upstream
    L.total = total
    cdef Py_ssize_t per = 5 if L.json else 4
    # fixed text and numbers (< 300 bytes), then every escaped field at its worst
    return (300 + L.stamp.n + (L.backend.n if L.backend.n > 0 else 0)
            + _esc_bound(&L.client, per) + _esc_bound(&L.line, per) + _esc_bound(&L.ref, per)
            + _esc_bound(&L.ua, per) + _esc_bound(&L.rid, per))


cdef inline Py_ssize_t _log_rid(LogLine* L, bytes rid) noexcept:
    """The line's request id is ``rid`` (not the head's X-Request-Id); the
    bytes it may add to the bound."""
    L.rid.p = <const unsigned char*>PyBytes_AS_STRING(rid)
    L.rid.n = PyBytes_GET_SIZE(rid)
    return L.rid.n * 5


cdef char* _log_write(char* w, LogLine* L) noexcept nogil:
    """Write the line ``L`` at ``w`` (room for ``_log_prepare``'s bound); return its end."""
    cdef Span method, target, version
    cdef Span* line = &L.line
    cdef Py_ssize_t i, sp1, sp2
    if not L.json:
        w = _put_esc(w, L.client.p, L.client.n, False)
        w = _put(w, b" - - [", 6)
        w = _put(w, L.stamp.p, L.stamp.n)
        w = _put(w, b"] ", 2)
        if not L.has_head:
            w = _put(w, b'"-"', 3)
        else:
            w[0] = b'"'
            w = _put_esc(w + 1, line.p, line.n, False)
            w[0] = b'"'
            w += 1
        w[0] = b' '
        w = _put_int(w + 1, L.status)
        w[0] = b' '
        w = _put_int(w + 1, L.sent)
        w[0] = b' '
        w = _put_quoted(w + 1, &L.ref)
        w[0] = b' '
        w = _put_quoted(w + 1, &L.ua)
        w[0] = b' '
        w += 1
        if L.backend.n < 0:
            w[0] = b'-'
            w += 1
        else:
            w = _put(w, L.backend.p, L.backend.n)
        w[0] = b' '
        w = _put_ms(w + 1, L.total)
        w = _put(w, b"ms ", 3)
        if L.upstream >= 0.0:
            w = _put_ms(w, L.upstream)
            if not L.with_id:
                return _put(w, b"ms\n", 3)
            w = _put(w, b"ms", 2)
        else:
            if not L.with_id:
                return _put(w, b"-\n", 2)
            w[0] = b'-'
            w += 1
        w[0] = b' '             # combined_id: the request id
        w = _put_quoted(w + 1, &L.rid)
        w[0] = b'\n'
        return w + 1
    method.n = target.n = version.n = -1
    method.p = target.p = version.p = NULL
    if line.n >= 0:
        # method SP target SP version: the first and the last SP
        method.p = line.p
        sp1 = -1
        for i in range(line.n):
            if line.p[i] == 32:
                sp1 = i
                break
        if sp1 < 0:
            method.n = line.n
        else:
            method.n = sp1
            sp2 = line.n - 1
            while line.p[sp2] != 32:
                sp2 -= 1
            target.p = line.p + sp1 + 1
            if sp2 == sp1:
                target.n = line.n - sp1 - 1
            else:
                target.n = sp2 - sp1 - 1
                version.p = line.p + sp2 + 1
                version.n = line.n - sp2 - 1
    w = _put(w, b'{"time":"', 9)
    w = _put(w, L.stamp.p, L.stamp.n)
    w = _put(w, b'","client":', 11)
    w = _put_str(w, &L.client)
    w = _put(w, b',"method":', 10)
    w = _put_str(w, &method)
    w = _put(w, b',"target":', 10)
    w = _put_str(w, &target)
    w = _put(w, b',"version":', 11)
    w = _put_str(w, &version)
    w = _put(w, b',"status":', 10)
    w = _put_int(w, L.status)
    w = _put(w, b',"bytes_sent":', 14)
    w = _put_int(w, L.sent)
    w = _put(w, b',"backend":', 11)
    if L.backend.n < 0:
        w = _put(w, b"null", 4)
    else:
        w[0] = b'"'
        w = _put(w + 1, L.backend.p, L.backend.n)
        w[0] = b'"'
        w += 1
    w = _put(w, b',"upstream_ms":', 15)
    if L.upstream >= 0.0:
        w = _put_ms(w, L.upstream)
    else:
        w = _put(w, b"null", 4)
    w = _put(w, b',"total_ms":', 12)
    w = _put_ms(w, L.total)
    w = _put(w, b',"request_id":', 14)
    w = _put_str(w, &L.rid)
    return _put(w, b"}\n", 2)


def access_log_line(int fmt, bytes head, bytes client not None, bytes stamp not None,
                    long long status, long long sent, bytes backend, double upstream,
                    double total, bytes rid=None):
    """One access log line, as bytes ending in LF.

    See ``fastlb._core_py.access_log_line``: this is its compiled twin (the
    same bytes for the same arguments). The line is written once, into a
    buffer sized for the worst case (every byte escaped), on the stack for
    ordinary lines.
    """
    cdef LogLine L
    cdef Py_ssize_t bound = _log_prepare(&L, fmt, head, client, stamp, status, sent, backend,
                                         upstream, total)
    if rid is not None:
        bound += _log_rid(&L, rid)
    cdef char stack[LOG_STACK]
    cdef char* buf = stack
    if bound > LOG_STACK:
        buf = <char*>malloc(bound)
        if buf == NULL:
            raise MemoryError()
    cdef char* w = _log_write(buf, &L)
    try:
        return PyBytes_FromStringAndSize(buf, w - buf)
    finally:
        if buf != stack:
            free(buf)


cdef class AccessLogBuffer:
    """A batch of access log lines, written straight into the bytes object
    that ``take`` hands over.

    See ``fastlb._core_py.AccessLogBuffer``: this is its compiled twin. ``add``
    writes the line in place (no object per line); ``take`` shrinks the batch
    to its length and gives it away (no copy); the next ``add`` starts a new
    one.
    """
    cdef PyObject* _out         # the batch: a bytes object only this buffer refers to
    cdef char* _buf             # its bytes
    cdef Py_ssize_t _len, _cap
    cdef readonly int fmt
    cdef readonly Py_ssize_t limit
    cdef public bytes stamp

    def __cinit__(self, int fmt=FMT_COMBINED, Py_ssize_t limit=65536):
        if fmt != FMT_COMBINED and fmt != FMT_JSON and fmt != FMT_COMBINED_ID:
            raise ValueError("fmt must be LOG_COMBINED (0), LOG_JSON (1) or LOG_COMBINED_ID (2)")
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.fmt = fmt
        self.limit = limit
        self.stamp = b""
        self._out = NULL
        self._buf = NULL
        self._len = self._cap = 0

    def __dealloc__(self):
        Py_XDECREF(self._out)

    def __len__(self):
        return self._len

    cdef int _room(self, Py_ssize_t need) except -1:
        # room for ``need`` more bytes: a new batch sized for ``limit``, or a bigger one
        cdef PyObject* o = self._out
        cdef Py_ssize_t n = self._len
        cdef Py_ssize_t cap = self._cap if o != NULL else self.limit + LOG_SLACK
        while cap < n + need:
            cap *= 2
        # a failure below drops the batch (MemoryError), never leaves it half-made
        self._out = NULL
        self._buf = NULL
        self._len = self._cap = 0
        if o == NULL:
            fresh = PyBytes_FromStringAndSize(NULL, cap)
            Py_INCREF(fresh)            # the raw pointer's reference
            o = <PyObject*>fresh
        else:
            _PyBytes_Resize(&o, cap)    # on failure: freed, and raises
        self._out = o
        self._buf = PyBytes_AS_STRING(<object>o)
        self._len = n
        self._cap = cap
        return 0

    def add(self, bytes head, bytes client not None, long long status, long long sent,
            bytes backend, double upstream, double total):
        """Append the line of ``access_log_line(self.fmt, head, client, self.stamp, ...)``.
        Returns True once the batch holds ``limit`` bytes or more (time to ``take``)."""
        cdef LogLine L
        cdef bytes stamp = self.stamp
        if stamp is None:
            raise TypeError("stamp must be bytes")
        cdef Py_ssize_t bound = _log_prepare(&L, self.fmt, head, client, stamp, status, sent,
                                             backend, upstream, total)
        if self._len + bound > self._cap:
            self._room(bound)
        cdef char* w = _log_write(self._buf + self._len, &L)
        self._len = w - self._buf
        return self._len >= self.limit

    def add_id(self, bytes head, bytes client not None, long long status, long long sent,
               bytes backend, double upstream, double total, bytes rid not None):
        """``add`` with the request's id ``rid`` as the line's request id."""
        cdef LogLine L
        cdef bytes stamp = self.stamp
        if stamp is None:
            raise TypeError("stamp must be bytes")
        cdef Py_ssize_t bound = _log_prepare(&L, self.fmt, head, client, stamp, status, sent,
                                             backend, upstream, total) + _log_rid(&L, rid)
        if self._len + bound > self._cap:
            self._room(bound)
        cdef char* w = _log_write(self._buf + self._len, &L)
        self._len = w - self._buf
        return self._len >= self.limit

    def take(self):
        """The lines added since the last ``take``, as one bytes object; the batch is emptied."""
        cdef PyObject* o = self._out
        cdef Py_ssize_t n = self._len
        if o == NULL or n == 0:
            return b""
        self._out = NULL
        self._buf = NULL
        self._len = self._cap = 0
        _PyBytes_Resize(&o, n)          # in place: a block that shrinks does not move
        out = <object>o
        Py_DECREF(out)                  # the raw pointer's reference, now out's
        return out
