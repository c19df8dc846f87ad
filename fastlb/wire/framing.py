"""Framing helpers of the data path: find_head_end.

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
