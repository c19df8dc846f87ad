"""Request ids: new_request_id, seed_request_ids, valid_request_id, add_request_id.

The pure twin of ``requestid.pxi``, part of the pure-Python core (``fastlb._core_py``).

An id is 36 bytes in the form of a version-4 UUID,
``xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`` (lowercase hex; ``y`` is 8, 9, a
or b). Its first three groups (60 free bits) are drawn from the OS once per
process; the last two are the variant bits and a 62-bit counter through a
keyed permutation (a four-round Feistel network on two 31-bit halves, each
round a 64-bit finalizer of the half xored with a round key), the counter
starting at a value also drawn from the OS and the 256 bits of round keys
too. A Feistel network is a bijection whatever its round function, so one
process never repeats an id within 2**62 of them; and without the keys
(which never leave the process) an id does not give the counter back, so
two ids tell nothing of how many requests were served between them. Two
processes repeat each other's ids only if they drew the same 60 bits. A
forked child draws again (``os.register_at_fork``). Per id: an increment,
four rounds, 16 hex digits and one bytes object.

``seed_request_ids(process, counter, key)`` sets the three draws (for
tests: both cores then give the same ids). ``valid_request_id(value)`` says whether a
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

_M31 = (1 << 31) - 1
_M62 = (1 << 62) - 1
_M64 = (1 << 64) - 1
_RID_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@+/=")

_rid_prefix = b""   # the first three groups and their dashes: "xxxxxxxx-xxxx-4xxx-"
_rid_ctr = 0
_rid_keys = (0, 0, 0, 0)    # the Feistel network's round keys (64 bits each)


def _round(x, k):
    """A Feistel round's function: 31 bits of the finalizer of ``x ^ k``."""
    x ^= k
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    x ^= x >> 33
    return x & _M31


def _permute62(c):
    """The keyed bijection of 62-bit integers (the counter to an id's tail)."""
    hi = c >> 31
    lo = c & _M31
    for k in _rid_keys:
        hi, lo = lo, hi ^ _round(lo, k)
    return (hi << 31) | lo


def seed_request_ids(process, counter, key):
    """Set the process's part of the ids (its low 64 bits, the version nibble
    then set to 4), the counter (its low 62 bits; the next id uses counter + 1)
    and the permutation's key (its low 256 bits: four round keys)."""
    global _rid_prefix, _rid_ctr, _rid_keys
    hi = (_index(process) & 0xFFFFFFFFFFFF0FFF) | 0x4000
    key = _index(key)
    _rid_prefix = b"%08x-%04x-%04x-" % (hi >> 32, (hi >> 16) & 0xFFFF, hi & 0xFFFF)
    _rid_ctr = _index(counter) & _M62
    _rid_keys = tuple((key >> (64 * i)) & _M64 for i in range(4))


def new_request_id():
    """A new request id (36 bytes, see the module docstring)."""
    global _rid_ctr
    c = _rid_ctr = (_rid_ctr + 1) & _M62
    tail = b"%016x" % (_permute62(c) | (2 << 62))
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
                     int.from_bytes(_os.urandom(8), "little"),
                     int.from_bytes(_os.urandom(32), "little"))


_reseed()
_os.register_at_fork(after_in_child=_reseed)
