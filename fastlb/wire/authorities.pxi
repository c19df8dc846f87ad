# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/authorities.py.

# ---------------------------------------------------------------- authorities
#
# Host = uri-host [ ":" port ]: the rules are in the "authorities" section of
# ``authorities.py`` (the reference). Checked over p[s:e] without copying.

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
