# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled per-request core; ``_core_py.py`` is the reference it must match.

Same public names, signatures, return values and exceptions (class, status
and message) as the pure-Python twin. Heads are parsed in C over the bytes
buffer: one validating pass records every field line (offsets, kind) in a C
array, a second pass applies the semantics in field order (so syntax errors
anywhere win over semantic ones, as in the twin), and the output is written
once into a pre-sized bytes object, copying runs of untouched lines with a
single memcpy. A request head is parsed into a ``RequestHead`` that keeps
the plan of its output (segments of the raw head); ``write_request_head``
follows the plan for the chosen backend.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytes cimport _PyBytes_Resize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_REFCNT, Py_XDECREF
from libc.stdlib cimport free, malloc, realloc
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove

from operator import index as _index

from fastlb import errors as _errors

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

_BadRequest = _errors.BadRequest
_BadGateway = _errors.BadGateway

# ---------------------------------------------------------------- constants

cdef enum:
    KEY_NONE = 0
    KEY_PATH = 1
    KEY_QUERY = 2
    KEY_HEADER = 3
    KEY_COOKIE = 4

    MAX_CHUNK_SIZE_DIGITS = 20

    PP_V1_MAX = 107     # PROXY protocol: a version 1 line, CRLF included, at most
    PP_V2_MAX = 16384   # ... a version 2 header at most

cdef enum:
    BODY_NONE = 0
    BODY_LENGTH = 1
    BODY_CHUNKED = 2
    BODY_CLOSE = 3

    REQ_KEEP_ALIVE = 1
    REQ_HEAD = 2
    REQ_IDEMPOTENT = 4
    REQ_EXPECT_CONTINUE = 8
    REQ_HTTP10 = 16
    REQ_UPGRADE = 32

    RESP_UPSTREAM_KEEP_ALIVE = 1
    RESP_CLIENT_KEEP_ALIVE = 2
    RESP_INFORMATIONAL = 4
    RESP_DECHUNK = 8
    RESP_UPGRADE = 16

cdef unsigned long long MAX_CONTENT_LENGTH = (<unsigned long long>1) << 62

# The enum above is a copy of errors.py: refuse to import if they ever drift.
for _name, _value in (
    ("BODY_NONE", BODY_NONE), ("BODY_LENGTH", BODY_LENGTH),
    ("BODY_CHUNKED", BODY_CHUNKED), ("BODY_CLOSE", BODY_CLOSE),
    ("REQ_KEEP_ALIVE", REQ_KEEP_ALIVE), ("REQ_HEAD", REQ_HEAD),
    ("REQ_IDEMPOTENT", REQ_IDEMPOTENT), ("REQ_EXPECT_CONTINUE", REQ_EXPECT_CONTINUE),
    ("REQ_HTTP10", REQ_HTTP10), ("REQ_UPGRADE", REQ_UPGRADE),
    ("RESP_UPSTREAM_KEEP_ALIVE", RESP_UPSTREAM_KEEP_ALIVE),
    ("RESP_CLIENT_KEEP_ALIVE", RESP_CLIENT_KEEP_ALIVE),
    ("RESP_INFORMATIONAL", RESP_INFORMATIONAL), ("RESP_DECHUNK", RESP_DECHUNK),
    ("RESP_UPGRADE", RESP_UPGRADE),
    ("MAX_CONTENT_LENGTH", MAX_CONTENT_LENGTH),
    ("KEY_NONE", KEY_NONE), ("KEY_PATH", KEY_PATH), ("KEY_QUERY", KEY_QUERY),
    ("KEY_HEADER", KEY_HEADER), ("KEY_COOKIE", KEY_COOKIE),
    ("MAX_CHUNK_SIZE_DIGITS", MAX_CHUNK_SIZE_DIGITS),
    ("PROXY_V1_MAX", PP_V1_MAX), ("PROXY_V2_MAX", PP_V2_MAX),
):
    if getattr(_errors, _name) != _value:
        raise ImportError(f"fastlb._core: {_name} differs from fastlb.errors")
del _name, _value

# Header kinds: the same numbers as _H_* of wire/characters.py.
cdef enum:
    H_OTHER = 0
    H_HOST = 1
    H_CONTENT_LENGTH = 2
    H_TRANSFER_ENCODING = 3
    H_CONNECTION = 4
    H_HOP = 5
    H_UPGRADE = 6
    H_XFF = 7
    H_XF_PROTO = 8
    H_EXPECT = 9
    H_TRAILER = 10
    H_XF_HOST = 11
    H_FORWARDED = 12

cdef enum:
    STACK_FIELDS = 64     # field lines parsed without a heap allocation
    MAX_DROP_TOKENS = 16  # Connection tokens kept in a C array; more: a Python set

# ---------------------------------------------------------------- the rooms
#
# The sections below live in their folders and are included here, in order: one
# extension module (fastlb._core), so cdef inline functions still inline across
# files. Each piece may use the C types, tables and functions of those above it.
# Its pure twin is the .py file of the same name beside it.

# wire/: the HTTP/1 wire format
include "wire/characters.pxi"   # byte tables: tokens, field values, targets, hex, reg-names, lowercase
include "wire/helpers.pxi"      # field lines in a C array: validate, classify, Connection, write
include "wire/authorities.pxi"  # the Host authority: IPv4, IPv6, IPvFuture, reg-name, port
include "wire/requestid.pxi"    # request ids: new_request_id, a client's id checked
include "wire/request.pxi"      # RequestHead, parse_request_head, write_request_head
include "wire/response.pxi"     # rewrite_response_head
include "wire/chunked.pxi"      # ChunkedScanner: where a chunked body ends; de-chunking
include "wire/framing.pxi"      # find_head_end, read_buffer, buffer_bytes
include "wire/proxyproto.pxi"   # parse_proxy_header: the PROXY protocol header a connection starts with

# balance/: choosing a backend
include "balance/hashing.pxi"    # XXH64: hash64
include "balance/hashkeys.pxi"   # hash_key: the path, query, header or cookie a request hashes on
include "balance/selectors.pxi"  # Selector and the six algorithms, pick_many

# observe/: what the proxy reports
include "observe/logline.pxi"    # access_log_line, AccessLogBuffer, monotonic_us
