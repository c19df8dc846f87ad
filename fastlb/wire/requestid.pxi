# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/requestid.py.

# ---------------------------------------------------------------- request ids

import os as _os

cdef enum:
    MAX_REQUEST_ID = 200
    RID_LEN = 36

cdef uint64_t M62 = (<uint64_t>1 << 62) - 1
cdef unsigned char _rid_ok[256]     # the bytes a client's id may have
cdef char _rid_prefix[19]           # "xxxxxxxx-xxxx-4xxx-": this process's part
cdef uint64_t _rid_ctr = 0
cdef uint64_t _rid_keys[4]          # the Feistel network's round keys
cdef const char* _HEXL = b"0123456789abcdef"
cdef char _hex2[512]                # byte -> its two hex digits


cdef void _init_rid_table() noexcept:
    cdef int c
    for c in range(256):
        _rid_ok[c] = 0
        _hex2[2 * c] = _HEXL[c >> 4]
        _hex2[2 * c + 1] = _HEXL[c & 15]
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+/=":
        _rid_ok[c] = 1


_init_rid_table()


cdef inline uint64_t _round(uint64_t x, uint64_t k) noexcept nogil:
    # a Feistel round's function: see the twin
    x ^= k
    x ^= x >> 33
    x *= <uint64_t>0xFF51AFD7ED558CCD
    x ^= x >> 33
    x *= <uint64_t>0xC4CEB9FE1A85EC53
    x ^= x >> 33
    return x & 0x7FFFFFFF


cdef inline uint64_t _permute62(uint64_t c) noexcept nogil:
    # the keyed bijection of 62-bit integers: see the twin
    cdef uint64_t hi = c >> 31, lo = c & 0x7FFFFFFF, t
    cdef int i
    for i in range(4):
        t = lo
        lo = hi ^ _round(lo, _rid_keys[i])
        hi = t
    return (hi << 31) | lo


cdef inline void _hex(char* w, uint64_t v, int digits) noexcept nogil:
    # the low ``digits`` hex digits of v, most significant first
    cdef int i
    for i in range(digits - 1, -1, -1):
        w[i] = _HEXL[v & 15]
        v >>= 4


def seed_request_ids(process, counter, key):
    """Set the process's part of the ids, the counter and the permutation's key.

    See ``fastlb._core_py.seed_request_ids``: this is its compiled twin.
    """
    global _rid_ctr
    cdef int i
    cdef uint64_t hi = (<uint64_t>(_index(process) & 0xFFFFFFFFFFFFFFFF) & <uint64_t>0xFFFFFFFFFFFF0FFF) | 0x4000
    _hex(_rid_prefix, hi >> 32, 8)
    _rid_prefix[8] = b'-'
    _hex(_rid_prefix + 9, (hi >> 16) & 0xFFFF, 4)
    _rid_prefix[13] = b'-'
    _hex(_rid_prefix + 14, hi & 0xFFFF, 4)
    _rid_prefix[18] = b'-'
    _rid_ctr = <uint64_t>(_index(counter) & 0xFFFFFFFFFFFFFFFF) & M62
    k = _index(key)
    for i in range(4):
        _rid_keys[i] = <uint64_t>((k >> (64 * i)) & 0xFFFFFFFFFFFFFFFF)


cpdef bytes new_request_id():
    """A new request id (36 bytes).

    See ``fastlb._core_py.new_request_id``: this is its compiled twin; a C
    call for the modules that cimport it (``_core.pxd``).
    """
    global _rid_ctr
    cdef bytes out = PyBytes_FromStringAndSize(NULL, RID_LEN)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef uint64_t t
    cdef int i
    _rid_ctr = (_rid_ctr + 1) & M62
    t = _permute62(_rid_ctr) | (<uint64_t>2 << 62)
    memcpy(w, _rid_prefix, 19)
    memcpy(w + 19, &_hex2[2 * (t >> 56)], 2)
    memcpy(w + 21, &_hex2[2 * ((t >> 48) & 0xFF)], 2)
    w[23] = b'-'
    for i in range(6):
        memcpy(w + 24 + 2 * i, &_hex2[2 * ((t >> (40 - 8 * i)) & 0xFF)], 2)
    return out


cdef inline bint _valid_rid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n <= 0 or n > MAX_REQUEST_ID:
        return False
    for i in range(n):
        if not _rid_ok[s[i]]:
            return False
    return True


def valid_request_id(value):
    """Whether a client's id is kept as the request's id.

    See ``fastlb._core_py.valid_request_id``: this is its compiled twin.
    """
    cdef bytes v = _as_bytes(value, "value")
    return _valid_rid(<const unsigned char*>PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v))


cpdef bytes add_request_id(msg, request_id_header, request_id):
    """``msg`` with ``NAME: ID`` as the last field of its head, unless it has one.

    See ``fastlb._core_py.add_request_id``: this is its compiled twin; a C
    call for the modules that cimport it (``_core.pxd``).
    """
    cdef bytes m = _as_bytes(msg, "msg")
    if not (request_id_header and request_id):
        return m
    if not (PyBytes_CheckExact(request_id_header) and PyBytes_CheckExact(request_id)):
        raise TypeError("request_id_header and request_id must be bytes")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(m)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(m), end = -1, pos, eol, i
    cdef bytes nm = <bytes>request_id_header, rid = <bytes>request_id
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(nm), il = PyBytes_GET_SIZE(rid)
    cdef const unsigned char* q = <const unsigned char*>PyBytes_AS_STRING(nm)
    cdef bytes out
    cdef char* w
    for i in range(n - 3):
        if p[i] == 0x0D and p[i + 1] == 0x0A and p[i + 2] == 0x0D and p[i + 3] == 0x0A:
            end = i
            break
    if end < 0:
        raise ValueError("msg has no end of head (CRLF CRLF)")
    pos = _find_crlf(p, 0, n) + 2
    while pos < end + 2:
        eol = _find_crlf(p, pos, n)
        if eol - pos >= nl + 1 and p[pos + nl] == 0x3A and _ieq2(p + pos, q, nl):
            return m
        pos = eol + 2
    out = PyBytes_FromStringAndSize(NULL, n + nl + il + 4)
    w = PyBytes_AS_STRING(out)
    w = _put(w, p, end + 2)
    w = _put(w, q, nl)
    w = _put(w, b": ", 2)
    w = _put(w, PyBytes_AS_STRING(rid), il)
    w = _put(w, b"\r\n", 2)
    _put(w, p + end + 2, n - end - 2)
    return out


def _reseed():
    seed_request_ids(int.from_bytes(_os.urandom(8), "little"),
                     int.from_bytes(_os.urandom(8), "little"),
                     int.from_bytes(_os.urandom(32), "little"))


_reseed()
_os.register_at_fork(after_in_child=_reseed)
