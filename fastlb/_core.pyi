"""Stubs of the compiled core ``fastlb._core`` (twin of ``fastlb._core_py``)."""
from typing import Callable, Iterable, Optional, Union

_Buffer = Union[bytes, bytearray, memoryview]

__all__ = [
    "Selector",
    "RoundRobin",
    "WeightedRoundRobin",
    "LeastConn",
    "P2C",
    "Random",
    "Maglev",
    "hash64",
    "hash_key",
    "field_value",
    "ChunkedScanner",
    "RequestHead",
    "parse_request_head",
    "write_request_head",
    "rewrite_response_head",
    "find_head_end",
    "read_buffer",
    "buffer_bytes",
    "parse_proxy_header",
    "pick_many",
    "access_log_line",
    "AccessLogBuffer",
    "monotonic_us",
    "assign_request_id",
    "rewrite_response_head_with_id",
    "add_request_id",
    "new_request_id",
    "seed_request_ids",
    "valid_request_id",
]

_Weights = Union[list[int], tuple[int, ...]]
_Indices = Iterable[int]

class Selector:
    """The surface every selector shares: the base class of the six algorithms.

    Backends are indices 0..n-1 with a weight (an int, 0..1_000_000; 0: never
    picked), an eligibility flag (initially True) and a count of requests in
    flight. A backend is *live* when eligible with a weight above 0; only live
    backends are picked. Every ``select`` returning ``idx >= 0`` counts one
    request in flight on ``idx``; the caller calls ``release(idx)`` exactly
    once when that request ends. Derived state (lists, tables) is rebuilt only
    by ``set_weight``/``set_eligible``, never per request. Out-of-range
    indices raise IndexError("backend index out of range").

    Compiled code can ``from fastlb._core cimport Selector`` (``_core.pxd``):
    ``select``, ``select_excluding`` and ``release`` are cpdef, called in C
    through the vtable.
    """

    n: int
    """Number of backends (read-only)."""

    def select(self, key: bytes = b"") -> int:
        """A live backend's index (counted in flight), or -1 when none is live.

        ``key`` is ignored except by Maglev (which returns -2 for b"").
        """

    def select_excluding(self, exclude: _Indices, key: bytes = b"") -> int:
        """As ``select``, among the live backends whose index is not in ``exclude``.

        The pick of a retry (in the spirit of Pingora's ``select_with``):
        ``exclude`` is an iterable of backend indices, usually the set of those
        the request already failed on. Each algorithm applies its own rule to
        the live backends left: round robin goes on with its rotation past the
        excluded ones, weighted round robin runs its smooth pass over the
        others only (the excluded keep their current weights), least-conn takes
        the least loaded of the others, p2c draws its two among them, random
        draws among them by weight, Maglev walks its table from the key's entry
        past excluded backends. Counted in flight like ``select``; -1 when no
        live backend is left (Maglev: -2 first for an empty key). With an empty
        ``exclude`` it gives exactly what ``select`` gives and leaves the same
        state. ``exclude`` is read before anything else: TypeError when it is
        not iterable or holds a non-integer, IndexError for an index out of
        range. The compiled core reads a ``set`` in place and costs O(n).
        """

    def release(self, idx: int) -> None:
        """End of one request on backend ``idx``: its in-flight count drops by 1 (never below 0)."""

    def acquire(self, idx: int) -> None:
        """Count one more request in flight on backend ``idx`` without choosing it."""

    def in_flight(self, idx: int) -> int:
        """Requests in flight on backend ``idx`` (selected and not yet released)."""

    def set_eligible(self, idx: int, ok: object) -> None:
        """Mark backend ``idx`` eligible or not (e.g. from health checks)."""

    def is_eligible(self, idx: int) -> bool:
        """Whether backend ``idx`` is eligible."""

    def set_weight(self, idx: int, w: int) -> None:
        """Set backend ``idx``'s weight (an int, 0..1_000_000; 0: never picked); rebuilds tables.

        TypeError for a non-integer, ValueError when out of range.
        """

class RoundRobin(Selector):
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    Other weights only count as "above 0" (any comparable number is accepted
    at construction). ``seed`` sets the first backend tried (``seed % n``).
    """

    def __init__(self, weights: "list[float] | tuple[float, ...]", seed: int = 0) -> None:
        """Raise ValueError when ``weights`` is empty."""

class WeightedRoundRobin(Selector):
    """Smooth weighted round robin (nginx's): weights 5, 1, 1 give a a b a c a a.

    Ties go to the first backend in scan order, which starts at ``seed % n``.
    ``set_weight`` resets the current weights; ``set_eligible`` does not.
    """

    def __init__(self, weights: _Weights, seed: int = 0) -> None:
        """ValueError when ``weights`` is empty or a weight is out of range; TypeError for a non-int."""

class LeastConn(Selector):
    """Fewest requests in flight per unit of weight (compared exactly, by cross-multiplication).

    Ties go to the first in rotation: the scan starts just after the last pick
    (at ``seed % n`` for the first).
    """

    def __init__(self, weights: _Weights, seed: int = 0) -> None:
        """As ``WeightedRoundRobin``."""

class P2C(Selector):
    """Power of two random choices: two distinct live backends drawn with a splitmix64
    generator seeded by ``seed``; the one with fewer requests in flight per unit of
    weight wins (the first drawn on a tie). Identical answers on both cores.
    """

    def __init__(self, weights: _Weights, seed: int = 0) -> None:
        """As ``WeightedRoundRobin``."""

class Random(Selector):
    """Weighted random (splitmix64 seeded by ``seed``): backend i with probability
    weight_i / total live weight. Identical answers on both cores.
    """

    def __init__(self, weights: _Weights, seed: int = 0) -> None:
        """As ``WeightedRoundRobin``."""

class Maglev(Selector):
    """Maglev consistent hashing (Envoy's weighted variant) with optional bounded load.

    ``names`` (distinct bytes, e.g. b"10.0.0.1:8080") give each backend's
    permutation (``hash64(name, 0)``: offset, ``hash64(name, 1)``: skip);
    backends fill the table in the order of their names, so the table depends
    only on names, weights and ``table_size``, never on the backends' order
    or on ``seed`` (accepted and unused). ``select(key)``: -2 for b"", else the
    backend at ``table[hash64(key) % table_size]``, walking forward to the next
    live entry when it is not live (bounded by ``table_size``; -1 if none is
    live). ``set_eligible`` never rebuilds the table; ``set_weight`` does.

    ``balance_factor`` (0: off, else >= 1.0): an entry's backend b is taken only
    if ``in_flight(b) < factor * (T + 1) * w_b / W`` (T: requests in flight on
    the live backends, W: their total weight), else the walk goes on.
    """

    table_size: int
    """Entries in the lookup table (a prime; read-only)."""
    balance_factor: float
    """The bounded-load factor, 0.0 when off (read-only)."""

    def __init__(self, weights: _Weights, names: "list[bytes] | tuple[bytes, ...]", seed: int = 0,
                 table_size: int = 65537, balance_factor: float = 0.0) -> None:
        """ValueError for a bad weight, names of the wrong count or not distinct, a
        ``table_size`` that is not a prime in [n, 2**24), a ``balance_factor`` that is
        neither 0 nor >= 1.0; TypeError for non-bytes names or non-numbers.
        """

    def select(self, key: bytes = b"") -> int:
        """The backend for ``key`` (counted in flight); -2 when ``key`` is empty, -1 when
        no backend is live. TypeError unless ``key`` is bytes.
        """

    def select_excluding(self, exclude: _Indices, key: bytes = b"") -> int:
        """``select(key)``'s walk from the key's entry, passing backends in ``exclude``
        too (with ``balance_factor``, the bound still uses every live backend's load).
        -2 for an empty key, -1 when no live backend is left. (The data path
        retries a hashed request by weighted round robin instead.)
        """

def pick_many(selector: Selector, n: int, key: bytes = b"",
              exclude: Optional[_Indices] = None) -> int:
    """``n`` picks (``select(key)``, then ``release(idx)`` if ``idx >= 0``); the sum of the indices.

    With ``exclude`` (not None) each pick is ``select_excluding(exclude, key)``.
    The compiled core loops in C, calling the cpdef methods through ``Selector``
    (as the compiled data path does). TypeError unless ``selector`` is a
    ``Selector`` or ``n`` an integer; ValueError when ``n`` is negative.
    """

def hash64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` with ``seed`` (modulo 2**64): an int in [0, 2**64). TypeError unless bytes."""

def hash_key(head: bytes, kind: str, name: "bytes | str" = b"") -> bytes:
    """The bytes to hash, taken from a raw request head; b"" when absent.

    ``kind``: "path" (the target's path, no query; ``name`` ignored), "query"
    (raw value of the first query parameter ``name``), "header" (first field
    ``name``, case-insensitive, OWS-trimmed), "cookie" (first cookie ``name``
    in the Cookie field(s)). ValueError for another kind or an empty ``name``;
    TypeError unless ``head`` is bytes.
    """

def field_value(head: bytes, name: "bytes | str") -> Optional[bytes]:
    """The value of the first field ``name`` (ASCII case-insensitive) of a
    raw request head, OWS-trimmed; None when it has no such field (or
    ``name`` is empty). Lines are read up to the blank line; a head is never
    validated here. TypeError unless ``head`` is bytes and ``name`` bytes or str.
    """

class ChunkedScanner:
    """Finds the end of a chunked body, strictly, across any split of the input.

    With ``decode`` set, chunk payloads are appended to ``payload`` as bytes
    (a list the caller empties) and trailers are dropped. ``exc`` (called with
    the message) is raised on any framing error: bad size, missing CRLF, bare
    LF, control bytes, overlong extensions or trailers. A chunk size may have
    leading zeros, up to ``MAX_CHUNK_SIZE_DIGITS`` (64) hex digits in all, and
    must be below 2**60.
    """

    decode: bool
    payload: list[bytes]

    def __init__(self, decode: bool = False, exc: Callable[[str], BaseException] = ...) -> None:
        """``exc`` defaults to ``fastlb.errors.BadRequest``."""

    @property
    def done(self) -> bool:
        """Whether the whole body, trailers included, has been seen."""

    def scan(self, data: _Buffer, start: int = 0) -> int:
        """Consume ``data[start:]``; the index just past the body's end, or -1 if not there yet.

        Once done, returns ``start`` without looking at ``data``. ValueError
        when ``start`` is negative.
        """

class RequestHead:
    """A validated request head, as ``parse_request_head`` returns it (the constructor raises TypeError).

    Compiled code can ``from fastlb._core cimport RequestHead`` (``_core.pxd``)
    and read ``flags``, ``framing``, ``length`` and ``key`` as C fields.
    """

    method: bytes
    """The request method, as sent (case-sensitive)."""
    target: bytes
    """The request target, as sent."""
    version: bytes
    """b"HTTP/1.1" or b"HTTP/1.0"."""
    host: Optional[bytes]
    """The validated authority the request is for: an absolute-form target's (RFC 9112 3.2.2:
    it overrides Host), else the Host field's; b"" for an empty Host; None for an HTTP/1.0
    request with neither. Sent upstream as Host and X-Forwarded-Host."""
    path: bytes
    """The target in origin form: the target itself unless absolute, else what follows the
    authority ("/" prepended when that is empty or starts with "?" or "#")."""
    flags: int
    """An OR of ``REQ_*``; ``REQ_UPGRADE`` for an HTTP/1.1 request without a body that has a
    non-empty Upgrade field and the "upgrade" option in Connection (RFC 9110 7.8)."""
    framing: int
    """``BODY_NONE``, ``BODY_LENGTH`` or ``BODY_CHUNKED``."""
    length: int
    """The body's length for ``BODY_LENGTH``, else 0."""
    key: bytes
    """The hash key asked of ``parse_request_head``; b"" when absent or when none was asked."""
    forwarded_for: bytes
    """The values of the X-Forwarded-For fields, in order, joined by ", " (empty ones left
    out); b"" when none. Built when read."""
    request_id: Optional[bytes]
    """The request's id once ``assign_request_id`` gave it one, else None."""

def parse_request_head(head: _Buffer, key_kind: int = 0, key_name: bytes = b"") -> RequestHead:
    """Validate a request head strictly and return a ``RequestHead``.

    Checks the request line (method token, target bytes, HTTP/1.0 or 1.1), the
    target's form (origin "/...", asterisk "*", or absolute "http(s)://authority..."
    with a valid, non-empty authority and no userinfo), every field line
    (syntax, no obs-fold, no control bytes), Host (required on HTTP/1.1, at
    most one, ``uri-host [":" port]`` with a port up to 65535), Content-Length
    and Transfer-Encoding. ``key_kind`` (``KEY_*`` of ``fastlb.errors``) and
    ``key_name`` choose the hash key put in ``key`` (the bytes ``hash_key``
    gives for the same head): ValueError for an unknown kind or an empty name
    where one is needed, TypeError for a name that is not bytes. Raises
    ``fastlb.errors.BadRequest`` (status 400, or 501 for an unsupported
    transfer coding). A compiled-core RequestHead that nobody holds any more
    may be refilled by the next call.
    """

def assign_request_id(parsed: RequestHead, request_id_header: bytes) -> bytes:
    """Give a parsed head its request id (``RequestHead.request_id``), and return it.

    The id is the client's when it sent exactly one field named
    ``request_id_header`` (compared case-insensitively) that goes to the
    backend (not named in Connection) with a value ``valid_request_id``
    accepts: that field stays in place. Otherwise it is a new one
    (``new_request_id``), which ``write_request_head`` writes as ``NAME: ID``
    after the client's fields, in place of every field of that name the
    client sent. A head that has an id keeps it. A name the parser handles
    itself (Host, Connection, ...) is never the client's. Compiled callers
    that cimport it call it in C. TypeError unless ``parsed`` is a
    RequestHead of this core and the name non-empty bytes.
    """

def write_request_head(
    parsed: RequestHead,
    client_ip: bytes,
    proto: bytes = b"http",
    via: Optional[bytes] = b"fastlb",
    backend_authority: Optional[bytes] = b"",
    trusted: bool = False,
) -> bytes:
    """The head to send upstream for ``parsed``, as HTTP/1.1, written into one buffer.

    The request line with the target in origin form; the fields in order
    without the hop-by-hop ones and those named in Connection (``Trailer``
    only kept with a chunked body; Upgrade kept on a ``REQ_UPGRADE``
    request), ``Host`` set to ``parsed.host`` (added if the client sent none
    but an absolute-form target), ``backend_authority`` as Host for an
    HTTP/1.0 request with no authority at all; then ``Connection: upgrade``
    for a ``REQ_UPGRADE`` request, ``Transfer-Encoding: chunked`` for a
    chunked body, ``X-Forwarded-For``, ``X-Forwarded-Proto``,
    ``X-Forwarded-Host`` (``parsed.host`` when not empty) and ``Via`` unless
    ``via`` is None or empty. A new request id (``assign_request_id``)
    follows the client's fields.

    ``trusted`` says whether the client at ``client_ip`` is a trusted proxy.
    Not trusted: its X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and
    Forwarded fields are dropped, and X-Forwarded-For is ``client_ip`` alone.
    Trusted: X-Forwarded-For is its values with ``client_ip`` appended, and
    its X-Forwarded-Proto, X-Forwarded-Host and Forwarded fields are kept in
    place (fastlb adds its own X-Forwarded-Proto / X-Forwarded-Host only when
    it sent none). TypeError unless ``parsed`` is a RequestHead of this core.
    """

def rewrite_response_head(head: bytes, req_flags: int, start: int = 0, end: int = -1,
                          tail_max: int = 0) -> "tuple[bytes, int, int, int, int]":
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    ``req_flags`` are the flags of the request answered (``REQ_HEAD``,
    ``REQ_HTTP10``, ``REQ_KEEP_ALIVE``, ``REQ_UPGRADE``). ``out`` is the head
    sent to the client as HTTP/1.1; ``flags`` is an OR of ``RESP_*``;
    ``framing`` is one of ``BODY_NONE``, ``BODY_LENGTH``, ``BODY_CHUNKED``,
    ``BODY_CLOSE``. A 101 is valid only for a ``REQ_UPGRADE`` request and
    with a non-empty Upgrade field: it gets ``RESP_UPGRADE`` (and no other
    flag), ``BODY_NONE``, and goes out with its Upgrade fields and
    ``Connection: upgrade``. Raises ``fastlb.errors.BadGateway``.

    The head is ``head[start:end]`` (``end`` -1: to the end; ValueError
    unless ``0 <= start <= end <= len(head)``). With ``tail_max`` > 0, a
    ``BODY_LENGTH`` response whose whole body is ``head[end:]``, at most
    ``tail_max`` bytes, gets it appended to ``out``.
    """

def rewrite_response_head_with_id(head: bytes, req_flags: int, request_id_header: Optional[bytes],
                                  request_id: Optional[bytes], start: int = 0, end: int = -1,
                                  tail_max: int = 0) -> "tuple[bytes, int, int, int, int]":
    """``rewrite_response_head``, and a final response (not 1xx; a 101 is final) that goes to
    the client without a field named ``request_id_header`` (case-insensitively) gets
    ``NAME: ID`` after its own fields. None or b"" for either: no id. Both are written as
    they are. ``start``, ``end`` and ``tail_max`` as for ``rewrite_response_head``. Compiled
    callers that cimport it call it in C."""

def add_request_id(msg: bytes, request_id_header: Optional[bytes],
                   request_id: Optional[bytes]) -> bytes:
    """``msg`` (a message fastlb wrote: start line, ``Name: value`` lines, CRLF CRLF, maybe a
    body) with ``NAME: ID`` as the last field of its head, unless the head has a field of
    that name (case-insensitively). None or b"" for either: ``msg`` as it is. ValueError
    without CRLF CRLF. Compiled callers that cimport it call it in C."""

def new_request_id() -> bytes:
    """A new request id: 36 bytes shaped as a version-4 UUID
    (``xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx``, lowercase). The first three groups are this
    process's (60 bits from the OS, drawn again in a forked child); the last two a 62-bit
    counter, started at a random value, through a keyed permutation (its key drawn from the
    OS too): no repeat within 2**62 ids of a process, and without the key an id does not
    give the counter back. Compiled callers that cimport it call it in C."""

def seed_request_ids(process: int, counter: int, key: int) -> None:
    """Set the draws ``new_request_id`` starts from: the process's part (low 64 bits, the
    version nibble set to 4), the counter (low 62 bits; the next id uses counter + 1) and
    the permutation's key (low 256 bits)."""

def valid_request_id(value: bytes) -> bool:
    """Whether a client's id is kept: 1 to 200 bytes, each a letter, a digit or one of
    ``-_.:@+/=``."""

def find_head_end(data: bytes, start: int = 0) -> int:
    """Index just past the first CRLF CRLF at or after ``start``, or -1 if there is none yet.

    Raises TypeError unless ``data`` is bytes, ValueError for a negative ``start``.
    """

def read_buffer(n: int) -> bytearray:
    """A new writable buffer of ``n`` bytes for a transport to read into; its
    bytes are unspecified (the compiled core does not clear them)."""

def buffer_bytes(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` in one copy. Raises TypeError unless ``buf``
    is a bytearray, ValueError unless ``0 <= start <= end <= len(buf)``."""

def parse_proxy_header(
        data: bytes) -> Optional[tuple[int, Optional[tuple[str, int, str, int]]]]:
    """The PROXY protocol header (HAProxy's spec, version 1 or 2) at the start of ``data``.

    None while more bytes are needed (``data`` is a valid start so far);
    ``(end, addrs)`` once it is complete, ``data[end:]`` being the stream
    after it; ``addrs`` is ``(src_ip, src_port, dst_ip, dst_port)``, or None
    for version 1 ``UNKNOWN``, version 2 ``LOCAL`` and version 2 families
    other than TCP over IPv4/IPv6 (the connection's own addresses apply).
    Raises ``fastlb.errors.ProxyHeaderError`` (``reason``) as soon as the
    bytes cannot start a valid header, TypeError unless ``data`` is bytes.
    """

def access_log_line(fmt: int, head: Optional[bytes], client: bytes, stamp: bytes, status: int,
                    sent: int, backend: Optional[bytes], upstream: float, total: float,
                    rid: Optional[bytes] = None) -> bytes:
    """One access log line (``fmt`` 0: combined, 1: JSON, 2: combined then the request id),
    as bytes ending in LF. ``rid``: the request's id (None: the head's X-Request-Id, if any;
    ``combined`` shows none).

    ``head``: the request head as received, or the part received (None:
    nothing to show); ``stamp`` is written as given; ``upstream`` (negative:
    no backend answered) and ``total`` are seconds, written as milliseconds
    with 3 decimals. Client-controlled fields are escaped as nginx's
    escape=default (``"``, ``\\``, controls and bytes >= 0x7F as ``\\xHH``);
    JSON lines are valid JSON for any input. Full description:
    ``fastlb._core_py.access_log_line``. Raises TypeError for a non-bytes
    ``head``/``client``/``stamp``/``backend``, ValueError for another ``fmt``.
    """

def monotonic_us() -> int:
    """The monotonic clock (``time.monotonic``'s, CLOCK_MONOTONIC) in whole microseconds.

    Compiled callers that cimport it read it without a Python call (the
    data path times responses with it)."""

class AccessLogBuffer:
    """A batch of access log lines, each written straight into the batch (no object per line)."""

    fmt: int        # 0: combined, 1: JSON, 2: combined with the request id (read-only)
    limit: int      # batch size in bytes at which ``add`` returns True (read-only)
    stamp: bytes    # the time field of the next lines, set by the caller

    def __init__(self, fmt: int = 0, limit: int = 65536) -> None: ...
    def __len__(self) -> int: ...
    def add(self, head: Optional[bytes], client: bytes, status: int, sent: int,
            backend: Optional[bytes], upstream: float, total: float) -> bool:
        """Append ``access_log_line(self.fmt, head, client, self.stamp, ...)``; True once
        the batch holds ``limit`` bytes or more."""
    def add_id(self, head: Optional[bytes], client: bytes, status: int, sent: int,
               backend: Optional[bytes], upstream: float, total: float, rid: bytes) -> bool:
        """``add`` with the request's id ``rid`` (not the head's X-Request-Id) in the line."""
    def take(self) -> bytes:
        """The lines added since the last ``take`` (the batch is emptied)."""
