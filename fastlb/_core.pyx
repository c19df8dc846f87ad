# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled per-request core; ``_core_py.py`` is the reference it must match.

Same public names, signatures, return values and exceptions (class, status
and message) as the pure-Python twin. Heads are parsed in C over the bytes
buffer: one validating pass records every field line (offsets, kind) in a C
array, a second pass applies the semantics in field order (so syntax errors
anywhere win over semantic ones, as in the twin), and the output is written
once into a pre-sized bytes object, copying runs of untouched lines with a
single memcpy. A request head is parsed into a ``RequestHead`` that keeps
the plan of its output (segments of the raw head); ``write_request_head``
follows the plan for the chosen backend.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytes cimport _PyBytes_Resize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_REFCNT, Py_XDECREF
from libc.stdlib cimport free, malloc, realloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

from operator import index as _index

from fastlb import errors as _errors

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

_BadRequest = _errors.BadRequest
_BadGateway = _errors.BadGateway

# ---------------------------------------------------------------- constants

cdef enum:
    KEY_NONE = 0
    KEY_PATH = 1
    KEY_QUERY = 2
    KEY_HEADER = 3
    KEY_COOKIE = 4

    MAX_CHUNK_SIZE_DIGITS = 20

cdef enum:
    BODY_NONE = 0
    BODY_LENGTH = 1
    BODY_CHUNKED = 2
    BODY_CLOSE = 3

    REQ_KEEP_ALIVE = 1
    REQ_HEAD = 2
    REQ_IDEMPOTENT = 4
    REQ_EXPECT_CONTINUE = 8
    REQ_HTTP10 = 16

    RESP_UPSTREAM_KEEP_ALIVE = 1
    RESP_CLIENT_KEEP_ALIVE = 2
    RESP_INFORMATIONAL = 4
    RESP_DECHUNK = 8

cdef unsigned long long MAX_CONTENT_LENGTH = (<unsigned long long>1) << 62

# The enum above is a copy of errors.py: refuse to import if they ever drift.
for _name, _value in (
    ("BODY_NONE", BODY_NONE), ("BODY_LENGTH", BODY_LENGTH),
    ("BODY_CHUNKED", BODY_CHUNKED), ("BODY_CLOSE", BODY_CLOSE),
    ("REQ_KEEP_ALIVE", REQ_KEEP_ALIVE), ("REQ_HEAD", REQ_HEAD),
    ("REQ_IDEMPOTENT", REQ_IDEMPOTENT), ("REQ_EXPECT_CONTINUE", REQ_EXPECT_CONTINUE),
    ("REQ_HTTP10", REQ_HTTP10),
    ("RESP_UPSTREAM_KEEP_ALIVE", RESP_UPSTREAM_KEEP_ALIVE),
    ("RESP_CLIENT_KEEP_ALIVE", RESP_CLIENT_KEEP_ALIVE),
    ("RESP_INFORMATIONAL", RESP_INFORMATIONAL), ("RESP_DECHUNK", RESP_DECHUNK),
    ("MAX_CONTENT_LENGTH", MAX_CONTENT_LENGTH),
    ("KEY_NONE", KEY_NONE), ("KEY_PATH", KEY_PATH), ("KEY_QUERY", KEY_QUERY),
    ("KEY_HEADER", KEY_HEADER), ("KEY_COOKIE", KEY_COOKIE),
    ("MAX_CHUNK_SIZE_DIGITS", MAX_CHUNK_SIZE_DIGITS),
):
    if getattr(_errors, _name) != _value:
        raise ImportError(f"fastlb._core: {_name} differs from fastlb.errors")
del _name, _value

# Header kinds: the same numbers as _core_py._H_*.
cdef enum:
    H_OTHER = 0
    H_HOST = 1
    H_CONTENT_LENGTH = 2
    H_TRANSFER_ENCODING = 3
    H_CONNECTION = 4
    H_HOP = 5
    H_XFF = 6
    H_XF_REPLACED = 7
    H_EXPECT = 8
    H_TRAILER = 9

cdef enum:
    STACK_FIELDS = 64     # field lines parsed without a heap allocation
    MAX_DROP_TOKENS = 16  # Connection tokens kept in a C array; more: a Python set

# ---------------------------------------------------------------- characters

cdef unsigned char _tchar[256]
cdef unsigned char _vchar[256]    # HTAB, SP, VCHAR, obs-text
cdef unsigned char _target[256]   # visible ASCII and obs-text
cdef signed char _hexval[256]     # -1: not a hex digit
cdef unsigned char _regname[256]  # reg-name: unreserved and sub-delims but "," ('%' checked apart)
cdef unsigned char _lower[256]    # ASCII-only lowercase, like bytes.lower()


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        _tchar[c] = 0
        _vchar[c] = 1 if (c == 9 or (0x20 <= c < 0x7F) or c >= 0x80) else 0
        _target[c] = 1 if ((0x21 <= c < 0x7F) or c >= 0x80) else 0
        _hexval[c] = -1
        _lower[c] = c + 32 if 0x41 <= c <= 0x5A else c
        _regname[c] = 0
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _tchar[c] = 1
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=":
        _regname[c] = 1
    for c in range(10):
        _hexval[0x30 + c] = c
    for c in range(6):
        _hexval[0x61 + c] = 10 + c
        _hexval[0x41 + c] = 10 + c


_init_tables()

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
    int ntoks             # > MAX_DROP_TOKENS: overflowed, use a Python set
    Tok toks[MAX_DROP_TOKENS]


cdef inline bint _ows(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x09


cdef inline bint _ieq(const unsigned char* s, const char* low, Py_ssize_t n) noexcept nogil:
    """``s[:n].lower() == low`` for ``low`` made of lowercase letters, digits and '-'.

    ``c | 0x20`` is exact here: the bytes compared were validated (no
    controls), and only 'A'-'Z' fold onto the letters of ``low``.
    """
    cdef Py_ssize_t i
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
                return H_HOP
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
                return H_XF_REPLACED
    elif n == 17:
        if c == b't':
            if _ieq(s, b"transfer-encoding", 17):
                return H_TRANSFER_ENCODING
        elif c == b'x':
            if _ieq(s, b"x-forwarded-proto", 17):
                return H_XF_REPLACED
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


cdef inline Py_ssize_t _scan_value(const unsigned char* p, Py_ssize_t q, Py_ssize_t n) noexcept nogil:
    """Index of the first byte at or after ``q`` that is not a field-value byte.

    Eight bytes at a time while no byte is below 0x20 or equal to 0x7F (exact
    "has less than" / "has zero" bit tricks), then byte by byte with the table.
    The caller guarantees a non-value byte (the head's final CR) before ``n``.
    """
    cdef uint64_t x, y, m
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
        elif cn.ntoks < MAX_DROP_TOKENS:
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


# ---------------------------------------------------------------- authorities
#
# Host = uri-host [ ":" port ]: the rules are in the "authorities" section of
# ``_core_py`` (the reference). Checked over p[s:e] without copying.

cdef inline bint _valid_port(const unsigned char* p, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    cdef long v = 0
    cdef Py_ssize_t i
    for i in range(s, e):
        if p[i] < 0x30 or p[i] > 0x39:
            return False
        v = v * 10 + (p[i] - 0x30)
        if v > 65535:
            return False
    return True


cdef bint _valid_ipv4(const unsigned char* p, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    cdef Py_ssize_t i = s, j
    cdef int parts = 0, v
    while True:
        j = i
        v = 0
        while j < e and 0x30 <= p[j] <= 0x39:
            if j - i == 3:
                return False
            v = v * 10 + (p[j] - 0x30)
            j += 1
        if j == i or v > 255 or (j - i > 1 and p[i] == 0x30):
            return False
        parts += 1
        if j == e:
            return parts == 4
        if p[j] != 0x2E or parts == 4:
            return False
        i = j + 1


cdef bint _valid_ipv6(const unsigned char* p, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    cdef Py_ssize_t i = s, j
    cdef Py_ssize_t groups = 0
    cdef bint compressed = False
    if e - s >= 2 and p[s] == 0x3A and p[s + 1] == 0x3A:
        compressed = True
        i = s + 2
        if i == e:
            return True
    elif e > s and p[s] == 0x3A:
        return False
    while True:
        j = i
        while j < e and _hexval[p[j]] >= 0:
            j += 1
        if j < e and p[j] == 0x2E:
            if not _valid_ipv4(p, i, e):
                return False
            groups += 2
            break
        if j == i or j - i > 4:
            return False
        groups += 1
        i = j
        if i == e:
            break
        if p[i] != 0x3A:
            return False
        i += 1
        if i < e and p[i] == 0x3A:
            if compressed:
                return False
            compressed = True
            i += 1
            if i == e:
                break
        elif i == e:
            return False
    return groups < 8 if compressed else groups == 8


cdef bint _valid_ipvfuture(const unsigned char* p, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    cdef const unsigned char* q
    cdef Py_ssize_t dot, i
    if e - s < 4 or (p[s] | 0x20) != 0x76:  # 'v' or 'V'
        return False
    q = <const unsigned char*>memchr(p + s + 1, 0x2E, e - s - 1)
    if q == NULL:
        return False
    dot = q - p
    if dot < s + 2 or dot + 1 == e:
        return False
    for i in range(s + 1, dot):
        if _hexval[p[i]] < 0:
            return False
    for i in range(dot + 1, e):
        if not (_regname[p[i]] or p[i] == 0x3A):
            return False
    return True


cdef bint _valid_authority(const unsigned char* p, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """Whether p[s:e] is ``uri-host [":" port]`` with a non-empty host."""
    cdef const unsigned char* q
    cdef Py_ssize_t i, close
    if s < e and p[s] == 0x5B:  # '['
        q = <const unsigned char*>memchr(p + s, 0x5D, e - s)
        if q == NULL:
            return False
        close = q - p
        if not (_valid_ipv6(p, s + 1, close) or _valid_ipvfuture(p, s + 1, close)):
            return False
        if close + 1 == e:
            return True
        return p[close + 1] == 0x3A and _valid_port(p, close + 2, e)
    i = s
    while True:
        while i < e and _regname[p[i]]:
            i += 1
        if i < e and p[i] == 0x25 and i + 3 <= e and _hexval[p[i + 1]] >= 0 and _hexval[p[i + 2]] >= 0:
            i += 3
            continue
        break
    if i == s:
        return False
    if i == e:
        return True
    return p[i] == 0x3A and _valid_port(p, i + 1, e)


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
    else:
        r._size += (b - a) + 2
    return 0


def parse_request_head(head, int key_kind=0, key_name=b""):
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
    cdef bint chunked = False, te_seen = False, expect_continue = False, keep
    cdef bint absolute = hs >= 0
    cdef Conn cn
    cdef Field* f
    cdef int kind, flags = 0
    cdef object drop = None
    cdef RequestHead r

    cn.close = cn.keep_alive = False
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
    if chunked:
        r._size += 28
    r._size += 17 + 21 + 2           # X-Forwarded-For: ... \r\nX-Forwarded-Proto: ... \r\n
    if he > hs:
        r._size += 18 + (he - hs) + 2
    r._size += 2

    if key_kind != KEY_NONE:
        _request_key(r, p, fb, key_kind, key_name)
    return r


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


def write_request_head(parsed, client_ip, proto=b"http", via=b"fastlb", backend_authority=b""):
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
        elif s.kind == SEG_FIELD:
            w = _put(w, p + s.a, s.b - s.a)
            w = _put(w, b": ", 2)
            w = _put(w, p + s.c, s.d - s.c)
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
    if r._chunked:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    w = _put(w, b"X-Forwarded-For: ", 17)
    for k in range(r._nseg):
        s = &r._segs[k]
        if s.kind == SEG_XFF:
            w = _put(w, p + s.a, s.b - s.a)
            w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(ip), PyBytes_GET_SIZE(ip))
    w = _put(w, b"\r\nX-Forwarded-Proto: ", 21)
    w = _put(w, PyBytes_AS_STRING(pr), PyBytes_GET_SIZE(pr))
    w = _put(w, b"\r\n", 2)
    if r._he > r._hs:
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


# ---------------------------------------------------------------- responses

def rewrite_response_head(head, req_flags):
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    See ``fastlb._core_py.rewrite_response_head``: this is its compiled twin.
    """
    cdef bytes h = _as_bytes(head, "head")
    cdef long rf = req_flags
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(h)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(h)
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
    if status == 101:
        raise _BadGateway("unexpected protocol switch")

    fb.f = fb.stack = stack
    fb.n = 0
    fb.cap = STACK_FIELDS
    try:
        _parse_fields(p, n, eol + 2, &fb, _BadGateway)
        return _response_out(h, p, n, &fb, eol, status, http10, rf)
    finally:
        if fb.f != fb.stack:
            free(fb.f)


cdef tuple _response_out(bytes h, const unsigned char* p, Py_ssize_t n, Fields* fb,
                         Py_ssize_t eol, int status, bint http10, long rf):
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
        f.keep = (kind != H_TRANSFER_ENCODING and kind != H_CONNECTION and kind != H_HOP
                  and (kind != H_TRAILER or chunked_out) and not _dropped(p, f, &cn, drop))
        if f.keep:
            size += f.name_len + (f.ve - f.vs) + 4
    if chunked_out:
        size += 28
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            size += 19
        elif client_http10:
            size += 24
    size += 2

    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    if http10:
        w = _put(w, b"HTTP/1.1", 8)
        w = _put(w, p + 8, eol - 8 + 2)
        w = _put_fields(w, p, fb, -1, -1)
    else:
        w = _put_fields(w, p, fb, 0, eol + 2)
    if chunked_out:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if not (flags & RESP_INFORMATIONAL):
        if not (flags & RESP_CLIENT_KEEP_ALIVE):
            w = _put(w, b"Connection: close\r\n", 19)
        elif client_http10:
            w = _put(w, b"Connection: keep-alive\r\n", 24)
    w = _put(w, b"\r\n", 2)
    return (out, status, flags, framing, length if length > 0 else 0)


# ---------------------------------------------------------------- chunked bodies

cdef enum:
    S_SIZE = 0
    S_EXT = 1
    S_SIZE_LF = 2
    S_DATA = 3
    S_DATA_CR = 4
    S_DATA_LF = 5
    S_TRAILER_START = 6
    S_TRAILER_NAME = 7
    S_TRAILER_VALUE = 8
    S_TRAILER_LF = 9
    S_END_LF = 10
    S_DONE = 11

    MAX_LINE = 4096
    MAX_TRAILERS = 16384


cdef class ChunkedScanner:
    """Finds the end of a chunked body, strictly, across any split of the input.

    See ``fastlb._core_py.ChunkedScanner``: this is its compiled twin.
    """

    cdef public bint decode
    cdef public object payload
    cdef object _exc
    cdef int _state
    cdef long long _size
    cdef int _digits
    cdef Py_ssize_t _line

    def __cinit__(self, decode=False, exc=_BadRequest):
        self.decode = decode
        self.payload = []
        self._exc = exc
        self._state = S_SIZE
        self._size = 0
        self._digits = 0
        self._line = 0

    @property
    def done(self):
        return self._state == S_DONE

    def scan(self, data, Py_ssize_t start=0):
        cdef Py_buffer view
        cdef Py_ssize_t r
        if self._state == S_DONE:
            return start
        if start < 0:
            raise ValueError("start must not be negative")
        if PyBytes_CheckExact(data):
            return self._run(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), start, data)
        if PyByteArray_CheckExact(data):
            return self._run(<const unsigned char*>PyByteArray_AS_STRING(data), PyByteArray_GET_SIZE(data),
                             start, None)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            r = self._run(<const unsigned char*>view.buf, view.len, start, None)
        finally:
            PyBuffer_Release(&view)
        return r

    cdef Py_ssize_t _run(self, const unsigned char* p, Py_ssize_t n, Py_ssize_t i, object whole) except -2:
        cdef int state = self._state
        cdef long long size = self._size
        cdef int digits = self._digits
        cdef Py_ssize_t line = self._line
        cdef Py_ssize_t take
        cdef int v
        cdef unsigned char c
        cdef str msg = None
        while i < n:
            if state == S_DATA:
                take = size if size < n - i else n - i
                if self.decode:
                    self._state = state
                    self._size = size
                    if whole is not None and i == 0 and take == n:
                        self.payload.append(whole)
                    else:
                        self.payload.append(PyBytes_FromStringAndSize(<const char*>p + i, take))
                i += take
                size -= take
                if size == 0:
                    state = S_DATA_CR
                continue
            c = p[i]
            i += 1
            if state == S_SIZE:
                v = _hexval[c]
                if v >= 0:
                    # leading zeros are valid (RFC 9112 7.1); the field's length is bounded
                    digits += 1
                    if digits > MAX_CHUNK_SIZE_DIGITS:
                        msg = "chunk size too long"
                        break
                    if size >= (<long long>1) << 56:   # size * 16 + v >= 2**60
                        msg = "chunk size too large"
                        break
                    size = size * 16 + v
                elif digits == 0:
                    msg = "invalid chunk size"
                    break
                elif c == 0x3B:
                    state = S_EXT
                    line = digits + 1
                elif c == 0x0D:
                    state = S_SIZE_LF
                else:
                    msg = "invalid chunk size"
                    break
            elif state == S_EXT:
                if c == 0x0D:
                    state = S_SIZE_LF
                elif not _vchar[c]:
                    msg = "invalid chunk extension"
                    break
                else:
                    line += 1
                    if line > MAX_LINE:
                        msg = "chunk extension too long"
                        break
            elif state == S_SIZE_LF:
                if c != 0x0A:
                    msg = "missing LF after chunk size"
                    break
                digits = 0
                if size == 0:
                    state = S_TRAILER_START
                    line = 0
                else:
                    state = S_DATA
            elif state == S_DATA_CR:
                if c != 0x0D:
                    msg = "missing CRLF after chunk data"
                    break
                state = S_DATA_LF
            elif state == S_DATA_LF:
                if c != 0x0A:
                    msg = "missing CRLF after chunk data"
                    break
                state = S_SIZE
            else:
                line += 1
                if line > MAX_TRAILERS:
                    msg = "trailers too large"
                    break
                if state == S_TRAILER_START:
                    if c == 0x0D:
                        state = S_END_LF
                    elif _tchar[c]:
                        state = S_TRAILER_NAME
                    else:
                        msg = "invalid trailer"
                        break
                elif state == S_TRAILER_NAME:
                    if c == 0x3A:
                        state = S_TRAILER_VALUE
                    elif not _tchar[c]:
                        msg = "invalid trailer name"
                        break
                elif state == S_TRAILER_VALUE:
                    if c == 0x0D:
                        state = S_TRAILER_LF
                    elif not _vchar[c]:
                        msg = "invalid byte in trailer"
                        break
                elif state == S_TRAILER_LF:
                    if c != 0x0A:
                        msg = "missing LF after trailer"
                        break
                    state = S_TRAILER_START
                else:
                    if c != 0x0A:
                        msg = "missing LF after last chunk"
                        break
                    self._state = S_DONE
                    self._size = size
                    self._digits = digits
                    self._line = line
                    return i
        self._state = state
        self._size = size
        self._digits = digits
        self._line = line
        if msg is not None:
            raise self._exc(msg)
        return -1


# ---------------------------------------------------------------- hashing

cdef uint64_t XP1 = 0x9E3779B185EBCA87ULL
cdef uint64_t XP2 = 0xC2B2AE3D27D4EB4FULL
cdef uint64_t XP3 = 0x165667B19E3779F9ULL
cdef uint64_t XP4 = 0x85EBCA77C2B2AE63ULL
cdef uint64_t XP5 = 0x27D4EB2F165667C5ULL
cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL
cdef uint64_t SM1 = 0xBF58476D1CE4E5B9ULL
cdef uint64_t SM2 = 0x94D049BB133111EBULL


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _rd64(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>p[0]) | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24)
            | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40) | (<uint64_t>p[6] << 48)
            | (<uint64_t>p[7] << 56))


cdef inline uint64_t _rd32(const unsigned char* p) noexcept nogil:
    return ((<uint64_t>p[0]) | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) | (<uint64_t>p[3] << 24))


cdef inline uint64_t _xround(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * XP2
    return _rotl(acc, 31) * XP1


cdef inline uint64_t _xmerge(uint64_t h, uint64_t v) noexcept nogil:
    h ^= _xround(0, v)
    return h * XP1 + XP4


cdef uint64_t _xxh64(const unsigned char* p, Py_ssize_t n, uint64_t seed) noexcept nogil:
    cdef const unsigned char* end = p + n
    cdef const unsigned char* limit
    cdef uint64_t h, v1, v2, v3, v4
    if n >= 32:
        limit = end - 32
        v1 = seed + XP1 + XP2
        v2 = seed + XP2
        v3 = seed
        v4 = seed - XP1
        while p <= limit:
            v1 = _xround(v1, _rd64(p))
            v2 = _xround(v2, _rd64(p + 8))
            v3 = _xround(v3, _rd64(p + 16))
            v4 = _xround(v4, _rd64(p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _xmerge(h, v1)
        h = _xmerge(h, v2)
        h = _xmerge(h, v3)
        h = _xmerge(h, v4)
    else:
        h = seed + XP5
    h += <uint64_t>n
    while p + 8 <= end:
        h ^= _xround(0, _rd64(p))
        h = _rotl(h, 27) * XP1 + XP4
        p += 8
    if p + 4 <= end:
        h ^= _rd32(p) * XP1
        h = _rotl(h, 23) * XP2 + XP3
        p += 4
    while p < end:
        h ^= p[0] * XP5
        h = _rotl(h, 11) * XP1
        p += 1
    h ^= h >> 33
    h *= XP2
    h ^= h >> 29
    h *= XP3
    h ^= h >> 32
    return h


def hash64(data, seed=0):
    """XXH64 of ``data`` (bytes) with ``seed`` (taken modulo 2**64).

    See ``fastlb._core_py.hash64``: this is its compiled twin.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    cdef uint64_t s = seed & 0xFFFFFFFFFFFFFFFF
    return _xxh64(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), s)


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
    # request line and target, as _core_py._request_target
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


# ---------------------------------------------------------------- selection
#
# Twins of the selectors of ``_core_py`` (see the comment there): the same
# state in malloc'd C arrays, the same arithmetic (int64 where the twin uses
# Python ints, within the bounds set by _MAX_WEIGHT), the same splitmix64.

_MAX_WEIGHT = 1000000
_MAX_TABLE = 1 << 24


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


cdef inline uint64_t _splitmix(uint64_t* state) noexcept nogil:
    cdef uint64_t z = state[0] + GOLDEN
    state[0] = z
    z = (z ^ (z >> 30)) * SM1
    z = (z ^ (z >> 27)) * SM2
    return z ^ (z >> 31)


cdef class Selector:
    """The surface every selector shares; see ``fastlb._core_py.Selector`` (its twin).

    Declared in ``_core.pxd``: ``select``, ``select_excluding`` and
    ``release`` are cpdef, so compiled code that cimports ``Selector`` calls
    them in C, dispatched to the subclass through the vtable (see
    ``pick_many``). ``select_excluding`` works on ``_mask``, a scratch copy of
    ``_live`` with the excluded backends cleared (``_exclude``), so each
    algorithm's loop is its ``select`` loop reading the mask instead.
    """

    def __dealloc__(self):
        self._free_base()

    cdef void _free_base(self) noexcept:
        free(self._eligible)
        free(self._live)
        free(self._weight)
        free(self._inflight)
        free(self._mask)
        self._eligible = self._live = self._mask = NULL
        self._weight = self._inflight = NULL

    cdef _setup(self, weights, bint checked):
        cdef Py_ssize_t n = len(weights), i
        if n == 0:
            raise ValueError("a balancer needs at least one backend")
        if checked:
            ws = [_check_weight(w) for w in weights]
        else:
            ws = [1 if w > 0 else 0 for w in weights]
        self._free_base()
        self.n = 0
        self._eligible = <unsigned char*>malloc(n)
        self._live = <unsigned char*>malloc(n)
        self._weight = <int64_t*>malloc(n * sizeof(int64_t))
        self._inflight = <int64_t*>malloc(n * sizeof(int64_t))
        self._mask = <unsigned char*>malloc(n)
        if (self._eligible == NULL or self._live == NULL or self._weight == NULL
                or self._inflight == NULL or self._mask == NULL):
            raise MemoryError()
        for i in range(n):
            self._weight[i] = ws[i]
            self._eligible[i] = 1
            self._inflight[i] = 0
            self._live[i] = 1 if self._weight[i] > 0 else 0
        self.n = n

    cdef Py_ssize_t _index(self, idx) except -1:
        cdef Py_ssize_t i
        try:
            i = idx
        except OverflowError:
            raise IndexError("backend index out of range") from None
        if i < 0 or i >= self.n:
            raise IndexError("backend index out of range")
        return i

    cdef int _changed(self) except -1:
        return 0

    cdef Py_ssize_t _exclude(self, exclude) except -1:
        # _mask = _live with every backend in ``exclude`` cleared; the count left.
        # Rewritten whole on every call, so an error half-way leaves nothing behind.
        cdef Py_ssize_t n = self.n, i, m = 0
        cdef unsigned char* mask = self._mask
        memcpy(mask, self._live, n)
        if type(exclude) is set:      # the data path's: walked in place, no iterator object
            for x in <set>exclude:
                mask[self._index(x)] = 0
        else:
            for x in exclude:
                mask[self._index(x)] = 0
        for i in range(n):
            m += mask[i]
        return m

    cpdef Py_ssize_t select(self, key=b"") except -3:
        """A live backend's index (counted in flight), or -1 when none is live.

        ``key`` is ignored except by Maglev (which returns -2 for b"").
        """
        raise NotImplementedError(f"{type(self).__name__}.select")

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        """As ``select``, among the live backends whose index is not in ``exclude``.

        ``exclude`` is an iterable of backend indices; -1 when none is left.
        """
        raise NotImplementedError(f"{type(self).__name__}.select_excluding")

    cpdef release(self, idx):
        """End of one request on backend ``idx``: its in-flight count drops by 1 (never below 0)."""
        cdef Py_ssize_t i = self._index(idx)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1

    def in_flight(self, idx):
        return self._inflight[self._index(idx)]

    def set_eligible(self, idx, ok):
        cdef Py_ssize_t i = self._index(idx)
        cdef unsigned char e = 1 if ok else 0
        if e != self._eligible[i]:
            self._eligible[i] = e
            self._live[i] = 1 if (e and self._weight[i] > 0) else 0
            self._changed()

    def is_eligible(self, idx):
        return self._eligible[self._index(idx)] != 0

    def set_weight(self, idx, w):
        cdef Py_ssize_t i = self._index(idx)
        self._weight[i] = _check_weight(w)
        self._live[i] = 1 if (self._eligible[i] and self._weight[i] > 0) else 0
        self._changed()


cdef class RoundRobin(Selector):
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    See ``fastlb._core_py.RoundRobin``: this is its compiled twin.
    """

    cdef Py_ssize_t _next

    def __init__(self, weights, seed=0):
        self._setup(weights, False)
        self._next = seed % self.n

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t n = self.n, i = self._next, k
        cdef const unsigned char* u = self._live
        for k in range(n):
            if u[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        self._exclude(exclude)
        cdef Py_ssize_t n = self.n, i = self._next, k
        cdef const unsigned char* u = self._mask
        for k in range(n):
            if u[i]:
                self._next = i + 1 if i + 1 < n else 0
                self._inflight[i] += 1
                return i
            i = i + 1 if i + 1 < n else 0
        return -1


cdef class WeightedRoundRobin(Selector):
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    See ``fastlb._core_py.WeightedRoundRobin``: this is its compiled twin.
    """

    cdef int64_t* _current
    cdef Py_ssize_t _start

    def __init__(self, weights, seed=0):
        cdef Py_ssize_t i
        self._setup(weights, True)
        free(self._current)
        self._current = <int64_t*>malloc(self.n * sizeof(int64_t))
        if self._current == NULL:
            raise MemoryError()
        for i in range(self.n):
            self._current[i] = 0
        self._start = seed % self.n

    def __dealloc__(self):
        free(self._current)
        self._current = NULL

    def set_weight(self, idx, w):
        cdef Py_ssize_t i
        Selector.set_weight(self, idx, w)
        for i in range(self.n):
            self._current[i] = 0

    cpdef Py_ssize_t select(self, key=b"") except -3:
        return self._pick(self._live)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # nginx's pass over the peers not tried: excluded ones keep their current weight
        self._exclude(exclude)
        return self._pick(self._mask)

    cdef inline Py_ssize_t _pick(self, const unsigned char* live):
        """nginx's smooth weighted pass over the backends ``live`` allows."""
        cdef Py_ssize_t n = self.n, i = self._start, k, best = -1
        cdef int64_t total = 0, c, bestc = 0, w
        cdef const int64_t* weight = self._weight
        cdef int64_t* cur = self._current
        for k in range(n):
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

cdef class LeastConn(Selector):
    """Fewest requests in flight per unit of weight; ties to the first in rotation.

    See ``fastlb._core_py.LeastConn``: this is its compiled twin.
    """

    cdef Py_ssize_t _next

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        self._next = seed % self.n

    cpdef Py_ssize_t select(self, key=b"") except -3:
        return self._pick(self._live)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        self._exclude(exclude)
        return self._pick(self._mask)

    cdef inline Py_ssize_t _pick(self, const unsigned char* live):
        """The fewest in flight per unit of weight among the backends ``live``
        allows, ties in rotation."""
        cdef Py_ssize_t n = self.n, i = self._next, k, best = -1
        cdef int64_t bf = 0, bw = 1, f, w
        cdef const int64_t* weight = self._weight
        cdef int64_t* inf = self._inflight
        for k in range(n):
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

cdef class _Seeded(Selector):
    cdef uint64_t _rng
    cdef Py_ssize_t* _usable
    cdef Py_ssize_t _m

    def __dealloc__(self):
        free(self._usable)
        self._usable = NULL

    cdef _seeded(self, seed):
        free(self._usable)
        self._m = 0
        self._usable = <Py_ssize_t*>malloc(self.n * sizeof(Py_ssize_t))
        if self._usable == NULL:
            raise MemoryError()
        self._rng = seed & 0xFFFFFFFFFFFFFFFF
        self._changed()

    cdef int _changed(self) except -1:
        cdef Py_ssize_t i, m = 0
        if self._usable == NULL:
            return 0
        for i in range(self.n):
            if self._live[i]:
                self._usable[m] = i
                m += 1
        self._m = m
        return 0


cdef class P2C(_Seeded):
    """Power of two random choices on requests in flight per unit of weight.

    See ``fastlb._core_py.P2C``: this is its compiled twin.
    """

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        self._seeded(seed)

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t m = self._m, a, b
        cdef uint64_t i, j
        cdef int64_t* inf = self._inflight
        if m == 0:
            return -1
        if m == 1:
            a = self._usable[0]
        else:
            i = _splitmix(&self._rng) % <uint64_t>m
            j = _splitmix(&self._rng) % <uint64_t>(m - 1)
            if j >= i:
                j += 1
            a = self._usable[i]
            b = self._usable[j]
            if inf[b] * self._weight[a] < inf[a] * self._weight[b]:
                a = b
        inf[a] += 1
        return a

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's draws, over the usable backends left in (the i-th and j-th of them)
        cdef Py_ssize_t m = self._exclude(exclude), k, a = -1, b = -1
        cdef uint64_t i = 0, j = 0, t = 0
        cdef const unsigned char* mask = self._mask
        cdef const Py_ssize_t* u = self._usable
        cdef int64_t* inf = self._inflight
        if m == 0:
            return -1
        if m > 1:
            i = _splitmix(&self._rng) % <uint64_t>m
            j = _splitmix(&self._rng) % <uint64_t>(m - 1)
            if j >= i:
                j += 1
        for k in range(self._m):
            if mask[u[k]]:
                if t == i:
                    a = u[k]
                if t == j:
                    b = u[k]
                t += 1
        if m > 1 and inf[b] * self._weight[a] < inf[a] * self._weight[b]:
            a = b
        inf[a] += 1
        return a


cdef class Random(_Seeded):
    """Weighted random: each live backend with probability weight / total live weight.

    See ``fastlb._core_py.Random``: this is its compiled twin.
    """

    cdef uint64_t* _cum

    def __init__(self, weights, seed=0):
        self._setup(weights, True)
        free(self._cum)
        self._cum = <uint64_t*>malloc(self.n * sizeof(uint64_t))
        if self._cum == NULL:
            raise MemoryError()
        self._seeded(seed)

    def __dealloc__(self):
        free(self._cum)
        self._cum = NULL

    cdef int _changed(self) except -1:
        cdef Py_ssize_t k
        cdef uint64_t t = 0
        _Seeded._changed(self)
        if self._cum == NULL:
            return 0
        for k in range(self._m):
            t += <uint64_t>self._weight[self._usable[k]]
            self._cum[k] = t
        return 0

    cpdef Py_ssize_t select(self, key=b"") except -3:
        cdef Py_ssize_t m = self._m, a, lo, hi, mid
        cdef uint64_t r
        if m == 0:
            return -1
        if m == 1:
            a = self._usable[0]
        else:
            r = _splitmix(&self._rng) % self._cum[m - 1]
            lo = 0
            hi = m - 1
            while lo < hi:
                mid = (lo + hi) >> 1
                if self._cum[mid] > r:
                    hi = mid
                else:
                    lo = mid + 1
            a = self._usable[lo]
        self._inflight[a] += 1
        return a

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's draw, over the running weights of the usable backends left in
        cdef Py_ssize_t m = self._exclude(exclude), k, a = -1
        cdef uint64_t r = 0, t = 0, total = 0
        cdef const unsigned char* mask = self._mask
        cdef const Py_ssize_t* u = self._usable
        cdef const int64_t* weight = self._weight
        if m == 0:
            return -1
        if m > 1:
            for k in range(self._m):
                if mask[u[k]]:
                    total += <uint64_t>weight[u[k]]
            r = _splitmix(&self._rng) % total
        for k in range(self._m):
            if mask[u[k]]:
                t += <uint64_t>weight[u[k]]
                if t > r:
                    a = u[k]
                    break
        self._inflight[a] += 1
        return a


cdef class Maglev(Selector):
    """Maglev consistent hashing (Envoy's weighted variant), with optional bounded load.

    See ``fastlb._core_py.Maglev``: this is its compiled twin.
    """

    cdef readonly Py_ssize_t table_size
    cdef readonly double balance_factor
    cdef int32_t* _table
    cdef uint32_t* _offset
    cdef uint32_t* _skip
    cdef int32_t* _order
    cdef Py_ssize_t _nlive
    cdef int64_t _lw
    cdef int64_t _lf

    def __init__(self, weights, names, seed=0, table_size=65537, balance_factor=0.0):
        cdef Py_ssize_t n, i, m
        self._free_tables()  # a second __init__ must not keep a table of the old backends
        self._nlive = 0
        self._setup(weights, True)
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
            mm = _index(table_size)
        except TypeError:
            raise TypeError(f"table_size must be an integer, got {table_size!r}") from None
        if mm < n or mm >= _MAX_TABLE or not _is_prime(mm):
            raise ValueError(f"table_size must be a prime >= the number of backends and "
                             f"below 2**24, got {mm}")
        m = mm
        try:
            f = float(balance_factor)
        except (TypeError, ValueError):
            raise TypeError(f"balance_factor must be a number, got {balance_factor!r}") from None
        if not (f == 0.0 or 1.0 <= f < float("inf")):
            raise ValueError(f"balance_factor must be 0 (off) or >= 1.0, got {balance_factor!r}")
        self._free_tables()
        self._nlive = 0
        self._table = <int32_t*>malloc(m * sizeof(int32_t))
        self._offset = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._skip = <uint32_t*>malloc(n * sizeof(uint32_t))
        self._order = <int32_t*>malloc(n * sizeof(int32_t))
        if self._table == NULL or self._offset == NULL or self._skip == NULL or self._order == NULL:
            self._free_tables()
            raise MemoryError()
        self.table_size = m
        self.balance_factor = f
        for i in range(n):
            nm = names[i]
            self._offset[i] = <uint32_t>(hash64(nm, 0) % m)
            self._skip[i] = <uint32_t>(hash64(nm, 1) % (m - 1) + 1)
        order = sorted(range(n), key=names.__getitem__)
        for i in range(n):
            self._order[i] = order[i]
        self._build()
        self._changed()

    cdef void _free_tables(self) noexcept:
        free(self._table)
        free(self._offset)
        free(self._skip)
        free(self._order)
        self._table = self._order = NULL
        self._offset = self._skip = NULL

    def __dealloc__(self):
        self._free_tables()

    cdef int _build(self) except -1:
        cdef Py_ssize_t m = self.table_size, n = self.n, i, k, ne = 0, filled = 0
        cdef int64_t wmax = 0, it = 1, w
        cdef uint64_t c, sk
        cdef int32_t* entries = <int32_t*>malloc(n * sizeof(int32_t))
        cdef uint64_t* pos = <uint64_t*>malloc(n * sizeof(uint64_t))
        cdef int64_t* target = <int64_t*>malloc(n * sizeof(int64_t))
        cdef int32_t* table = self._table
        if entries == NULL or pos == NULL or target == NULL:
            free(entries)
            free(pos)
            free(target)
            raise MemoryError()
        for c in range(<uint64_t>m):
            table[c] = -1
        for k in range(n):
            i = self._order[k]
            w = self._weight[i]
            if w > 0:
                entries[ne] = <int32_t>i
                pos[ne] = self._offset[i]
                target[ne] = 0
                ne += 1
                if w > wmax:
                    wmax = w
        if ne > 0:
            while filled < m:
                for k in range(ne):
                    i = entries[k]
                    w = self._weight[i]
                    if it * w < target[k]:
                        continue
                    target[k] += wmax
                    c = pos[k]
                    sk = self._skip[i]
                    while table[c] >= 0:
                        c += sk
                        if c >= <uint64_t>m:
                            c -= m
                    table[c] = <int32_t>i
                    c += sk
                    pos[k] = c - m if c >= <uint64_t>m else c
                    filled += 1
                    if filled == m:
                        break
                it += 1
        free(entries)
        free(pos)
        free(target)
        return 0

    cdef int _changed(self) except -1:
        cdef Py_ssize_t i, nlive = 0
        cdef int64_t lw = 0, lf = 0
        for i in range(self.n):
            if self._live[i]:
                nlive += 1
                lw += self._weight[i]
                lf += self._inflight[i]
        self._nlive = nlive
        self._lw = lw
        self._lf = lf
        return 0

    def set_weight(self, idx, w):
        cdef Py_ssize_t i = self._index(idx)
        cdef int64_t v = _check_weight(w)
        if v != self._weight[i]:
            self._weight[i] = v
            self._live[i] = 1 if (self._eligible[i] and v > 0) else 0
            if self._table != NULL:
                self._build()
        self._changed()

    cpdef release(self, idx):
        cdef Py_ssize_t i = self._index(idx)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1
            if self._live[i]:
                self._lf -= 1

    cpdef Py_ssize_t select(self, key=b"") except -3:
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._live, self._nlive)

    cpdef Py_ssize_t select_excluding(self, exclude, key=b"") except -3:
        # select's walk from the key's entry, passing excluded backends too; the
        # bounded load still compares with the mean over every live backend
        cdef Py_ssize_t left = self._exclude(exclude)
        if type(key) is not bytes:
            raise TypeError("key must be bytes")
        return self._walk(key, self._mask, left)

    cdef inline Py_ssize_t _walk(self, bytes key, const unsigned char* live, Py_ssize_t nlive):
        """The table walk from the key's entry to the first backend ``live`` allows
        (and, with a balance factor, under the load bound)."""
        cdef Py_ssize_t kl = PyBytes_GET_SIZE(key)
        if kl == 0:
            return -2
        if nlive == 0 or self._table == NULL:
            return -1
        cdef uint64_t m = <uint64_t>self.table_size
        cdef uint64_t c = _xxh64(<const unsigned char*>PyBytes_AS_STRING(key), kl, 0) % m
        cdef uint64_t k
        cdef const int32_t* table = self._table
        cdef int64_t* inf = self._inflight
        cdef double f = self.balance_factor, lim, lw
        cdef Py_ssize_t b, pick = -1, first = -1
        if f == 0.0:
            for k in range(m):
                b = table[c]
                if live[b]:
                    pick = b
                    break
                c = c + 1 if c + 1 < m else 0
        else:
            lim = f * <double>(self._lf + 1)
            lw = <double>self._lw
            for k in range(m):
                b = table[c]
                if live[b]:
                    if <double>inf[b] * lw < lim * <double>self._weight[b]:
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

    See ``fastlb._core_py.pick_many``: this is its compiled twin. The loop runs
    in C and calls the cpdef ``Selector.select`` (with ``exclude``:
    ``select_excluding``) and ``release`` through the vtable, as the compiled
    data path does (no Python call per pick).
    """
    if not isinstance(selector, Selector):
        raise TypeError(f"selector must be a Selector, not {type(selector).__name__}")
    cdef Selector sel = <Selector>selector
    n = _index(n)
    if n < 0:
        raise ValueError("n must not be negative")
    cdef Py_ssize_t count = n, k, idx
    cdef long long total = 0
    if exclude is None:
        for k in range(count):
            idx = sel.select(key)
            if idx >= 0:
                sel.release(idx)
                total += idx
    else:
        for k in range(count):
            idx = sel.select_excluding(exclude, key)
            if idx >= 0:
                sel.release(idx)
                total += idx
    return total


# ---------------------------------------------------------------- framing

def find_head_end(data, Py_ssize_t start=0):
    """Index just past the first CRLF CRLF at or after ``start`` in ``data``, or -1.

    See ``fastlb._core_py.find_head_end``: this is its compiled twin.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    if start < 0:
        raise ValueError("start must not be negative")
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i = start, j
    cdef const char* q
    while i < n:
        q = <const char*>memchr(p + i, 10, n - i)
        if q == NULL:
            return -1
        j = q - p
        if j + 2 >= n:
            return -1
        if j > start and p[j - 1] == 13 and p[j + 1] == 13 and p[j + 2] == 10:
            return j + 3
        i = j + 1
    return -1


# ---------------------------------------------------------------- access log

cdef enum:
    FMT_COMBINED = 0
    FMT_JSON = 1
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
    see ``_core_py._log_parts``."""
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
    # milliseconds with 3 decimals, as _core_py._ms
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
    if fmt != FMT_COMBINED and fmt != FMT_JSON:
        raise ValueError("fmt must be LOG_COMBINED (0) or LOG_JSON (1)")
    L.json = fmt == FMT_JSON
    L.line.n = L.ref.n = L.ua.n = L.rid.n = -1
    L.line.p = L.ref.p = L.ua.p = L.rid.p = NULL
    L.has_head = head is not None
    if L.has_head:
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
            return _put(w, b"ms\n", 3)
        return _put(w, b"-\n", 2)
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
                    double total):
    """One access log line, as bytes ending in LF.

    See ``fastlb._core_py.access_log_line``: this is its compiled twin (the
    same bytes for the same arguments). The line is written once, into a
    buffer sized for the worst case (every byte escaped), on the stack for
    ordinary lines.
    """
    cdef LogLine L
    cdef Py_ssize_t bound = _log_prepare(&L, fmt, head, client, stamp, status, sent, backend,
                                         upstream, total)
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
        if fmt != FMT_COMBINED and fmt != FMT_JSON:
            raise ValueError("fmt must be LOG_COMBINED (0) or LOG_JSON (1)")
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
