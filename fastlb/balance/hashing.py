"""hash64: XXH64, the hash of the hashing selectors.

The pure twin of ``hashing.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""

# ---------------------------------------------------------------- hashing

_M64 = 0xFFFFFFFFFFFFFFFF
_XP1 = 0x9E3779B185EBCA87
_XP2 = 0xC2B2AE3D27D4EB4F
_XP3 = 0x165667B19E3779F9
_XP4 = 0x85EBCA77C2B2AE63
_XP5 = 0x27D4EB2F165667C5


def _xround(acc, lane):
    acc = (acc + lane * _XP2) & _M64
    acc = ((acc << 31) | (acc >> 33)) & _M64
    return (acc * _XP1) & _M64


def _xmerge(h, v):
    h ^= _xround(0, v)
    return (h * _XP1 + _XP4) & _M64


def hash64(data, seed=0):
    """XXH64 of ``data`` (bytes) with ``seed`` (taken modulo 2**64): an int in [0, 2**64).

    The hash of backend names and request keys (``Maglev``); it never changes
    between releases (golden vectors in the tests).
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    seed &= _M64
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + _XP1 + _XP2) & _M64
        v2 = (seed + _XP2) & _M64
        v3 = seed
        v4 = (seed - _XP1) & _M64
        limit = n - 32
        while p <= limit:
            v1 = _xround(v1, int.from_bytes(data[p:p + 8], "little"))
            v2 = _xround(v2, int.from_bytes(data[p + 8:p + 16], "little"))
            v3 = _xround(v3, int.from_bytes(data[p + 16:p + 24], "little"))
            v4 = _xround(v4, int.from_bytes(data[p + 24:p + 32], "little"))
            p += 32
        h = (((v1 << 1) | (v1 >> 63)) + ((v2 << 7) | (v2 >> 57))
             + ((v3 << 12) | (v3 >> 52)) + ((v4 << 18) | (v4 >> 46))) & _M64
        h = _xmerge(h, v1)
        h = _xmerge(h, v2)
        h = _xmerge(h, v3)
        h = _xmerge(h, v4)
    else:
        h = (seed + _XP5) & _M64
    h = (h + n) & _M64
    while p + 8 <= n:
        h ^= _xround(0, int.from_bytes(data[p:p + 8], "little"))
        h = ((((h << 27) | (h >> 37)) & _M64) * _XP1 + _XP4) & _M64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p:p + 4], "little") * _XP1) & _M64
        h = ((((h << 23) | (h >> 41)) & _M64) * _XP2 + _XP3) & _M64
        p += 4
    while p < n:
        h ^= (data[p] * _XP5) & _M64
        h = ((((h << 11) | (h >> 53)) & _M64) * _XP1) & _M64
        p += 1
    h ^= h >> 33
    h = (h * _XP2) & _M64
    h ^= h >> 29
    h = (h * _XP3) & _M64
    h ^= h >> 32
    return h
