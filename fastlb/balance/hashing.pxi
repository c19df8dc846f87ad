# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/balance/hashing.py.

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
