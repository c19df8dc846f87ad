"""Access log lines: access_log_line and AccessLogBuffer; monotonic_us.

The pure twin of ``logline.pxi``, part of the pure-Python core (``fastlb._core_py``).
"""
from operator import index as _index
import re as _re
import time as _time


def monotonic_us():
    """The monotonic clock (``time.monotonic``'s) in whole microseconds."""
    return _time.monotonic_ns() // 1000


# ---------------------------------------------------------------- access log

LOG_COMBINED = 0
LOG_JSON = 1
LOG_COMBINED_ID = 2     # combined, then the request id
_LOG_MAX_SECONDS = 1e9      # longer durations (or NaN, or negative) are clamped

# nginx's escape=default: '"', '\\', control bytes and bytes >= 0x7F as \xHH
_LOG_ESC = _re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')


def _esc(m):
    return b"\\x%02X" % m.group()[0]


def _esc_json(m):
    # the same text inside a JSON string, where its backslash is written \\
    return b"\\\\x%02X" % m.group()[0]


def _ms(seconds):
    if not seconds >= 0.0:
        seconds = 0.0
    elif seconds > _LOG_MAX_SECONDS:
        seconds = _LOG_MAX_SECONDS
    us = int(seconds * 1e6 + 0.5)
    return b"%d.%03d" % (us // 1000, us % 1000)


# a field line, from the LF before it (a literal first byte: the search skips fast)
_LOG_COMBINED_FIELDS = _re.compile(rb"\n(referer|user-agent):([^\n]*)", _re.I)
_LOG_JSON_FIELDS = _re.compile(rb"\n(x-request-id):([^\n]*)", _re.I)
_LOG_NO_FIELDS = _re.compile(rb"(?!)")      # matches nothing
_LOG_ALL_FIELDS = _re.compile(rb"\n(referer|user-agent|x-request-id):([^\n]*)", _re.I)


def _log_parts(head, fields, found):
    """The request line of ``head``; fills ``found`` (lowercase names: None)
    with the first value of each header ``fields`` (a regex) matches.

    The request line ends at the first LF (a CR before it is dropped); with no
    LF, it is all of ``head`` (a line cut short). Header lines follow, up to
    an empty line or the end of ``head``; a value loses one CR at the end of
    its line, then SP and HTAB on both sides.
    """
    lf = head.find(b"\n")
    if lf < 0:
        return head
    line = head[:lf - 1] if lf and head[lf - 1] == 13 else head[:lf]
    # the field lines end before the first empty line ("\n" or "\r\n" after an LF)
    end = len(head)
    for sep in (b"\n\n", b"\n\r\n"):
        i = head.find(sep, lf)
        if 0 <= i < end:
            end = i
    for m in fields.finditer(head, lf, end):
        name = m.group(1).lower()
        if found[name] is None:
            v = m.group(2)
            if v.endswith(b"\r"):
                v = v[:-1]
            found[name] = v.strip(b" \t")
    return line


def access_log_line(fmt, head, client, stamp, status, sent, backend, upstream, total, rid=None):
    r"""One access log line, as bytes ending in LF.

    ``fmt``: LOG_COMBINED (0), LOG_JSON (1) or LOG_COMBINED_ID (2). ``head``: the request head as
    received (or the part of it received; None: nothing to show). ``client``:
    the client address; ``stamp``: the time, written as given (the caller
    formats it for ``fmt``); ``status``, ``sent`` (bytes sent to the client):
    ints; ``backend``: bytes or None; ``upstream`` (request sent upstream to
    response head; negative: no backend answered) and ``total``: seconds,
    written as milliseconds with 3 decimals (clamped to 0..1e9 s); ``rid``:
    the request's id (bytes), or None: the head's X-Request-Id field if any.

    Every field from the client (request line, its parts, Referer,
    User-Agent, X-Request-Id, the address) is escaped as nginx's
    escape=default: '"', '\', control bytes and bytes >= 0x7F become \xHH
    (uppercase hex). In JSON the same text is a JSON string (its backslashes
    written \\), so ``json.loads`` returns exactly the combined field's text
    and every line is valid JSON whatever the input bytes.

    Combined: nginx's combined with fastlb's bytes_sent (the head included),
    then the backend, the total and the upstream time::

        CLIENT - - [STAMP] "REQUEST LINE" STATUS BYTES "REFERER" "USER-AGENT" BACKEND TOTALms UPSTREAMms

    ("-" for a missing request line, Referer, User-Agent, backend or upstream
    time). LOG_COMBINED_ID: the same, then a space and the request id in
    double quotes (``"-"`` when there is none). JSON, keys always in this order::

        {"time":..,"client":..,"method":..,"target":..,"version":..,"status":..,
         "bytes_sent":..,"backend":..,"upstream_ms":..,"total_ms":..,"request_id":..}

    (null for a missing part, backend, upstream time or request id). The
    method is the request line up to its first SP, the version what follows
    its last SP, the target what lies between (no SP: all of it is the
    method; one SP: no version).
    """
    if fmt != LOG_COMBINED and fmt != LOG_JSON and fmt != LOG_COMBINED_ID:
        raise ValueError("fmt must be LOG_COMBINED (0), LOG_JSON (1) or LOG_COMBINED_ID (2)")
    for what, v, opt in (("head", head, True), ("client", client, False),
                         ("stamp", stamp, False), ("backend", backend, True),
                         ("rid", rid, True)):
        if not (type(v) is bytes or (opt and v is None)):
            raise TypeError(f"{what} must be bytes")
    status = _index(status)
    sent = _index(sent)
    upstream = float(upstream)
    total = float(total)
    sub = _LOG_ESC.sub
    if fmt != LOG_JSON:
        if head is None:
            line = b"-"
            ref = ua = b"-"
        else:
            found = {b"referer": None, b"user-agent": None, b"x-request-id": None}
            fields = _LOG_ALL_FIELDS if fmt == LOG_COMBINED_ID and rid is None \
                else _LOG_COMBINED_FIELDS
            line = sub(_esc, _log_parts(head, fields, found))
            ref = found[b"referer"]
            ua = found[b"user-agent"]
            ref = b"-" if ref is None else sub(_esc, ref)
            ua = b"-" if ua is None else sub(_esc, ua)
            if rid is None:
                rid = found[b"x-request-id"]
        out = b'%s - - [%s] "%s" %d %d "%s" "%s" %s %sms %s' % (
            sub(_esc, client), stamp, line, status, sent, ref, ua,
            b"-" if backend is None else backend, _ms(total),
            _ms(upstream) + b"ms" if upstream >= 0.0 else b"-")
        if fmt == LOG_COMBINED:
            return out + b"\n"
        return out + b' "%s"\n' % (b"-" if rid is None else sub(_esc, rid))

    def q(v):
        return b"null" if v is None else b'"' + sub(_esc_json, v) + b'"'

    method = target = version = None
    if head is not None:
        found = {b"x-request-id": None}
        line = _log_parts(head, _LOG_JSON_FIELDS if rid is None else _LOG_NO_FIELDS, found)
        if rid is None:
            rid = found[b"x-request-id"]
        sp1 = line.find(b" ")
        if sp1 < 0:
            method = line
        else:
            method = line[:sp1]
            sp2 = line.rfind(b" ")
            if sp2 == sp1:
                target = line[sp1 + 1:]
            else:
                target = line[sp1 + 1:sp2]
                version = line[sp2 + 1:]
    return (b'{"time":"%s","client":%s,"method":%s,"target":%s,"version":%s,"status":%d,'
            b'"bytes_sent":%d,"backend":%s,"upstream_ms":%s,"total_ms":%s,"request_id":%s}\n' % (
                stamp, q(client), q(method), q(target), q(version), status, sent,
                b"null" if backend is None else b'"' + backend + b'"',
                _ms(upstream) if upstream >= 0.0 else b"null", _ms(total), q(rid)))


class AccessLogBuffer:
    """A batch of access log lines (the data path's form of ``access_log_line``).

    ``fmt``: LOG_COMBINED, LOG_JSON or LOG_COMBINED_ID; ``stamp``: the time field of the next
    lines (bytes, set by the caller as the clock moves); ``limit``: the batch
    size, in bytes, at which ``add`` says it is time to ``take``.
    """

    __slots__ = ("fmt", "limit", "stamp", "_buf")

    def __init__(self, fmt=LOG_COMBINED, limit=65536):
        if fmt != LOG_COMBINED and fmt != LOG_JSON and fmt != LOG_COMBINED_ID:
            raise ValueError("fmt must be LOG_COMBINED (0), LOG_JSON (1) or LOG_COMBINED_ID (2)")
        limit = _index(limit)
        if limit < 0:
            raise ValueError("limit must not be negative")
        self.fmt = fmt
        self.limit = limit
        self.stamp = b""
        self._buf = bytearray()

    def __len__(self):
        return len(self._buf)

    def add(self, head, client, status, sent, backend, upstream, total):
        """Append the line of ``access_log_line(self.fmt, head, client, self.stamp, ...)``.
        Returns True once the batch holds ``limit`` bytes or more (time to ``take``)."""
        buf = self._buf
        buf += access_log_line(self.fmt, head, client, self.stamp, status, sent, backend,
                               upstream, total)
        return len(buf) >= self.limit

    def add_id(self, head, client, status, sent, backend, upstream, total, rid):
        """``add`` with the request's id ``rid`` (bytes) as the line's request id."""
        if type(rid) is not bytes:
            raise TypeError("rid must be bytes")
        buf = self._buf
        buf += access_log_line(self.fmt, head, client, self.stamp, status, sent, backend,
                               upstream, total, rid)
        return len(buf) >= self.limit

    def take(self):
        """The lines added since the last ``take``, as one bytes object; the batch is emptied."""
        out = bytes(self._buf)
        self._buf = bytearray()
        return out
