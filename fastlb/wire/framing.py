"""Framing helpers of the data path: find_head_end, read_buffer, buffer_bytes.

The pure twin of ``framing.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""

# ---------------------------------------------------------------- framing

def find_head_end(data, start=0):
    """Index just past the first CRLF CRLF at or after ``start`` in ``data``, or -1.

    ``data`` is bytes. The caller still bounds the head's size itself.
    """
    if type(data) is not bytes:
        raise TypeError("data must be bytes")
    if start < 0:
        raise ValueError("start must not be negative")
    i = data.find(b"\r\n\r\n", start)
    return -1 if i < 0 else i + 4


# ---------------------------------------------------------------- read buffers

def read_buffer(n):
    """A new writable buffer of ``n`` bytes for a transport to read into
    (``asyncio.BufferedProtocol.get_buffer``). Its bytes are unspecified: the
    compiled twin does not clear them (only what a read writes is ever read)."""
    if n < 0:
        raise ValueError("n must not be negative")
    return bytearray(n)


def buffer_bytes(buf, start, end):
    """``bytes(buf[start:end])`` of a ``bytearray``: one copy, nothing else."""
    if type(buf) is not bytearray:
        raise TypeError("buf must be a bytearray")
    if start < 0 or start > end or end > len(buf):
        raise ValueError("start and end must lie within buf")
    return bytes(memoryview(buf)[start:end])
