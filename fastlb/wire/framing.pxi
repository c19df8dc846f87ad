# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/framing.py.

# ---------------------------------------------------------------- framing

# With SSE2 (FASTLB_SSE2, helpers.pxi), 16 candidate positions at a time: an
# LF at j and at j + 2 (rare but at a head's end), then the CRs at j - 1 and
# j + 1 checked one by one. Returns j + 3 for the first CRLF CRLF (its first
# LF at j > start), or -1 with ``*pos`` at the first position not searched
# (fewer than 18 bytes are left there: the caller's loop goes on).
cdef extern from *:
    """
    #if FASTLB_SSE2
    static inline Py_ssize_t fastlb_head_end16(const char* p, Py_ssize_t start, Py_ssize_t* pos,
                                               Py_ssize_t n) {
        const __m128i lf = _mm_set1_epi8(10);
        Py_ssize_t i = *pos, j;
        while (i + 18 <= n) {
            unsigned m = (unsigned)_mm_movemask_epi8(_mm_and_si128(
                _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)(p + i)), lf),
                _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)(p + i + 2)), lf)));
            while (m) {
                j = i + __builtin_ctz(m);
                if (j > start && p[j - 1] == 13 && p[j + 1] == 13)
                    return j + 3;
                m &= m - 1;
            }
            i += 16;
        }
        *pos = i;
        return -1;
    }
    #else
    #define fastlb_head_end16(p, start, pos, n) (-1)
    #endif
    """
    Py_ssize_t fastlb_head_end16(const char* p, Py_ssize_t start, Py_ssize_t* pos,
                                 Py_ssize_t n) noexcept nogil


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
    if FASTLB_SSE2:
        j = fastlb_head_end16(p, start, &i, n)
        if j >= 0:
            return j
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


# ---------------------------------------------------------------- read buffers

cpdef bytearray read_buffer(Py_ssize_t n):
    """A new writable buffer of ``n`` bytes, not cleared (see the twin)."""
    if n < 0:
        raise ValueError("n must not be negative")
    return PyByteArray_FromStringAndSize(NULL, n)


cpdef bytes buffer_bytes(buf, Py_ssize_t start, Py_ssize_t end):
    """``bytes(buf[start:end])`` of a ``bytearray``: one copy (see the twin)."""
    if type(buf) is not bytearray:
        raise TypeError("buf must be a bytearray")
    if start < 0 or start > end or end > PyByteArray_GET_SIZE(buf):
        raise ValueError("start and end must lie within buf")
    return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf) + start, end - start)
