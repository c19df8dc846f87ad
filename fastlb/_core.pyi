"""Stubs of the compiled core ``fastlb._core`` (twin of ``fastlb._core_py``)."""
from typing import Callable, Optional, Union

_Buffer = Union[bytes, bytearray, memoryview]

__all__ = [
    "RoundRobin",
    "ChunkedScanner",
    "rewrite_request_head",
    "rewrite_response_head",
]

class RoundRobin:
    """Round robin over ``len(weights)`` backends; a weight of 0 is never picked.

    ``seed`` sets the first backend tried (``seed % n``), so runs repeat.
    """

    n: int
    """Number of backends (read-only)."""

    def __init__(self, weights: "list[float] | tuple[float, ...]", seed: int = 0) -> None:
        """Raise ValueError when ``weights`` is empty."""

    def select(self, key: bytes = b"") -> int:
        """Next eligible backend with a weight above 0, or -1 when there is none."""

    def release(self, idx: int) -> None:
        """End of a request on backend ``idx`` (no-op for round robin)."""

    def set_eligible(self, idx: int, ok: object) -> None:
        """Mark backend ``idx`` eligible or not; IndexError when out of range."""

    def is_eligible(self, idx: int) -> bool:
        """Whether backend ``idx`` is eligible; IndexError when out of range."""

class ChunkedScanner:
    """Finds the end of a chunked body, strictly, across any split of the input.

    With ``decode`` set, chunk payloads are appended to ``payload`` as bytes
    (a list the caller empties) and trailers are dropped. ``exc`` (called with
    the message) is raised on any framing error: bad size, missing CRLF, bare
    LF, control bytes, overlong extensions or trailers.
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

def rewrite_request_head(
    head: bytes,
    client_ip: bytes,
    proto: bytes = b"http",
    via: Optional[bytes] = b"fastlb",
    host_default: Optional[bytes] = b"",
) -> "tuple[bytes, int, int, int]":
    """Validate a request head and return ``(out, flags, framing, length)``.

    ``out`` is the head sent upstream as HTTP/1.1 (hop-by-hop fields and the
    fields named in Connection removed, X-Forwarded-For appended to,
    X-Forwarded-Proto/Host replaced, Via added unless ``via`` is None or
    empty, Host from ``host_default`` for HTTP/1.0 requests without one).
    ``flags`` is an OR of ``REQ_*``, ``framing`` one of ``BODY_NONE``,
    ``BODY_LENGTH`` (``length`` bytes) or ``BODY_CHUNKED``. Raises
    ``fastlb.errors.BadRequest`` (status 400, or 501 for an unsupported
    transfer coding).
    """

def rewrite_response_head(head: bytes, req_flags: int) -> "tuple[bytes, int, int, int, int]":
    """Validate a response head and return ``(out, status, flags, framing, length)``.

    ``req_flags`` are the flags of the request answered (``REQ_HEAD``,
    ``REQ_HTTP10``, ``REQ_KEEP_ALIVE``). ``out`` is the head sent to the
    client as HTTP/1.1; ``flags`` is an OR of ``RESP_*``; ``framing`` is one
    of ``BODY_NONE``, ``BODY_LENGTH``, ``BODY_CHUNKED``, ``BODY_CLOSE``.
    Raises ``fastlb.errors.BadGateway``.
    """

def find_head_end(data: bytes, start: int = 0) -> int:
    """Index just past the first CRLF CRLF at or after ``start``, or -1 if there is none yet.

    Raises TypeError unless ``data`` is bytes, ValueError for a negative ``start``.
    """
