"""Chunked bodies: ChunkedScanner finds their end and de-chunks them.

The pure twin of ``chunked.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from fastlb.errors import MAX_CHUNK_SIZE_DIGITS, BadRequest
from fastlb.wire.characters import _HEX, _TCHAR, _VCHAR

# ---------------------------------------------------------------- chunked bodies

_S_SIZE = 0
_S_EXT = 1
_S_SIZE_LF = 2
_S_DATA = 3
_S_DATA_CR = 4
_S_DATA_LF = 5
_S_TRAILER_START = 6
_S_TRAILER_NAME = 7
_S_TRAILER_VALUE = 8
_S_TRAILER_LF = 9
_S_END_LF = 10
_S_DONE = 11

_MAX_SIZE = 1 << 60          # a chunk is smaller (15 hex digits without leading zeros)
_MAX_LINE = 4096            # a chunk-size line with its extensions
_MAX_TRAILERS = 16384       # the whole trailer section


class ChunkedScanner:
    """Finds the end of a chunked body, strictly, across any split of the input.

    ``scan(data, start)`` consumes ``data[start:]`` and returns the index just
    past the end of the body when the body ends inside ``data``, else -1.
    The caller forwards ``data[start:end]`` untouched, unless ``decode`` is
    set: then the chunk payloads are appended to ``payload`` (a list the
    caller empties) and trailers are dropped. ``exc`` is raised on any
    framing error (bad size, missing CRLF, bare LF, control bytes, overlong
    lines or trailers). A chunk size may have leading zeros, up to
    ``MAX_CHUNK_SIZE_DIGITS`` hex digits in all ("chunk size too long"), and
    must be below 2**60 ("chunk size too large").
    """

    __slots__ = ("decode", "payload", "_exc", "_state", "_size", "_digits", "_line")

    def __init__(self, decode=False, exc=BadRequest):
        self.decode = decode
        self.payload = []
        self._exc = exc
        self._state = _S_SIZE
        self._size = 0
        self._digits = 0
        self._line = 0

    @property
    def done(self):
        return self._state == _S_DONE

    def scan(self, data, start=0):
        n = len(data)
        i = start
        state = self._state
        exc = self._exc
        if state == _S_DONE:
            return start
        if start < 0:
            raise ValueError("start must not be negative")
        try:
            while i < n:
                if state == _S_DATA:
                    take = min(self._size, n - i)
                    if self.decode:
                        chunk = data[i:i + take]
                        if type(chunk) is not bytes:
                            # bytes, never a view of (or a copy typed like) the caller's buffer
                            chunk = bytes(chunk)
                        self.payload.append(chunk)
                    i += take
                    self._size -= take
                    if self._size == 0:
                        state = _S_DATA_CR
                    continue
                c = data[i]
                i += 1
                if state == _S_SIZE:
                    v = _HEX.get(c)
                    if v is not None:
                        # leading zeros are valid (RFC 9112 7.1); the field's length is bounded
                        self._digits += 1
                        if self._digits > MAX_CHUNK_SIZE_DIGITS:
                            raise exc("chunk size too long")
                        self._size = self._size * 16 + v
                        if self._size >= _MAX_SIZE:
                            raise exc("chunk size too large")
                    elif self._digits == 0:
                        raise exc("invalid chunk size")
                    elif c == 0x3B:  # ';'
                        state = _S_EXT
                        self._line = self._digits + 1
                    elif c == 0x0D:
                        state = _S_SIZE_LF
                    else:
                        raise exc("invalid chunk size")
                elif state == _S_EXT:
                    if c == 0x0D:
                        state = _S_SIZE_LF
                    elif c not in _VCHAR:
                        raise exc("invalid chunk extension")
                    else:
                        self._line += 1
                        if self._line > _MAX_LINE:
                            raise exc("chunk extension too long")
                elif state == _S_SIZE_LF:
                    if c != 0x0A:
                        raise exc("missing LF after chunk size")
                    self._digits = 0
                    if self._size == 0:
                        state = _S_TRAILER_START
                        self._line = 0
                    else:
                        state = _S_DATA
                elif state == _S_DATA_CR:
                    if c != 0x0D:
                        raise exc("missing CRLF after chunk data")
                    state = _S_DATA_LF
                elif state == _S_DATA_LF:
                    if c != 0x0A:
                        raise exc("missing CRLF after chunk data")
                    state = _S_SIZE
                else:
                    # trailer section; _line counts its bytes
                    self._line += 1
                    if self._line > _MAX_TRAILERS:
                        raise exc("trailers too large")
                    if state == _S_TRAILER_START:
                        if c == 0x0D:
                            state = _S_END_LF
                        elif c in _TCHAR:
                            state = _S_TRAILER_NAME
                        else:
                            raise exc("invalid trailer")
                    elif state == _S_TRAILER_NAME:
                        if c == 0x3A:  # ':'
                            state = _S_TRAILER_VALUE
                        elif c not in _TCHAR:
                            raise exc("invalid trailer name")
                    elif state == _S_TRAILER_VALUE:
                        if c == 0x0D:
                            state = _S_TRAILER_LF
                        elif c not in _VCHAR:
                            raise exc("invalid byte in trailer")
                    elif state == _S_TRAILER_LF:
                        if c != 0x0A:
                            raise exc("missing LF after trailer")
                        state = _S_TRAILER_START
                    else:  # _S_END_LF
                        if c != 0x0A:
                            raise exc("missing LF after last chunk")
                        self._state = _S_DONE
                        return i
        finally:
            if self._state != _S_DONE:
                self._state = state
        return -1
