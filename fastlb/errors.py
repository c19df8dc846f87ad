"""Exceptions and constants shared by the compiled core and its pure-Python twin."""


class FastLBError(Exception):
    """Base class of every fastlb error."""


class ConfigError(FastLBError):
    """A bad command-line flag or configuration value; the message names it."""


class HTTPError(FastLBError):
    """A message fastlb refuses. ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, reason, status=None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class BadRequest(HTTPError):
    """A malformed or ambiguous request from a client (400, or 431/501 where said)."""

    status = 400


class BadGateway(HTTPError):
    """A malformed or unexpected response from a backend (502)."""

    status = 502


# Body framing, returned by the head rewriters.
BODY_NONE = 0      # no body
BODY_LENGTH = 1    # Content-Length bytes follow
BODY_CHUNKED = 2   # chunked transfer coding
BODY_CLOSE = 3     # response delimited by the backend closing its connection

# Request flags (parse_request_head).
REQ_KEEP_ALIVE = 1        # the client wants the connection kept open
REQ_HEAD = 2              # method is HEAD: the response has no body
REQ_IDEMPOTENT = 4        # GET, HEAD, PUT, DELETE, OPTIONS, TRACE
REQ_EXPECT_CONTINUE = 8   # Expect: 100-continue (forwarded to the backend)
REQ_HTTP10 = 16           # the client spoke HTTP/1.0

# Where parse_request_head takes the hash key from (``key_kind``).
KEY_NONE = 0     # no key: RequestHead.key is b""
KEY_PATH = 1     # the path of the target, without query or fragment
KEY_QUERY = 2    # the raw value of the first query parameter ``key_name``
KEY_HEADER = 3   # the value of the first field ``key_name`` (ASCII case-insensitive)
KEY_COOKIE = 4   # the value of the first cookie ``key_name``
KEY_KINDS = {"path": KEY_PATH, "query": KEY_QUERY, "header": KEY_HEADER, "cookie": KEY_COOKIE}

# Response flags (rewrite_response_head).
RESP_UPSTREAM_KEEP_ALIVE = 1  # the backend connection may go back to the pool
RESP_CLIENT_KEEP_ALIVE = 2    # the client connection stays open after this response
RESP_INFORMATIONAL = 4        # a 1xx interim response: a final one follows
RESP_DECHUNK = 8              # chunked from the backend, sent de-chunked (HTTP/1.0 client)

# A chunk size may have at most this many hex digits, leading zeros included
# (and at most 15 without them: a chunk below 2**60 bytes).
MAX_CHUNK_SIZE_DIGITS = 20

# Largest Content-Length accepted (2**62: no overflow anywhere, far beyond any real body).
MAX_CONTENT_LENGTH = 1 << 62
