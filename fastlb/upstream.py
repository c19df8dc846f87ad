"""Backends, their pools of idle keep-alive connections, and the upstream protocol.

An ``UpstreamProtocol`` is one TCP connection to one backend. It is either
idle in its backend's pool (``client is None``: any byte or EOF it receives
closes it) or bound to one client connection while exactly one request is in
flight on it. The response head is validated and rewritten by the core; the
body bytes are relayed as they arrive, and parsed only to find where the
response ends (Content-Length counted, chunked scanned, or the backend
closing). When the response ends the connection goes back to the pool if
both sides allow it, else it is closed.

States of a bound connection::

    U_HEAD --head complete--> U_BODY --body complete--> (released)
      |  1xx heads loop in U_HEAD                ^
      +--------- no body (HEAD, 204, 304, CL 0) -+
"""
import asyncio

from fastlb import core
from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    RESP_CLIENT_KEEP_ALIVE,
    RESP_DECHUNK,
    RESP_INFORMATIONAL,
    RESP_UPSTREAM_KEEP_ALIVE,
    REQ_HTTP10,
    REQ_KEEP_ALIVE,
    BadGateway,
)

U_IDLE = 0   # in the pool
U_HEAD = 1   # waiting for (the rest of) a response head
U_BODY = 2   # relaying the body
U_DONE = 3   # closed or released

R_DONE = 2   # fastlb.proxy.R_DONE: the client's request was sent whole

_rewrite_response_head = core.rewrite_response_head
_ChunkedScanner = core.ChunkedScanner


class Backend:
    """One backend server: its address and its pool of idle connections."""

    __slots__ = ("index", "url", "host", "port", "authority", "idle", "max_idle",
                 "connecting", "active", "requests", "failures")

    def __init__(self, index, host, port, max_idle=64):
        self.index = index
        self.host = host
        self.port = port
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"http://{netloc}"
        self.authority = netloc.encode("ascii")
        self.idle = []          # LIFO of idle UpstreamProtocol; the oldest first
        self.max_idle = max_idle
        self.connecting = 0
        self.active = 0         # connections bound to a client now
        self.requests = 0
        self.failures = 0

    def pop_idle(self):
        idle = self.idle
        while idle:
            up = idle.pop()
            if up.state == U_IDLE:
                return up
        return None

    def push_idle(self, up, now):
        if len(self.idle) >= self.max_idle:
            up.close()
            return
        up.state = U_IDLE
        up.idle_since = now
        self.idle.append(up)

    def sweep_idle(self, cutoff):
        """Close pooled connections idle since before ``cutoff``."""
        idle = self.idle
        n = 0
        while n < len(idle) and idle[n].idle_since < cutoff:
            n += 1
        if n:
            old = idle[:n]
            del idle[:n]
            for up in old:
                up.close()

    def close_idle(self):
        idle, self.idle = self.idle, []
        for up in idle:
            up.close()

    def __repr__(self):
        return f"<Backend {self.url}>"


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = (
        "backend", "proxy", "transport", "client", "state", "buf", "framing",
        "left", "scanner", "resp_flags", "status", "reused", "got_bytes",
        "idle_since", "paused", "max_head",
    )

    def __init__(self, backend, proxy):
        self.backend = backend
        self.proxy = proxy
        self.transport = None
        self.client = None      # the ClientProtocol this connection serves now
        self.state = U_DONE
        self.buf = b""          # partial response head
        self.framing = 0
        self.left = 0           # Content-Length bytes still to relay
        self.scanner = None     # ChunkedScanner of a chunked response
        self.resp_flags = 0
        self.status = 0
        self.reused = False     # came from the pool (may have gone stale)
        self.got_bytes = False  # any byte of the response arrived
        self.idle_since = 0.0
        self.paused = False
        self.max_head = proxy.max_header_size

    # -------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        state = self.state
        self.state = U_DONE
        client = self.client
        if client is None:
            return  # idle in the pool: pop_idle skips it
        self.client = None
        self.backend.active -= 1
        if state == U_BODY and self.framing == BODY_CLOSE:
            client.response_done(False, self.status)
        elif not self.got_bytes:
            client.upstream_failed(self, "closed before responding")
        else:
            client.response_aborted(self, "backend closed mid-response")

    def eof_received(self):
        return False

    def pause_writing(self):
        client = self.client
        if client is not None:
            client.pause_reading_for(1)

    def resume_writing(self):
        client = self.client
        if client is not None:
            client.resume_reading_for(1)

    def data_received(self, data):
        client = self.client
        if client is None:
            # Idle connections must stay silent: bytes now are a protocol error.
            self.close()
            return
        self.got_bytes = True
        client.deadline = self.proxy.now + self.proxy.response_timeout
        if self.state == U_BODY:
            self._body(data, 0, client, None)
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > self.max_head:
                    self._bad(client, "response head too large")
                    return
                self.buf = data[pos:]
                return
            end += 4
            if end - pos > self.max_head:
                self._bad(client, "response head too large")
                return
            req_flags = client.req_flags
            if client.state != R_DONE or client.eof:
                # The client connection closes after this response: say so.
                req_flags &= ~REQ_KEEP_ALIVE
            try:
                out, status, flags, framing, length = _rewrite_response_head(
                    data[pos:end] if pos or end != len(data) else data, req_flags)
            except BadGateway as e:
                self._bad(client, e.reason)
                return
            if flags & RESP_INFORMATIONAL:
                # 1xx: relay (never to HTTP/1.0 clients, RFC 9110 15.2),
                # then wait for the final response.
                if not req_flags & REQ_HTTP10:
                    client.write_response(out)
                pos = end
                continue
            self.status = status
            self.resp_flags = flags
            self.framing = framing
            self.state = U_BODY
            if framing == BODY_LENGTH:
                if len(data) - end == length:
                    # The common case: the whole response in one read.
                    client.write_response2(out, data[end:])
                    self._finish(client)
                    return
                self.left = length
            elif framing == BODY_CHUNKED:
                self.scanner = _ChunkedScanner(bool(flags & RESP_DECHUNK), BadGateway)
            elif framing != BODY_CLOSE:
                # no body: the message ends with its head
                if end != len(data):
                    self._bad(client, "data after a response without body")
                    return
                client.write_response(out)
                self._finish(client)
                return
            self._body(data, end, client, out)
            return

    # -------------------------------------------------------- body relay

    def _body(self, data, start, client, head):
        framing = self.framing
        n = len(data)
        if framing == BODY_LENGTH:
            left = self.left
            avail = n - start
            if avail < left:
                self.left = left - avail
                piece = data if start == 0 else data[start:]
                done = False
            else:
                if avail > left:
                    self._bad(client, "response longer than its Content-Length")
                    return
                piece = data if start == 0 else data[start:]
                self.left = 0
                done = True
        elif framing == BODY_CHUNKED:
            scanner = self.scanner
            try:
                end = scanner.scan(data, start)
            except BadGateway as e:
                self._bad(client, e.reason)
                return
            if end >= 0 and end != n:
                self._bad(client, "data after the end of a chunked response")
                return
            done = end >= 0
            if scanner.decode:
                piece = b"".join(scanner.payload)
                scanner.payload.clear()
            else:
                piece = data if start == 0 else data[start:]
        else:  # BODY_CLOSE: everything until EOF
            piece = data if start == 0 else data[start:]
            done = False
        if head is not None:
            if piece:
                client.write_response2(head, piece)
            else:
                client.write_response(head)
        elif piece:
            client.write_response(piece)
        if done:
            self._finish(client)

    def _finish(self, client):
        """The response is complete: release this connection and the client."""
        self.client = None
        self.scanner = None
        backend = self.backend
        backend.active -= 1
        flags = self.resp_flags
        if flags & RESP_UPSTREAM_KEEP_ALIVE and client.state == R_DONE:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.reused = True
            idle = backend.idle
            if len(idle) < backend.max_idle:
                self.state = U_IDLE
                self.idle_since = self.proxy.now
                idle.append(self)
            else:
                self.close()
        else:
            self.close()
        client.response_done(bool(flags & RESP_CLIENT_KEEP_ALIVE), self.status)

    def _bad(self, client, reason):
        """The backend sent something invalid: 502 if nothing reached the client yet."""
        self.client = None
        self.backend.active -= 1
        self.state = U_DONE
        self.close()
        client.response_aborted(self, reason, invalid=True)

    # -------------------------------------------------------- control

    def bind(self, client):
        self.client = client
        self.state = U_HEAD
        self.got_bytes = False
        self.buf = b""
        self.backend.active += 1
        self.backend.requests += 1

    def pause_reading(self):
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self):
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self):
        self.state = U_DONE
        t = self.transport
        if t is not None:
            t.close()

    def abort(self):
        """Drop the connection at once (its state is unknown)."""
        self.state = U_DONE
        self.client = None
        t = self.transport
        if t is not None:
            t.abort()
