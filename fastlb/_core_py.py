"""Pure-Python core: the reference the compiled ``_core.pyx`` must match.

Everything here is per-request, CPU-only and I/O-free:

* the backend selectors ``RoundRobin``, ``WeightedRoundRobin``,
  ``LeastConn``, ``P2C``, ``Random`` and ``Maglev``. Selectors work on
  integer indices (0..n-1), weights, an eligibility mask and in-flight
  counts; they never see Backend objects. Every selector has the same
  surface: ``select(key=b"") -> int`` (-1 when no backend is eligible;
  Maglev: -2 for an empty key), ``select_excluding(exclude, key=b"")`` (the
  same pick among the backends not in ``exclude``: what retries use),
  ``release(idx)``, ``set_eligible(idx, ok)``,
  ``is_eligible(idx)``, ``set_weight(idx, w)``, ``in_flight(idx)`` and
  ``n`` (see ``fastlb.balance.selectors``), all subclasses of ``Selector``.
  Walks over ineligible backends are bounded by ``n`` (Maglev: by its table
  size). ``pick_many`` runs n picks (select + release) in a row.
* ``hash64`` (XXH64) and ``hash_key`` (the bytes of a request to hash);
  ``field_value``: one field of a request head (what Python hooks ask for).
* ``parse_request_head``: validates a raw request head strictly (the Host
  authority and the target's form included) and returns a ``RequestHead``:
  method, target, version, host, path, framing, and the hash key if asked;
  ``write_request_head`` writes the head sent upstream for the chosen
  backend (hop-by-hop fields removed, X-Forwarded-*, Via, Host). The caller
  selects a backend between the two, so invalid requests never reach the
  selector.
* ``rewrite_response_head``: the same for a backend's response head.
* ``parse_proxy_header``: the PROXY protocol header (v1 or v2) a connection
  starts with, read strictly (``fastlb.errors.ProxyHeaderError``).
* ``assign_request_id``: a parsed head's request id
  (``RequestHead.request_id``: the client's, kept, or a new one written for
  the backend); ``rewrite_response_head_with_id``: a response head with it;
  ``add_request_id``: the id added to a head fastlb wrote.
* ``ChunkedScanner``: finds where a chunked body ends, strictly, and can
  de-chunk it for HTTP/1.0 clients.
* ``access_log_line``: one access log line (combined or JSON), escaped;
  ``AccessLogBuffer``: a batch of them, the form the data path uses;
  ``monotonic_us``: the monotonic clock in whole microseconds (response times).
* ``new_request_id``: a request id (UUID-shaped, unique per process by
  construction); ``valid_request_id``: whether a client's is kept;
  ``seed_request_ids``: the per-process draws they come from.

Invalid client input raises ``BadRequest`` (``.status`` says 400 or 501);
invalid backend input raises ``BadGateway``. Both twins raise the same
exception for the same input.

The code lives in ``fastlb.wire``, ``fastlb.balance`` and ``fastlb.observe``,
one module beside each ``.pxi`` file that ``_core.pyx`` includes; this module
re-exports their public names.
"""
from fastlb.balance.hashing import hash64
from fastlb.balance.hashkeys import field_value, hash_key
from fastlb.balance.selectors import (
    P2C,
    LeastConn,
    Maglev,
    Random,
    RoundRobin,
    Selector,
    WeightedRoundRobin,
    pick_many,
)
from fastlb.observe.logline import AccessLogBuffer, access_log_line, monotonic_us
from fastlb.wire.chunked import ChunkedScanner
from fastlb.wire.framing import buffer_bytes, find_head_end, read_buffer
from fastlb.wire.proxyproto import parse_proxy_header
from fastlb.wire.request import (RequestHead, assign_request_id, parse_request_head,
                                 write_request_head)
from fastlb.wire.requestid import (add_request_id, new_request_id, seed_request_ids,
                                   valid_request_id)
from fastlb.wire.response import rewrite_response_head, rewrite_response_head_with_id

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
    "assign_request_id",
    "write_request_head",
    "rewrite_response_head",
    "rewrite_response_head_with_id",
    "find_head_end",
    "read_buffer",
    "buffer_bytes",
    "parse_proxy_header",
    "pick_many",
    "access_log_line",
    "AccessLogBuffer",
    "monotonic_us",
    "new_request_id",
    "add_request_id",
    "seed_request_ids",
    "valid_request_id",
]
