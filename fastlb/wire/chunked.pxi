# Included by fastlb/_core.pyx: one extension module with the rest of the core.
# The pure twin is fastlb/wire/chunked.py.

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
