# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/characters.py.

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
