"""Exceptions and constants shared by the compiled core and its pure-Python twin."""


class FastLBError(Exception):
    """Base class of every fastlb error."""


class ConfigIssue:
    """One problem with the configuration: where it is and what is wrong.

    ``str()`` gives ``FILE:LINE: PATH: MESSAGE`` (``FILE:LINE:COLUMN:`` for a
    TOML syntax error), leaving out the parts that are None: a flag's issue is
    ``--retries: must be at least 0, got -1``. ``path`` is the dotted path of
    the key in the file (``listeners.web.routes[1].pool``, indexes from 0) or
    the flag's name; ``severity`` is ``"error"`` or ``"warning"`` (a warning's
    message starts with ``warning:``).
    """

    __slots__ = ("message", "path", "file", "line", "column", "severity")

    def __init__(self, message, path=None, file=None, line=None, column=None,
                 severity="error"):
        self.message = message
        self.path = path
        self.file = file
        self.line = line
        self.column = column
        self.severity = severity

    def __str__(self):
        out = []
        if self.file is not None:
            out.append(self.file)
            if self.line is not None:
                out.append(f":{self.line}")
                if self.column is not None:
                    out.append(f":{self.column}")
            out.append(": ")
        if self.path:
            out.append(f"{self.path}: ")
        if self.severity == "warning":
            out.append("warning: ")
        out.append(self.message)
        return "".join(out)

    def __repr__(self):
        return f"ConfigIssue({str(self)!r})"

    def __eq__(self, other):
        if not isinstance(other, ConfigIssue):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    __hash__ = None


class ConfigError(FastLBError):
    """A bad command-line flag or configuration value; the message names it.

    ``errors`` is the list of every problem found (``ConfigIssue``; a loaded
    file reports them all at once); ``str()`` is one line per problem.
    ``ConfigError("message")`` is a single problem with no place.
    """

    def __init__(self, message=None, errors=()):
        errors = list(errors)
        if not errors:
            errors.append(ConfigIssue(str(message)))
        if message is None:
            message = "\n".join(str(e) for e in errors)
        super().__init__(message)
        self.errors = errors


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


class ProxyHeaderError(FastLBError, ValueError):
    """Bytes that are not a valid PROXY protocol header (``parse_proxy_header``);
    ``reason`` says why. The connection is closed without an answer."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# PROXY protocol headers (parse_proxy_header): a version 1 line is at most
# this many bytes, its CRLF included (the spec's bound); a version 2 header at
# most this many in all (HAProxy's buffer).
PROXY_V1_MAX = 107
PROXY_V2_MAX = 16384


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
REQ_UPGRADE = 32          # an HTTP/1.1 request without a body asking to switch protocols
                          # (Upgrade and Connection: upgrade): both are forwarded

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
RESP_UPGRADE = 16             # 101 Switching Protocols to a REQ_UPGRADE request: a tunnel follows

# A chunk size may have at most this many hex digits, leading zeros included
# (and at most 15 without them: a chunk below 2**60 bytes).
MAX_CHUNK_SIZE_DIGITS = 20

# Largest Content-Length accepted (2**62: no overflow anywhere, far beyond any real body).
MAX_CONTENT_LENGTH = 1 << 62


class _HookFailed:
    """What ``fastlb.hooks`` gives the data path when a Python hook failed
    (it is logged): the client gets 500."""

    __slots__ = ()

    def __repr__(self):
        return "HOOK_FAILED"


HOOK_FAILED = _HookFailed()
SELECT_FAILED = -3      # the same, from pick_backend (which returns a backend's index)
