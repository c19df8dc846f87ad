"""Request ids: new_request_id, seed_request_ids, valid_request_id, add_request_id.

The pure twin of ``requestid.pxi``, part of the pure-Python core (``fastlb._core_py``).

An id is 36 bytes in the form of a version-4 UUID,
``xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`` (lowercase hex; ``y`` is 8, 9, a
or b). Its first three groups (60 free bits) are drawn from the OS once per
process; the last two are the variant bits and a 62-bit counter through a
bijective mixer (xor-shifts and odd multipliers modulo 2**62), the counter
starting at a value also drawn from the OS. So one process never repeats an
id within 2**62 of them, consecutive ids look unrelated (they tell nothing
of how many requests were served), and two processes repeat each other's
ids only if they drew the same 60 bits. A forked child draws again
(``os.register_at_fork``). Per id: an increment, the mixer, 16 hex digits
and one bytes object.

``seed_request_ids(process, counter)`` sets the two draws (for tests: both
cores then give the same ids). ``valid_request_id(value)`` says whether a
client's id is kept: 1 to ``MAX_REQUEST_ID`` bytes, each a letter, a digit
or one of ``-_.:@+/=`` (the characters of UUIDs, base64, and the ids of
Heroku's router and Rails, which accept ids of 20-200 and up to 255 such
characters). ``add_request_id(msg, name, id)`` gives the id to a head
fastlb wrote (a response head from ``rewrite_response_head``, one of its own
answers) unless the head has a field of that name.
"""
import os as _os
from operator import index as _index

from fastlb.wire.authorities import _as_bytes

MAX_REQUEST_ID = 200

_M62 = (1 << 62) - 1
_RID_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+/=")

_rid_prefix = b""   # the first three groups and their dashes: "xxxxxxxx-xxxx-4xxx-"
_rid_ctr = 0


def _mix62(x):
    """A bijection of 62-bit integers (each step is invertible modulo 2**62)."""
    x ^= x >> 31
    x = (x * 0x7FB5D329728EA185) & _M62
    x ^= x >> 27
    x = (x * 0x81DADEF4BC2DD44D) & _M62
    x ^= x >> 33
    return x


def seed_request_ids(process, counter):
    """Set the process's part of the ids (its low 64 bits, the version nibble
    then set to 4) and the counter (its low 62 bits; the next id uses counter + 1)."""
    global _rid_prefix, _rid_ctr
    hi = (_index(process) & 0xFFFFFFFFFFFF0FFF) | 0x4000
    _rid_prefix = b"%08x-%04x-%04x-" % (hi >> 32, (hi >> 16) & 0xFFFF, hi & 0xFFFF)
    _rid_ctr = _index(counter) & _M62


def new_request_id():
    """A new request id (36 bytes, see the module docstring)."""
    global _rid_ctr
    c = _rid_ctr = (_rid_ctr + 1) & _M62
    tail = b"%016x" % (_mix62(c) | (2 << 62))
    return _rid_prefix + tail[:4] + b"-" + tail[4:]


def valid_request_id(value):
    """Whether a client's id (a field value, bytes) is kept as the request's id."""
    value = _as_bytes(value, "value")
    return 0 < len(value) <= MAX_REQUEST_ID and all(c in _RID_OK for c in value)


def add_request_id(msg, request_id_header, request_id):
    """``msg`` with ``NAME: ID`` as the last field of its head, unless the
    head has a field called NAME (compared case-insensitively).

    ``msg`` is a message fastlb wrote: a start line, field lines written
    ``Name: value`` (no space before the colon), CRLF CRLF, then maybe a
    body (kept as it is). ``request_id_header`` and ``request_id`` are
    bytes (None or b"": ``msg`` is returned as it is); both are written as
    they are. ValueError if ``msg`` has no CRLF CRLF.
    """
    msg = _as_bytes(msg, "msg")
    if not (request_id_header and request_id):
        return msg
    if type(request_id_header) is not bytes or type(request_id) is not bytes:
        raise TypeError("request_id_header and request_id must be bytes")
    end = msg.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("msg has no end of head (CRLF CRLF)")
    want = request_id_header.lower() + b":"
    pos = msg.find(b"\r\n") + 2
    while pos < end + 2:
        eol = msg.find(b"\r\n", pos)
        if msg[pos:eol][:len(want)].lower() == want:
            return msg
        pos = eol + 2
    return msg[:end + 2] + request_id_header + b": " + request_id + b"\r\n" + msg[end + 2:]


def _reseed():
    seed_request_ids(int.from_bytes(_os.urandom(8), "little"),
                     int.from_bytes(_os.urandom(8), "little"))


_reseed()
_os.register_at_fork(after_in_child=_reseed)
