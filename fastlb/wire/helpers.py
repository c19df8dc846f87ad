"""Field lines: split and validated, Content-Length, Connection tokens.

The pure twin of ``helpers.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from fastlb.errors import MAX_CONTENT_LENGTH
from fastlb.wire.characters import _DIGITS, _OWS, _TCHAR, _VCHAR

# ---------------------------------------------------------------- helpers

def _is_token(b):
    return len(b) > 0 and all(c in _TCHAR for c in b)


def _parse_length(value, exc):
    if not value or len(value) > 19 or not all(c in _DIGITS for c in value):
        raise exc("invalid Content-Length")
    n = int(value)
    if n > MAX_CONTENT_LENGTH:
        raise exc("Content-Length too large")
    return n


def _split_fields(head, start, exc):
    """Yield (name, lowercase name, value) for each field line of ``head`` from ``start``.

    ``head`` ends with CRLF CRLF. Lines must end with CRLF; names are tokens
    with no whitespace before the colon; values hold no control bytes but HTAB;
    obs-fold is refused.
    """
    end = len(head) - 2
    pos = start
    while pos < end:
        eol = head.find(b"\r\n", pos)
        line = head[pos:eol]
        colon = line.find(b":")
        if colon <= 0:
            raise exc("invalid header line")
        name = line[:colon]
        if not _is_token(name):
            raise exc("invalid header name")
        value = line[colon + 1:].strip(_OWS)
        for c in value:
            if c not in _VCHAR:
                raise exc("invalid byte in header value")
        yield name, name.lower(), value
        pos = eol + 2


def _connection_tokens(value):
    return [t.strip(_OWS).lower() for t in value.split(b",") if t.strip(_OWS)]
