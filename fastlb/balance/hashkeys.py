"""hash_key: the bytes of a request that a hashing selector hashes.

The pure twin of ``hashkeys.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from fastlb.wire.characters import _OWS
from fastlb.wire.request import _cookie_value, _path_key, _query_value

# ---------------------------------------------------------------- hash keys

_HASH_KINDS = ("path", "query", "header", "cookie")


def _request_target(head):
    eol = head.find(b"\r\n")
    if eol < 0:
        eol = len(head)
    line = head[:eol]
    sp1 = line.find(b" ")
    sp2 = line.rfind(b" ")
    if sp1 < 0 or sp2 <= sp1:
        return b"", eol
    return line[sp1 + 1:sp2], eol


def hash_key(head, kind, name=b""):
    """The bytes a hash-based balancer hashes, taken from a raw request head; b"" when absent.

    ``head`` is the raw request head (request line to the blank line). ``kind``:

    * ``"path"``: the path of the request target, without query or fragment
      (for an absolute-form target, the part from the first "/" after the
      authority, "/" when there is none); ``name`` is ignored;
    * ``"query"``: the raw value of the first query parameter called ``name``
      (exact match; a parameter without "=" has the value b"");
    * ``"header"``: the value of the first header field called ``name``
      (ASCII case-insensitive), OWS-trimmed;
    * ``"cookie"``: the value of the first cookie called ``name`` (exact match)
      in the Cookie field(s), in order; pairs split on ";", name and value
      OWS-trimmed, pairs without "=" skipped, quotes kept.

    ``name`` is bytes (a str is encoded as Latin-1). Raises TypeError when
    ``head`` is not bytes, ValueError for an unknown ``kind`` or an empty
    ``name`` where one is needed. Never validates the head: any bytes give
    an answer.
    """
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    if kind not in _HASH_KINDS:
        raise ValueError(f"unknown hash key kind: {kind!r}")
    if isinstance(name, str):
        name = name.encode("latin-1")
    elif type(name) is not bytes:
        raise TypeError("name must be bytes or str")
    if kind != "path" and not name:
        raise ValueError(f"a {kind} hash key needs a name")
    target, eol = _request_target(head)
    if kind == "path":
        path = _path_key(target)
        if not path.startswith(b"/"):
            j = path.find(b"://")
            if j >= 0:
                s = path.find(b"/", j + 3)
                path = path[s:] if s >= 0 else b"/"
        return path
    if kind == "query":
        return _query_value(target, name)
    want = b"cookie" if kind == "cookie" else name.lower()
    for value in _field_values(head, eol + 2, want):
        if kind == "header":
            return value
        v = _cookie_value(value, name)
        if v is not None:
            return v
    return b""


def _field_values(head, pos, want):
    """The OWS-trimmed values of the fields called ``want`` (lowercase), in
    order, in the field lines of ``head`` from ``pos`` up to the blank line;
    a line without a colon is passed over."""
    n = len(head)
    while pos < n:
        e = head.find(b"\r\n", pos)
        if e < 0:
            e = n
        if e == pos:
            return
        colon = head.find(b":", pos, e)
        if colon > pos and head[pos:colon].lower() == want:
            yield head[colon + 1:e].strip(_OWS)
        pos = e + 2


def field_value(head, name):
    """The value of the first field called ``name`` in a raw request head; None when none is.

    ``name`` is compared ASCII case-insensitively (bytes; a str is encoded
    as Latin-1); the value is OWS-trimmed (b"" for an empty one). The lines
    after the request line are read up to the blank line, as ``hash_key``
    reads them; a line without a colon is passed over. Never validates the
    head (the data path gives it a validated one): any bytes give an answer.
    Raises TypeError when ``head`` is not bytes or ``name`` not bytes or str.
    """
    if type(head) is not bytes:
        raise TypeError("head must be bytes")
    if isinstance(name, str):
        name = name.encode("latin-1")
    elif type(name) is not bytes:
        raise TypeError("name must be bytes or str")
    if not name:
        return None
    eol = head.find(b"\r\n")
    if eol < 0:
        return None
    return next(_field_values(head, eol + 2, name.lower()), None)
    pos = eol + 2
    while pos < n:
        e = head.find(b"\r\n", pos)
        if e < 0:
            e = n
        if e == pos:
            break
        colon = head.find(b":", pos, e)
        if colon > pos and head[pos:colon].lower() == want:
            return head[colon + 1:e].strip(_OWS)
        pos = e + 2
    return None
