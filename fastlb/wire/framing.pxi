# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/framing.py.

# ---------------------------------------------------------------- framing

cpdef Py_ssize_t find_head_end(data, Py_ssize_t start=0) except -2:
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
