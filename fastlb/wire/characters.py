"""Character classes of fields and targets; the header kinds.

The pure twin of ``characters.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""

# ---------------------------------------------------------------- characters

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# field-value bytes: HTAB, SP, VCHAR, obs-text
_VCHAR = frozenset([9] + list(range(0x20, 0x7F)) + list(range(0x80, 0x100)))
# request-target: visible ASCII and obs-text; no SP, no controls
_TARGET = frozenset(list(range(0x21, 0x7F)) + list(range(0x80, 0x100)))
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_DIGITS = frozenset(b"0123456789")

# Fields removed by every hop (RFC 9110 7.6.1), besides those named in Connection.
# Trailer is not one (RFC 9110 6.6.2): it is kept exactly when the message is
# sent on chunked, with its trailer section.
_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te",
     b"transfer-encoding", b"upgrade"]
)
# Connection may name these, but removing them would change the framing or
# routing of the message, so they are kept.
_PROTECTED = frozenset([b"host", b"content-length"])
_IDEMPOTENT = frozenset([b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"])
_OWS = b" \t"

# Header kinds (the compiled core switches on the same numbers).
_H_OTHER = 0
_H_HOST = 1
_H_CONTENT_LENGTH = 2
_H_TRANSFER_ENCODING = 3
_H_CONNECTION = 4
_H_HOP = 5
_H_UPGRADE = 6          # hop-by-hop, but forwarded on an upgrade request and its 101
_H_XFF = 7
_H_XF_PROTO = 8
_H_EXPECT = 9
_H_TRAILER = 10
_H_XF_HOST = 11
_H_FORWARDED = 12

_KINDS = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"keep-alive": _H_HOP,
    b"proxy-connection": _H_HOP,
    b"te": _H_HOP,
    b"trailer": _H_TRAILER,
    b"upgrade": _H_UPGRADE,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_XF_PROTO,
    b"x-forwarded-host": _H_XF_HOST,
    b"forwarded": _H_FORWARDED,
    b"expect": _H_EXPECT,
}
