# cython: infer_types=True
"""The data path: backends with their connection pools, and the two protocols.

This module is plain Python and is also compiled by Cython (``_proxy.pxd``
declares its classes as C types); ``fastlb.proxy`` chooses which one runs,
with the same switch as the core. Keep it valid Python with no Cython
syntax: the pure build runs this very file.

Client side: one ``ClientProtocol`` per client connection.

Rules this module keeps:

* Requests on a connection are handled one at a time, in order. Bytes that
  arrive after the end of the request in flight (pipelining) are kept, and
  reading pauses once they pass ``PIPELINE_LIMIT``; they are parsed when the
  response has been written. So responses always go out in request order.
* The httptools (llhttp) parser sees every byte of every request exactly
  once, in order, and is never fed past the end of the current request: it is
  the strict validator. fastlb finds the head's end (CRLF CRLF) and the
  body's end (Content-Length, or the chunked scanner) itself, and checks that
  llhttp agrees that the message ended there.
* The core validates the head (``parse_request_head``) before a backend is
  chosen, so an invalid request never moves the selector; then it writes
  the head for that backend (``write_request_head``); the body bytes are
  relayed untouched.
* Reading from the client is paused for any of several reasons (a bit each:
  the upstream's write buffer is full, pipelined bytes are waiting, the
  upstream connection is not up yet); it resumes when none is left.
* Timeouts are deadlines checked by the proxy's ticker against a clock it
  updates; the per-request path only stores a float.

Request states: R_HEAD (reading a head) -> R_BODY (relaying a body) ->
R_DONE (request complete, response in flight) -> R_HEAD again, or closed;
or R_DONE -> R_TUNNEL when a backend answers an upgrade request with 101.
A connection that must start with a PROXY protocol header starts in
R_PROXY, and goes to R_HEAD once the header is read.

Tunnels. An upgrade request (``REQ_UPGRADE``: HTTP/1.1, Upgrade and
``Connection: upgrade``, no body) goes to a backend as any request, with its
Upgrade field. Any answer but 101 is relayed as a response and the
connection stays HTTP (the bytes the client sent after the request are its
next request). A 101 is relayed, and from then on the two connections are a
byte tunnel (R_TUNNEL on the client, U_TUNNEL on the upstream): what one
side reads is written to the other, with the same
backpressure as bodies (the client's reading pauses for P_UPSTREAM while the
upstream's write buffer is full; the upstream's while the client's is); an
EOF from one side is passed on as ``write_eof`` on the other, which keeps
sending the other way, and the tunnel ends when both have sent EOF, either
closes, or nothing moved either way for the listener's ``tunnel_timeout``
(the client's ``deadline``, checked by the ticker). Its upstream connection
never goes back to the pool; it stays counted in the backend's ``active``
and in least-conn's in-flight count until the tunnel ends, and is logged
then (status 101, the bytes sent to the client). A drain leaves tunnels
open: they are closed when the drain timeout ends (or end by themselves).

Trusted proxies. Whether the client's peer address is in the listener's
``trusted_proxies`` is decided once, in ``connection_made`` (``trust``).
From anyone else the X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host
and Forwarded fields are replaced by fastlb's own; from a trusted proxy
X-Forwarded-For is extended, the others go on, and each request's client
address (``addr``: access log, hash key ``ip``) is the right-most address of
its X-Forwarded-For that is not a trusted proxy (``fastlb.wire.forwarded``).

TLS. Nothing here touches a socket: every byte goes through the transport
(``write``, ``writelines``, pause and resume), so a TLS listener's
connections (uvloop's SSL transport, made by ``fastlb.server.Listener``
once the handshake is done) and an https:// backend's (``_connect`` with
the Backend's ``tls`` context) run the same code as plain ones, with one
difference: TLS has no half-close. A TLS transport cannot ``write_eof``, and
after a peer's close_notify it writes nothing more, so an EOF from a TLS
peer (``transport.can_write_eof()`` is false) ends the connection: a client
with a request under way has left (499), a tunnel ends. The X-Forwarded-Proto
a request gets is its listener's (``Front.proto``).
PROXY protocol in. On a listener with ``proxy_protocol`` (``Front``), a
connection from a peer in ``proxy_protocol_from`` (every peer when it is
empty) starts in R_PROXY: its first bytes must be a PROXY protocol header
(``fastlb.wire.proxyproto``), due within the listener's header_timeout; a
connection from any other peer is plain HTTP from its first byte (a PROXY
line is then a bad request line: 400), as HAProxy's ``expect-proxy`` with
an ``if { src ... }``. The header's source address is this connection's
peer from then on (``client_ip``: X-Forwarded-For, the access log, hash key
``ip``, and the trusted-proxies decision, made only then), and the bytes
after it in the same read are the start of the first request. A header
that is invalid, too long, late or cut short closes the connection without
an answer; ``Proxy.proxy_header_error`` counts it (per listener) and logs
it, at most once per LOCAL_LOG_EVERY seconds. A connection that closes
before sending a byte is not counted (a TCP health check of the proxy in
front). Nothing of this runs on a listener without ``proxy_protocol``: its
connections start in R_HEAD as before, and no request pays for it.

PROXY protocol out. A pool with ``send_proxy_protocol`` (``Pool.send_proxy``:
version 1 or 2) starts every new connection to a backend with a header for
the client it is opened for (its ``pp_addrs``: the client's address and the
one it connected to, from its own PROXY header or its socket). Such a
connection is ``private``: it never goes to the backend's shared pool
(``max_idle`` is 0 for those pools), since the backend takes the header's
address for every request on it. Between two requests of its client it is
kept by that client (``ClientProtocol.kept``, ``UpstreamProtocol.owner``),
and the client's next request to the same backend reuses it, as HAProxy
keeps the server connections of ``send-proxy`` private to their session;
one to another backend closes it. It closes with its client.

Request ids. When the listener's ``request_id`` names a field (else it is
None and nothing of this runs), the core gives each parsed request its id
(``assign_request_id``: the client's valid one, or a new one it writes into
the head for the backend); ``rid`` keeps it for the exchange: the final
response head gets it unless the backend sent one
(``rewrite_response_head_with_id``), fastlb's own answers get it
(``_with_id``, ``add_request_id``; a request refused before its head was
parsed gets a new one), and so does its access-log line (``_log_id``). It
is cleared when the next exchange starts (``_next_request``).

Upstream side:

An ``UpstreamProtocol`` is one TCP connection to one backend. It is either
idle in its backend's pool (``client is None``: any byte or EOF it receives
closes it) or bound to one client connection while exactly one request is in
flight on it. The response head is validated and rewritten by the core; the
body bytes are relayed as they arrive, and parsed only to find where the
response ends (Content-Length counted, chunked scanned, or the backend
closing). When the response ends the connection goes back to the pool if
both sides allow it, else it is closed.

Reading. ``UpstreamProtocol`` is a buffered protocol (``get_buffer`` /
``buffer_updated``): uvloop reads a backend's bytes straight into the
proxy's read buffer (``Proxy.rbuf``, READ_SIZE bytes, one for all
connections: a read is used up before the next one starts), TLS backends'
too (uvloop's TLS transport decrypts into it). Body bytes and tunnel bytes
go to the client as views of that buffer, never copied. A view the client's
transport did not send at once stays in that transport (its write buffer is
not empty after the write, ``_sent``): the buffer is that transport's then,
and the next read goes into a new one (not cleared: ``read_buffer``), so no
byte a client has yet to receive is ever overwritten. A head is read from
bytes (the core parses bytes): a read of at most HEAD_PROBE bytes is copied
whole, as uvloop's own reading did; of a longer one only its first
HEAD_PROBE bytes (the whole read when the head goes on past them), and the
body after the head stays in the buffer.

Counters: each Backend and each Front has a row of traffic counters in the
proxy's shared-memory table (``fastlb.runtime.shm``; ``ctr``, a view of this
process's slot), bumped in place with plain C increments where the traffic
is seen: B_* per backend (requests sent, every try; responses received by
class; bytes; connect errors; tries retried elsewhere; failures; requests
bound now; the response-time histogram, timed with the core's C clock
``monotonic_us`` from the send to the final head) and L_* per listener (connections accepted and open; requests
started; responses written by class, fastlb's own included; bytes).
``Backend.requests``, ``failures`` and ``active`` read that row. A response
is counted where its final head is written, so one cut short after its
head still counts, and one found invalid before it is only the 502.

States of a bound connection::

    U_HEAD --head complete--> U_BODY --body complete--> (released)
      |  1xx heads loop in U_HEAD                ^
      +--------- no body (HEAD, 204, 304, CL 0) -+
      +--------- 101 to an upgrade request --> U_TUNNEL --tunnel ends--> closed
"""
import array
import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
import struct
import time

import httptools

from fastlb import core
from fastlb.core import buffer_bytes as _buffer_bytes
from fastlb.core import find_head_end as _find_head_end
from fastlb.core import read_buffer as _read_buffer
from fastlb.core import parse_request_head as _parse_request_head
from fastlb.core import rewrite_response_head as _rewrite_response_head
from fastlb.core import write_request_head as _write_request_head
from fastlb.core import (add_request_id, assign_request_id, monotonic_us, new_request_id,
                         rewrite_response_head_with_id)
from fastlb.observe.accesslog import AccessLog
from fastlb.runtime import shm
from fastlb.runtime.shm import (
    B_1XX,
    B_ACTIVE,
    B_BYTES_IN,
    B_BYTES_OUT,
    B_CONNECT_ERRORS,
    B_FAILURES,
    B_LAT,
    B_LAT_SUM_US,
    B_REQUESTS,
    B_RETRIES,
    L_1XX,
    L_ACTIVE,
    L_BYTES_IN,
    L_BYTES_OUT,
    L_CONNECTIONS,
    L_PROXY_ERRORS,
    L_REQUESTS,
    L_TUNNEL_BYTES_IN,
    L_TUNNEL_BYTES_OUT,
    L_TUNNELS,
    L_TUNNELS_TOTAL,
    LAT_BOUNDS,
    NB,
    NL,
)
from fastlb.runtime.tls import SHUTDOWN_TIMEOUT as TLS_SHUTDOWN
from fastlb.runtime.tls import describe_error as _tls_reason
from fastlb.selection import HASHED, BalancerSet, make_balancer
from fastlb.wire import proxyproto
from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    HOOK_FAILED,
    KEY_KINDS,
    REQ_HTTP10,
    REQ_IDEMPOTENT,
    REQ_KEEP_ALIVE,
    REQ_UPGRADE,
    RESP_CLIENT_KEEP_ALIVE,
    RESP_DECHUNK,
    RESP_INFORMATIONAL,
    RESP_UPGRADE,
    RESP_UPSTREAM_KEEP_ALIVE,
    SELECT_FAILED,
    BadGateway,
    BadRequest,
    HTTPError,
    ProxyHeaderError as _ProxyHeaderError,
)

log = logging.getLogger("fastlb")

_ChunkedScanner = core.ChunkedScanner
_pp_parse = core.parse_proxy_header
_pp_header = proxyproto.proxy_header
_clock = time.monotonic    # access log timings (the ticker's clock is too coarse)
# SO_LINGER on, with a zero timeout: close() resets the connection and the
# kernel drops what it still holds for the peer (nginx's reset_timedout_connection)
_LINGER_RESET = struct.pack("ii", 1, 0)
# the response-time histogram's bounds (fastlb.runtime.shm), in microseconds
_LAT_US = array.array("q", [round(b * 1e6) for b in LAT_BOUNDS])
N_LAT = len(LAT_BOUNDS)

U_IDLE = 0   # in the pool
U_HEAD = 1   # waiting for (the rest of) a response head
U_BODY = 2   # relaying the body
U_DONE = 3   # closed or released
U_TUNNEL = 4  # a tunnel's backend side (after a 101)


class Backend:
    """One backend server of a pool: its address and its idle connections.

    A backend is identified by its pool and its address (``host:port``),
    never by its position: a reload that keeps it (same pool, same address)
    keeps this very object, with its pooled connections and counters, and
    only ``index`` (its position in the pool's selector) may change."""

    def __init__(self, index, host, port, max_idle=64, tls=None, server_name=None):
        self.index = index
        self.host = host
        self.port = port
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.address = netloc
        self.url = f"{'http' if tls is None else 'https'}://{netloc}"
        self.authority = netloc.encode("ascii")
        # https://: the pool's client context (ssl.SSLContext) and the name its
        # certificate is checked against (and sent as SNI); None: plain TCP
        self.tls = tls
        self.server_name = server_name
        self.tls_logged = -LOCAL_LOG_EVERY  # when a TLS failure with it was last logged
        self.pool = None        # the Pool it serves in (the last one, once retired)
        self.retired = False    # removed by a reload: finishing its requests
        self.idle = []          # LIFO of idle UpstreamProtocol; the oldest first
        self.max_idle = max_idle
        self.connecting = 0
        self.fail_streak = 0    # consecutive failures on real traffic
        # its counters: a row of the proxy's table (set by fastlb.runtime.build),
        # or, until then, one of its own, so that traffic never finds none
        self.row = -1
        self.ctr = _own_row(NB)

    @property
    def active(self):
        """Requests bound to one of its connections now."""
        return self.ctr[B_ACTIVE]

    @property
    def requests(self):
        """Requests sent to it (every try)."""
        return self.ctr[B_REQUESTS]

    @property
    def failures(self):
        """Failures blamed on it (``Proxy.note_failure``)."""
        return self.ctr[B_FAILURES]

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
        return f"<Backend {self.pool.name if self.pool is not None else '?'}/{self.address}>"


class Pool:
    """Backends that serve alike, their selector, and the upstream settings.

    Built from a ``PoolConfig`` by ``fastlb.runtime.build``; a reload builds a
    new Pool (reusing the Backend objects it keeps), and requests in flight
    finish on the Pool they started on."""

    def __init__(self, name):
        self.name = name
        self.backends = []
        self.balancer = None
        self.fallback = None
        self.balancers = None
        self.weights = []
        self.hash_kind = 0      # 0: no key, 1: client address, 2: RequestHead.key
        self.hash_what = 0      # KEY_*: where parse_request_head finds the key
        self.hash_name = b""
        self.connect_timeout = 5.0
        self.response_timeout = 60.0
        self.max_tries = 3
        self.retry_timeout = 10.0
        self.max_interim = 10
        self.send_proxy = 0     # PROXY protocol version sent to the backends (0: none)
        self.idle_timeout = 60.0
        self.health = None      # fastlb.health.HealthChecker, when checks are on
        self.eject_5xx = False
        self.tls_context = None  # ssl.SSLContext of its https:// backends (None: it has none)
        self.config = None      # the PoolConfig it was built from
        self.retired = False    # replaced by a reload

    def __repr__(self):
        return f"<Pool {self.name}: {len(self.backends)} backends>"


class Front:
    """One listener's client-side settings and routes, read on every request.

    Clients keep their Front for life; a reload updates it in place, so the
    next request on a kept connection already uses the new routes."""

    def __init__(self, name):
        self.name = name
        self.header_timeout = 10.0
        self.keepalive_timeout = 75.0
        self.max_header_size = 65536
        self.body_timeout = 60.0
        self.body_rate_inv = 0.0
        self.upgrade = True     # upgrade requests may become tunnels (False: 501)
        self.tunnel_timeout = 3600.0
        self.trusted = None     # fastlb.wire.forwarded.TrustedProxies, or None: trust nobody
        self.tls = None         # fastlb.runtime.tls.ServerTLS of a TLS listener, or None
        self.proto = b"http"    # X-Forwarded-Proto of its requests (b"https" with TLS)
        self.proxy_protocol = False  # connections start with a PROXY protocol header ...
        self.pp_from = None     # ... those from these networks (TrustedProxies); None: all
        self.request_id = None  # the request-id field's name (bytes), or None: no request ids
        self.pool = None        # the pool of requests that match no route (None: 404)
        self.router = None      # fastlb.runtime.routing.Router, or None: no routes
        self.hash_what = 0      # the hash key parse_request_head extracts
        self.hash_name = b""
        self.draining = False   # removed by a reload, or stopping
        self.listener = None    # fastlb.server.Listener
        self.config = None      # the ListenerConfig it was built from
        self.row = -1           # its counters: as Backend's
        self.ctr = _own_row(NL)


def _own_row(n):
    """A row of ``n`` counters (zeros) outside any table, for a Backend or
    Front not placed in one yet: traffic never finds it without counters."""
    return array.array("Q", bytes(8 * n))


class UpstreamProtocol:

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
        self.interim = 0        # 1xx responses relayed for this request
        self.idle_since = 0.0
        self.paused = False
        self.eof = False        # a tunnel's backend side sent EOF
        self.flush_by = 0.0     # a tunnel's end: aborted if still flushing by then (0: not)
        self.private = False    # began with a client's PROXY header: that client's alone
        self.owner = None       # idle and private: the ClientProtocol that keeps it
        self.write = None       # transport.write, bound once
        self.backed_up = False  # the client's transport kept a view of the read buffer

    # -------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.write = transport.write
        self.proxy.upstreams += 1

    def connection_lost(self, exc):
        proxy = self.proxy
        proxy.upstreams -= 1
        if self.flush_by != 0.0:
            proxy.flushing.discard(self)
        state = self.state
        self.state = U_DONE
        client = self.client
        if client is None:
            if state == U_IDLE:
                self._unpool()  # closed while pooled: leave room for a live one
            return
        self.client = None
        self.backend.ctr[B_ACTIVE] -= 1
        if state == U_TUNNEL:
            client.tunnel_lost(self)
        elif state == U_BODY and self.framing == BODY_CLOSE and exc is None:
            client.response_done(False, self.status)
        elif not self.got_bytes:
            client.upstream_failed(self, "closed before responding")
        else:
            client.response_aborted(self, "backend closed mid-response")

    def eof_received(self):
        client = self.client
        if client is None:
            # a pooled connection the backend closed: out of the pool now, not
            # at connection_lost (a request in this same loop turn would take it)
            self.drop_idle()
            return False
        if self.state == U_TUNNEL:
            # the backend is done sending: so is the client side, and the
            # tunnel still carries the client's bytes until it says so too
            self.eof = True
            t = client.transport
            if client.eof or not t.can_write_eof() or not self.transport.can_write_eof():
                # (over TLS, on either side, an EOF ends the connection: no half-close)
                client.end_tunnel()
                return False
            t.write_eof()
            return True
        return False

    def pause_writing(self):
        client = self.client
        if client is not None:
            client.pause_reading_for(P_UPSTREAM)
            if self.state != U_TUNNEL:
                # the backend owes progress now: judged by the response timeout
                client.deadline = self.proxy.now + client.pool.response_timeout

    def resume_writing(self):
        client = self.client
        if client is not None:
            client.resume_reading_for(P_UPSTREAM)

    def get_buffer(self, sizehint):
        """The buffer the next read goes into: the proxy's (see ``Proxy.rbuf``)."""
        proxy = self.proxy
        buf = proxy.rbuf
        if buf is None:
            buf = proxy.rbuf = _read_buffer(READ_SIZE)
            proxy.rview = memoryview(buf)
            proxy.read_buffers += 1
        return buf

    def buffer_updated(self, nbytes):
        """``nbytes`` bytes were read into ``proxy.rbuf``."""
        self.backend.ctr[B_BYTES_IN] += nbytes
        client = self.client
        if client is None:
            # Idle connections must stay silent: bytes now are a protocol
            # error. Out of the pool at once, and dropped.
            self.drop_idle()
            return
        self.got_bytes = True
        proxy = self.proxy
        if self.state == U_BODY:
            client.deadline = proxy.now + client.pool.response_timeout
            self._body(proxy.rview[:nbytes], 0, client, None)
            return
        if self.state == U_TUNNEL:
            client.deadline = proxy.now + client.front.tunnel_timeout
            client.front.ctr[L_TUNNEL_BYTES_OUT] += nbytes
            piece = self._view(client, proxy.rview[:nbytes])
            client.write_response(piece)
            if type(piece) is not bytes:
                self._sent(client)
            return
        # A head: the core reads it from bytes. A read that brings more than
        # HEAD_PROBE bytes gives only its first HEAD_PROBE as bytes (the head
        # is in them as a rule): the body after the head goes on from the
        # buffer, uncopied.
        if self.buf:
            data = self.buf + _buffer_bytes(proxy.rbuf, 0, nbytes)
            self.buf = b""
            self._heads(data, len(data), client)
        elif nbytes <= HEAD_PROBE:
            self._heads(_buffer_bytes(proxy.rbuf, 0, nbytes), nbytes, client)
        else:
            self._heads(_buffer_bytes(proxy.rbuf, 0, HEAD_PROBE), nbytes, client)

    def data_received(self, data):
        """Bytes from a transport that does not read into buffers (a stand-in
        transport in tests and benchmarks): through ``buffer_updated``, a
        buffer at a time."""
        view = memoryview(data)
        n = len(view)
        i = 0
        while i < n and self.state != U_DONE:
            buf = self.get_buffer(n - i)
            k = min(len(buf), n - i)
            buf[:k] = view[i:i + k]
            i += k
            self.buffer_updated(k)

    def _heads(self, data, total, client):
        """The read (``total`` bytes, all of them in ``data`` or only its
        first HEAD_PROBE, the rest in ``proxy.rbuf``) starts with a head."""
        proxy = self.proxy
        pos = 0
        while True:
            end = _find_head_end(data, pos)
            if end < 0:
                if len(data) < total:
                    # past the probe: the whole read as bytes, then again
                    data = _buffer_bytes(proxy.rbuf, 0, total)
                    continue
                if len(data) - pos > client.front.max_header_size:
                    self._bad(client, "response head too large")
                    return
                self.buf = data[pos:]
                return
            if end - pos > client.front.max_header_size:
                self._bad(client, "response head too large")
                return
            req_flags = client.req_flags
            if client.state != R_DONE or (client.eof and not client.pending) \
                    or proxy.draining or client.front.draining:
                # The client connection closes after this response: say so.
                req_flags &= ~REQ_KEEP_ALIVE
            # the head is data[pos:end]; a whole small body after it is
            # written into ``out`` with it (tail_max), when the read is all in data
            tail_max = TAIL_COPY if len(data) == total else 0
            try:
                if client.rid is None:
                    out, status, flags, framing, length = _rewrite_response_head(
                        data, req_flags, pos, end, tail_max)
                else:   # request ids: a final response without one gets the request's
                    out, status, flags, framing, length = rewrite_response_head_with_id(
                        data, req_flags, client.front.request_id, client.rid, pos, end,
                        tail_max)
            except BadGateway as e:
                self._bad(client, e.reason)
                return
            if status < 600:    # 600-999 (invalid, but relayed): in no class
                self.backend.ctr[B_1XX - 1 + status // 100] += 1
            if flags & (RESP_INFORMATIONAL | RESP_UPGRADE):
                if flags & RESP_UPGRADE:
                    self._switch(client, out, data, end, total)
                    return
                # 1xx: relay (never to HTTP/1.0 clients, RFC 9110 15.2),
                # then wait for the final response. The response timeout
                # still runs from the end of the request: interim responses
                # do not extend it, and there are at most ``max_interim``.
                self.interim += 1
                if self.interim > client.pool.max_interim:
                    self._bad(client, "more than %d interim responses" % client.pool.max_interim)
                    return
                if not req_flags & REQ_HTTP10:
                    client.write(out)   # not counted in ``sent``: a 502 may still follow
                    client.front.ctr[L_1XX] += 1
                    client.front.ctr[L_BYTES_OUT] += len(out)
                pos = end
                continue
            # the response time: from the request sent to the end of this head
            us = monotonic_us() - client.t_sent
            k = 0
            while k < N_LAT and us > _LAT_US[k]:
                k += 1
            self.backend.ctr[B_LAT + k] += 1
            self.backend.ctr[B_LAT_SUM_US] += us
            self.status = status
            self.resp_flags = flags
            self.framing = framing
            self.state = U_BODY
            if proxy.log is not None:
                client.t_resp = -1.0    # the head is here: timed by the end if that is in this read
            client.deadline = proxy.now + client.pool.response_timeout
            if framing == BODY_LENGTH:
                if total - end == length:
                    # The common case: the whole response in one read (a
                    # small body is already in ``out``; a large one is passed
                    # on as a view: uvloop writes it from this very buffer)
                    if status < 600:
                        client.front.ctr[L_1XX - 1 + status // 100] += 1
                    if tail_max and length <= TAIL_COPY:
                        client.write_response(out)
                    elif len(data) == total:
                        client.write_response2(out, memoryview(data)[end:])
                    else:
                        rest = self._rest(client, end, total)
                        client.write_response2(out, rest)
                        if type(rest) is not bytes:
                            self._sent(client)
                    self._finish(client)
                    return
                self.left = length
            elif framing == BODY_CHUNKED:
                self.scanner = _ChunkedScanner(bool(flags & RESP_DECHUNK), BadGateway)
            elif framing != BODY_CLOSE:
                # no body: the message ends with its head
                if end != total:
                    self._bad(client, "data after a response without body")
                    return
                if status < 600:
                    client.front.ctr[L_1XX - 1 + status // 100] += 1
                client.write_response(out)
                self._finish(client)
                return
            if client.t_resp < 0.0:
                client.t_resp = _clock()
            if len(data) == total:
                self._body(data, end, client, out)
            else:
                self._body(proxy.rview[:total], end, client, out)
            return

    def _rest(self, client, start, total):
        """The read's bytes from ``start`` to ``total`` (in ``proxy.rbuf``):
        bytes when small, else a view of the buffer (``_view``)."""
        proxy = self.proxy
        if total - start <= TAIL_COPY:
            return _buffer_bytes(proxy.rbuf, start, total)
        return self._view(client, proxy.rview[start:total])

    def _view(self, client, view):
        """``view`` (of ``proxy.rbuf``) as it goes to the client: as it is,
        or copied when the client's transport is backed up and it is smaller
        than half the buffer. The transport keeps what it cannot send, and a
        view keeps the whole buffer: small reads to a client that does not
        read would each hold a buffer of READ_SIZE bytes."""
        if self.backed_up:
            if client.transport.get_write_buffer_size():
                if len(view) < READ_SIZE // 2:
                    return bytes(view)
                return view
            self.backed_up = False
        return view

    def _sent(self, client):
        """A view of ``proxy.rbuf`` went to the client's transport: if that
        did not send it all, it holds the view, and the next read goes into
        a new buffer (this one is freed when the transport lets it go)."""
        if client.transport.get_write_buffer_size():
            self.backed_up = True
            proxy = self.proxy
            proxy.rbuf = None
            proxy.rview = None

    def _switch(self, client, head, data, end, total):
        """A 101 answers the upgrade request: relay it, and from now on both
        connections are a tunnel (the bytes after the 101 are the new protocol).
        The 101 is the final response: it is timed and counted as one."""
        us = monotonic_us() - client.t_sent
        k = 0
        while k < N_LAT and us > _LAT_US[k]:
            k += 1
        self.backend.ctr[B_LAT + k] += 1
        self.backend.ctr[B_LAT_SUM_US] += us
        self.state = U_TUNNEL
        self.status = 101
        if self.proxy.log is not None:
            client.t_resp = _clock()
        client.front.ctr[L_1XX] += 1
        client.write_response(head)
        client.start_tunnel(self)
        if end != total and client.state == R_TUNNEL:
            if len(data) == total:
                rest = _tail(data, end)
            else:
                rest = self._rest(client, end, total)
            client.front.ctr[L_TUNNEL_BYTES_OUT] += len(rest)
            client.write_response(rest)
            if len(data) != total and type(rest) is not bytes:
                self._sent(client)

    def close_tunnel(self):
        """The tunnel is over on the client side: close once what is buffered
        for the backend is sent, but abort it if that takes longer than the
        response timeout (the ticker looks after ``flushing``)."""
        self.state = U_DONE
        self.client = None
        t = self.transport
        if t is None:
            return
        if t.get_write_buffer_size():
            proxy = self.proxy
            self.flush_by = proxy.now + proxy.response_timeout
            proxy.flushing.add(self)
        t.close()

    def half_close(self):
        """The client is done sending: so is this side (the backend may go on).
        False when this connection cannot half-close (TLS)."""
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()
            return True
        return False

    # -------------------------------------------------------- body relay

    def _body(self, data, start, client, head):
        """Body bytes: ``data[start:]``, of a read given as bytes or as a view
        of ``proxy.rbuf`` (``data`` is then that view, cut to the read)."""
        framing = self.framing
        n = len(data)
        if framing == BODY_LENGTH:
            left = self.left
            avail = n - start
            if avail < left:
                self.left = left - avail
                piece = data if start == 0 else _from(data, start)
                done = False
            else:
                if avail > left:
                    self._bad(client, "response longer than its Content-Length")
                    return
                piece = data if start == 0 else _from(data, start)
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
                piece = data if start == 0 else _from(data, start)
        else:  # BODY_CLOSE: everything until EOF
            piece = data if start == 0 else _from(data, start)
            done = False
        view = type(data) is not bytes and type(piece) is not bytes   # of proxy.rbuf
        if view:
            piece = self._view(client, piece)
            view = type(piece) is not bytes
        if head is not None:
            # the final head goes to the client now (nothing was wrong before it)
            if self.status < 600:
                client.front.ctr[L_1XX - 1 + self.status // 100] += 1
            if piece:
                client.write_response2(head, piece)
            else:
                client.write_response(head)
        elif piece:
            client.write_response(piece)
        if view:
            self._sent(client)
        if done:
            self._finish(client)

    def _finish(self, client):
        """The response is complete: release this connection and the client."""
        self.client = None
        self.scanner = None
        backend = self.backend
        backend.ctr[B_ACTIVE] -= 1
        flags = self.resp_flags
        if flags & RESP_UPSTREAM_KEEP_ALIVE and client.state == R_DONE:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.reused = True
            idle = backend.idle
            if len(idle) < backend.max_idle and not self.private:
                self.state = U_IDLE
                self.idle_since = self.proxy.now
                idle.append(self)
            elif self.private:
                # a client's own: kept for its next request (see the module)
                self.state = U_IDLE
                self.owner = client
                client.kept = self
            else:
                self.close()
        else:
            self.close()
        client.response_done(bool(flags & RESP_CLIENT_KEEP_ALIVE), self.status)

    def _bad(self, client, reason):
        """The backend sent something invalid: 502 if nothing reached the client yet."""
        self.client = None
        self.backend.ctr[B_ACTIVE] -= 1
        self.state = U_DONE
        self.close()
        client.response_aborted(self, reason, invalid=True)

    # -------------------------------------------------------- control

    def bind(self, client):
        self.client = client
        self.backed_up = False
        self.state = U_HEAD
        self.got_bytes = False
        self.interim = 0
        self.buf = b""
        self.backend.ctr[B_ACTIVE] += 1
        self.backend.ctr[B_REQUESTS] += 1

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

    def drop_idle(self):
        """A pooled connection that spoke out of turn: out of the pool, and aborted."""
        if self.state == U_IDLE:
            self._unpool()
        self.abort()

    def _unpool(self):
        """Out of the pool that holds it: its backend's, or its owner's."""
        owner = self.owner
        if owner is not None:
            self.owner = None
            if owner.kept is self:
                owner.kept = None
            return
        try:
            self.backend.idle.remove(self)
        except ValueError:
            pass

    def abort(self):
        """Drop the connection at once (its state is unknown)."""
        self.state = U_DONE
        self.client = None
        t = self.transport
        if t is not None:
            t.abort()


R_HEAD = 0
R_BODY = 1
R_DONE = 2
R_CLOSED = 3
R_TUNNEL = 4    # after a 101: bytes both ways, no HTTP
R_PROXY = 5     # waiting for the PROXY protocol header the connection starts with

# Reasons to pause reading from the client (bits).
P_UPSTREAM = 1      # the upstream transport's write buffer is full
P_PIPELINE = 2      # pipelined requests are waiting
P_CONNECTING = 4    # body bytes are queued until the upstream connects

PIPELINE_LIMIT = 65536
LINGER = 2.0        # seconds a lingering close reads and discards
DRAIN_FIRST_WAIT = 2.0  # draining: how long a connection not yet used may take to send its request
CONNECT_QUEUE_LIMIT = 262144
STALL = 1.0         # a tick this late means the event loop itself was stalled
FD_RESERVE = 16     # fds kept free for upstream connects, checks and logs
LOCAL_LOG_EVERY = 10.0  # seconds between two log lines about fastlb's own shortages

# connect() errors that are fastlb's own shortage, never the backend's fault
_LOCAL_ERRNOS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])

_SSLError = ssl.SSLError
_HttpRequestParser = httptools.HttpRequestParser
_HttpParserError = httptools.HttpParserError
_HttpParserUpgrade = httptools.HttpParserUpgrade

_REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    404: "Not Found",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


TAIL_COPY = 2048    # body bytes copied into a new object at most; larger: a memoryview
READ_SIZE = 65536   # bytes of a backend's a read takes at most (the read buffer's size)
HEAD_PROBE = 2048   # a longer read: only its first bytes as bytes, for the head in them


def _total(pieces):
    """Bytes in a list of byte strings (what a ``writelines`` sends)."""
    n = 0
    for piece in pieces:
        n += len(piece)
    return n


def _tail(data, start):
    """``data[start:]``, without copying when it is large: uvloop writes any
    buffer, and ``data`` (bytes) cannot change under it."""
    if len(data) - start <= TAIL_COPY:
        return data[start:]
    return memoryview(data)[start:]


def _from(data, start):
    """``data[start:]`` of bytes (``_tail``) or of a view of the read buffer
    (a view of it again)."""
    if type(data) is bytes:
        return _tail(data, start)
    return data[start:]


def error_response(status, keep_alive=False, extra=b""):
    reason = _REASONS[status]
    body = f"{status} {reason}\n".encode()
    conn = b"" if keep_alive else b"Connection: close\r\n"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n".encode() + conn + extra + b"\r\n" + body
    )


_ERRORS = {(s, ka): error_response(s, ka) for s in _REASONS for ka in (False, True)}
_ERRORS[(503, False)] = error_response(503, False, b"Retry-After: 1\r\n")
_ERRORS[(503, True)] = error_response(503, True, b"Retry-After: 1\r\n")


class ClientProtocol:

    def __init__(self, proxy, front=None):
        self.proxy = proxy
        self.front = front if front is not None else proxy.front
        self.pool = None        # the pool of the request in flight (chosen by its route)
        self.bidx = -1          # its backend's index in that pool's selector
        self.transport = None
        self.parser = _HttpRequestParser(self)
        self.feed = self.parser.feed_data
        self.write = None       # transport.write, bound once
        self.client_ip = b""    # the peer's address (the last of X-Forwarded-For)
        self.addr = b""         # the client's (the access log's, hash key ip's): the peer's,
                                # unless a trusted proxy says otherwise for this request
        self.trust = None       # the listener's TrustedProxies if the peer is one of them
        self.pp_addrs = None    # (src ip, src port, dst ip, dst port) of a PROXY header
        self.kept = None        # a private upstream connection kept between requests
        self.state = R_HEAD
        self.buf = b""          # the first piece of a head under way (b"": none)
        self.parts = None       # the pieces of a head under way, or None
        self.plen = 0           # their total length
        self.tail = b""         # the last 3 bytes of them (a CRLF CRLF may straddle)
        self.pending = b""      # bytes after the request in flight
        self.framing = BODY_NONE
        self.left = 0           # Content-Length bytes still to come
        self.scanner = None     # ChunkedScanner of a chunked request body
        self.ll_done = False    # llhttp reported the end of the message
        self.ll_skip = False    # llhttp does not see this body (see _body)
        self.req_flags = 0
        self.req_head = None    # the rewritten head, kept to retry a bodiless request
        self.view = None        # Python hooks: their view of the request being routed
        self.rid = None         # the request id of the exchange in flight (ids on), or None
        self.up = None          # UpstreamProtocol serving the request in flight
        self.backend = None
        self.outq = None        # bytes waiting for the upstream connection
        self.queued = 0         # body bytes of this request put in outq
        self.tried = None       # backends that failed this request
        self.retried = False
        self.paused = 0         # P_* bits
        self.wpaused = False
        self.wmark = 0          # client write buffer size when last seen paused
        self.deadline = 0.0
        self.sent = 0           # response bytes written to the client (this request)
        self.eof = False
        # access log (kept only when it is on): the exchange in flight, not logged yet
        self.log_head = None    # the request head as received so far; None: nothing to log
        self.started = 0.0      # _clock() at its first byte
        self.t_up = 0.0         # ... when the request was last sent upstream (0: never)
        self.t_resp = 0.0       # ... when the response head arrived (0: none; -1: at the end)
        self.t_sent = 0         # monotonic_us() when the request was last sent to a backend
        self.gen = 0            # request number: stale connect attempts check it
        self.holding = False    # this request counts against self.backend in the balancer
        self.held_by = None     # ... in that balancer (the main one or the hash fallback)
        self.tries = 0          # backends tried for this request
        self.t0 = 0.0           # when the request head arrived (ticker clock)
        self.body_end = 0.0     # the request body is due by then (ticker clock)

    # -------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.write = transport.write
        self.front.ctr[L_CONNECTIONS] += 1
        self.front.ctr[L_ACTIVE] += 1
        proxy = self.proxy
        clients = proxy.clients
        clients.add(self)
        if len(clients) + proxy.upstreams + proxy.connecting >= proxy.fd_budget:
            proxy.fd_pressure()
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0].encode("ascii")
        front = self.front
        self.deadline = proxy.now + front.header_timeout
        if front.proxy_protocol and (front.pp_from is None
                                     or front.pp_from.trusts(self.client_ip)):
            self.state = R_PROXY    # the peer is to be decided by its header
            return
        self.addr = self.client_ip
        trusted = front.trusted
        if trusted is not None and trusted.trusts(self.client_ip):
            self.trust = trusted

    def connection_lost(self, exc):
        self.front.ctr[L_ACTIVE] -= 1
        if self.state == R_TUNNEL:
            self._end_tunnel()
            self.proxy.clients.discard(self)
            return
        if self.log_head is not None:
            self._log_cut()     # the client went away mid-exchange
        self._release()
        self.state = R_CLOSED
        self.proxy.clients.discard(self)
        self._drop_upstream()

    def eof_received(self):
        # Keep the write side open while a request is in flight, then close.
        if self.state == R_HEAD and not self.buf:
            return False
        if self.state == R_PROXY:
            if self.buf:
                self.proxy.proxy_header_error(self, "closed before the end of its PROXY "
                                                    "protocol header")
            return False
        self.eof = True
        if not self.transport.can_write_eof():
            # TLS: the client's close_notify ends the whole connection (uvloop
            # shuts it down and writes nothing more): it left, as a client
            # that closes does
            if self.state == R_TUNNEL:
                self.end_tunnel()
                return False
            if self.log_head is not None:
                self._log_cut()
            self._close()       # (uvloop answers the close_notify)
            return False
        if self.state == R_TUNNEL:
            # done sending: so is the backend side; the other way stays open
            # (a backend over TLS cannot half-close: then the tunnel ends)
            if self.up.eof or not self.up.half_close():
                self.end_tunnel()
                return False
            return True
        if self.state != R_DONE:
            # The request can never be completed now.
            if self.log_head is not None:
                self._log_cut()
            self._close()
        return True

    def pause_writing(self):
        self.wpaused = True
        self.wmark = self.transport.get_write_buffer_size()
        up = self.up
        if up is not None:
            up.pause_reading()

    def resume_writing(self):
        self.wpaused = False
        # the client is reading again: that is progress for the response timeout
        pool = self.pool
        if self.state == R_TUNNEL:
            self.deadline = self.proxy.now + self.front.tunnel_timeout
        else:
            self.deadline = self.proxy.now + (pool.response_timeout if pool is not None
                                              else self.proxy.response_timeout)
        up = self.up
        if up is not None:
            up.resume_reading()

    def data_received(self, data):
        self.front.ctr[L_BYTES_IN] += len(data)
        state = self.state
        if state == R_HEAD:
            self._head(data)
        elif state == R_BODY:
            self._body(data, 0)
        elif state == R_DONE:
            self._stash(data)
        elif state == R_TUNNEL:
            proxy = self.proxy
            self.deadline = proxy.now + self.front.tunnel_timeout
            self.front.ctr[L_TUNNEL_BYTES_IN] += len(data)
            up = self.up
            up.backend.ctr[B_BYTES_OUT] += len(data)
            up.write(data)
        elif state == R_PROXY:
            self._proxy_header(data)

    # httptools callback: the only one defined, so the parser stays in C for
    # everything else.
    def on_message_complete(self):
        self.ll_done = True

    # -------------------------------------------------------- PROXY protocol

    def _proxy_header(self, data):
        """R_PROXY: the bytes of the PROXY protocol header (``buf`` holds
        those of earlier reads); the bytes after it start the HTTP stream."""
        buf = self.buf + data if self.buf else data
        try:
            got = _pp_parse(buf)
        except _ProxyHeaderError as e:
            self.proxy.proxy_header_error(self, e.reason)
            return
        if got is None:
            self.buf = buf      # incomplete (and bounded: the parser refuses more)
            return
        end, addrs = got
        self.buf = b""
        if addrs is not None:   # else LOCAL or UNKNOWN: the socket's peer it is
            self.pp_addrs = addrs
            self.client_ip = addrs[0].encode("ascii")
        self.addr = self.client_ip
        front = self.front
        trusted = front.trusted
        if trusted is not None and trusted.trusts(self.client_ip):
            self.trust = trusted
        self.state = R_HEAD
        if end < len(buf):
            self._head(buf[end:])

    def proxy_header(self, version):
        """The PROXY protocol header (``version`` 1 or 2) that starts a
        connection to a backend made for this client: its address and the
        one it connected to (from its own PROXY header, else its socket)."""
        addrs = self.pp_addrs
        if addrs is None:
            t = self.transport
            peer = t.get_extra_info("peername") if t is not None else None
            sock = t.get_extra_info("sockname") if t is not None else None
            if peer and sock:
                addrs = self.pp_addrs = (peer[0], peer[1], sock[0], sock[1])
        return _pp_header(version, addrs)

    # -------------------------------------------------------- request head

    def _head(self, data):
        proxy = self.proxy
        front = self.front
        parts = self.parts
        if parts is not None:
            # A head arriving in pieces: search only the new bytes (and the
            # three before them), and join the pieces once, at the end, so
            # the cost stays linear in the head's size however it is cut.
            probe = self.tail + data
            i = _find_head_end(probe)
            if i < 0:
                self.plen += len(data)
                if self.plen > front.max_header_size:
                    self._reject(431)
                    return
                parts.append(data)
                self.tail = probe[len(probe) - 3:] if len(probe) > 3 else probe
                try:
                    self.feed(data)
                except _HttpParserError:
                    self._reject(400)
                return
            fed = self.plen
            end = fed - len(self.tail) + i
            parts.append(data)
            whole = b"".join(parts)
            self.parts = None
            self.buf = b""
            if proxy.log is not None:
                self.log_head = whole
                self.t_up = _clock()    # the head is complete: it goes upstream now
        else:
            fed = 0
            whole = data
            c = data[0]
            if c == 13 or c == 10:
                # RFC 9112 2.2: ignore empty lines before a request line.
                stripped = data.lstrip(b"\r\n")
                try:
                    self.feed(data[:len(data) - len(stripped)])
                except _HttpParserError:
                    self._reject(400)
                    return
                whole = data = stripped
                if not data:
                    return
            # the first bytes of a request: an exchange starts (however it ends,
            # however its head is cut into reads: counted once, here)
            front.ctr[L_REQUESTS] += 1
            if proxy.log is not None:
                self.log_head = whole
                self.started = self.t_up = _clock()
                self.t_resp = 0.0
                self.backend = None
            end = _find_head_end(whole)
            if end < 0:
                if len(whole) > front.max_header_size:
                    self._reject(431)
                    return
                self.deadline = proxy.now + front.header_timeout
                self.buf = whole        # the first piece: a head is under way
                self.parts = [whole]
                self.plen = len(whole)
                self.tail = whole[len(whole) - 3:] if len(whole) > 3 else whole
                try:
                    self.feed(data)
                except _HttpParserError:
                    self._reject(400)
                return
        if end > front.max_header_size:
            self._reject(431)
            return
        if end == len(whole):
            head = whole
            rest = None
        else:
            head = whole[:end]
            rest = whole[end:]
        # llhttp validates exactly the bytes of this head that it has not seen.
        self.ll_done = False
        try:
            self.feed(head[fed:] if fed else head)
        except _HttpParserUpgrade:
            if self.parser.get_method() == b"CONNECT":
                self._reject(405)
                return
            # Upgrade is not supported yet: it is dropped as hop-by-hop and
            # the request goes on as a plain one (llhttp ended it at the head).
            self.ll_done = True
        except _HttpParserError:
            self._reject(400)
            return

        try:
            req = _parse_request_head(head, front.hash_what, front.hash_name)
        except HTTPError as e:
            self._reject(e.status)
            return
        if front.request_id is not None:
            self.rid = assign_request_id(req, front.request_id)
        framing = req.framing
        if framing == BODY_NONE and not self.ll_done:
            self._reject(400)
            return
        flags = req.flags
        if flags & REQ_UPGRADE and not front.upgrade:
            self._reject(501)       # --no-upgrade: refused, not downgraded
            return
        if self.trust is not None:
            # from a trusted proxy: the client is the one its X-Forwarded-For names
            self.addr = self.trust.client(req.forwarded_for, self.client_ip)
        # Only a valid request is routed and reaches the selector.
        strip = None
        if proxy.hooks is not None:
            # Python hooks (without them, each of their steps here is one test):
            # the pool a route hook chose (None: the routes decide)
            chosen = self._hook_pool(req, head)
            if chosen is HOOK_FAILED:
                self._reject(500)
                return
            pool = chosen
        if proxy.hooks is not None and pool is not None:
            if pool.hash_kind == 2 and (pool.hash_what != front.hash_what
                                        or pool.hash_name != front.hash_name):
                req = _parse_request_head(head, pool.hash_what, pool.hash_name)
                if front.request_id is not None:
                    self.rid = assign_request_id(req, front.request_id)
        elif front.router is None:
            pool = front.pool           # one pool, no routes: nothing to look up
        else:
            route = front.router.route(req, head)
            if route is None:
                self._reject(404)
                return
            pool = route.pool
            strip = route.strip
            if pool.hash_kind == 2 and (pool.hash_what != front.hash_what
                                        or pool.hash_name != front.hash_name):
                # this pool hashes on another key than the listener's first
                req = _parse_request_head(head, pool.hash_what, pool.hash_name)
                if front.request_id is not None:
                    self.rid = assign_request_id(req, front.request_id)
        if pool is None:
            self._reject(404)
            return
        self.pool = pool
        balancer = pool.balancer
        hash_kind = pool.hash_kind
        idx = -1
        if proxy.hooks is not None:
            # a select hook's backend, counted in flight on pool.balancer (-1: none)
            idx = self._hook_backend(pool)
            if idx == SELECT_FAILED:
                self._reject(500)
                return
        if idx < 0:
            if hash_kind == 0:
                idx = balancer.select()
            else:
                idx = balancer.select(self.addr if hash_kind == 1 else req.key)
                if idx == -2:       # the request has no key: the fallback algorithm picks
                    balancer = pool.fallback
                    idx = balancer.select()
        if idx < 0:
            self._reject(503)
            return
        backend = pool.backends[idx]
        self.backend = backend
        self.bidx = idx
        self.holding = True
        self.held_by = balancer
        if self.trust is None:
            out = _write_request_head(req, self.client_ip, front.proto, proxy.via,
                                      backend.authority)
        else:   # a trusted proxy: its X-Forwarded-* go on
            out = _write_request_head(req, self.client_ip, front.proto, proxy.via,
                                      backend.authority, True)
        if strip is not None:
            out = strip_target(out, strip)
        if proxy.hooks is not None:
            out = self._hook_head(out)      # with a request_headers hook's fields
            if out is HOOK_FAILED:
                self._reject(500)
                return
        length = req.length
        self.req_flags = flags
        self.gen += 1
        self.queued = 0
        self.framing = framing
        self.sent = 0
        self.tried = None
        self.tries = 1
        self.t0 = proxy.now
        self.retried = False
        if framing == BODY_NONE:
            self.state = R_DONE
            self.req_head = out
        elif framing == BODY_LENGTH:
            self.state = R_BODY
            self.left = length
            self.req_head = None
            self.ll_skip = self.ll_done
        else:
            self.state = R_BODY
            self.scanner = _ChunkedScanner()
            self.req_head = None
            self.ll_skip = self.ll_done
        self.deadline = proxy.now + pool.response_timeout
        if self.state == R_BODY:
            # the whole body is due within body_timeout (slow-POST defence),
            # extended by a second per body_min_rate bytes received
            self.body_end = proxy.now + front.body_timeout
            if self.body_end < self.deadline:
                self.deadline = self.body_end
        self._forward(backend, out)
        if rest is not None:
            if self.state == R_BODY:
                self._body(rest, 0)
            else:
                self._stash(rest)

    # -------------------------------------------------------- Python hooks

    def _hook_pool(self, req, head):
        """The hooks' view of this request (kept in ``view`` for the next two
        steps), and the pool a route hook chose: a Pool, None (the routes
        decide) or HOOK_FAILED (logged: 500). See ``fastlb.hooks``."""
        hooks = self.proxy.hooks
        view = self.view = hooks.request(req, head, self.addr, self.front)
        pick = hooks.pick_pool
        return pick(view) if pick is not None else None

    def _hook_backend(self, pool):
        """A select hook's backend: its index, counted in flight on
        ``pool.balancer``; -1 (the algorithm decides) or SELECT_FAILED."""
        pick = self.proxy.hooks.pick_backend
        return pick(self.view, pool) if pick is not None else -1

    def _hook_head(self, out):
        """``out`` with a request_headers hook's fields, or HOOK_FAILED. The
        last step: the view is let go."""
        edit = self.proxy.hooks.edit_head
        view = self.view
        self.view = None
        return edit(view, out) if edit is not None else out

    # -------------------------------------------------------- request body

    def _body(self, data, start):
        # ``ll_skip``: llhttp ended an Upgrade request at its head (what
        # follows would be the new protocol), but no tunnel is made, the
        # Upgrade field is dropped and the body is framed by fastlb's own
        # strict Content-Length or chunked reading, so llhttp is not fed it.
        proxy = self.proxy
        n = len(data)
        self.body_end += (n - start) * self.front.body_rate_inv
        deadline = proxy.now + self.pool.response_timeout
        self.deadline = deadline if deadline < self.body_end else self.body_end
        rest = None
        if self.framing == BODY_LENGTH:
            left = self.left
            if n - start <= left:
                piece = data if start == 0 else data[start:]
                left -= n - start
            else:
                piece = data[start:start + left]
                rest = data[start + left:]
                left = 0
            self.left = left
            done = left == 0
        else:
            try:
                end = self.scanner.scan(data, start)
            except BadRequest as e:
                self._reject(e.status)
                return
            if end < 0 or end == n:
                piece = data if start == 0 else data[start:]
            else:
                piece = data[start:end]
                rest = data[end:]
            done = end >= 0
        try:
            if not self.ll_skip:
                self.feed(piece)
        except _HttpParserUpgrade:
            # llhttp signals an Upgrade request with a body once the body has
            # ended. No tunnel is made: the Upgrade field was dropped as
            # hop-by-hop and this is a plain request that ends here (httptools
            # resumes parsing by itself for the next request).
            self.ll_done = True
        except _HttpParserError:
            self._reject(400)
            return
        if done:
            if not self.ll_done:
                self._reject(400)
                return
            self.scanner = None
            self.state = R_DONE
            # the body is in: from now on the backend owes the response
            self.deadline = proxy.now + self.pool.response_timeout
        self._send_up(piece)
        if rest is not None:
            self._stash(rest)

    def _send_up(self, piece):
        up = self.up
        if up is not None:
            up.write(piece)
            up.backend.ctr[B_BYTES_OUT] += len(piece)
        elif self.outq is not None:
            self.outq.append(piece)
            self.queued += len(piece)
            if self.queued > CONNECT_QUEUE_LIMIT:
                self.pause_reading_for(P_CONNECTING)
        # else: the request already failed; the bytes are dropped with it

    def _stash(self, data):
        """Keep bytes that follow the request in flight (pipelining)."""
        self.pending = self.pending + data if self.pending else data
        if len(self.pending) > PIPELINE_LIMIT:
            self.pause_reading_for(P_PIPELINE)

    # -------------------------------------------------------- upstream

    def _forward(self, backend, out):
        self.backend = backend
        idle = backend.idle
        while idle:
            up = idle.pop()
            if up.state == U_IDLE:
                # bind (inlined: this is the per-request path)
                up.client = self
                up.state = U_HEAD
                up.got_bytes = False
                up.interim = 0
                backend.ctr[B_ACTIVE] += 1
                backend.ctr[B_REQUESTS] += 1
                self.up = up
                if self.wpaused:
                    up.pause_reading()
                self.t_sent = monotonic_us()
                up.write(out)
                backend.ctr[B_BYTES_OUT] += len(out)
                return
        kept = self.kept
        if kept is not None:
            # a private connection of this client's (PROXY protocol to the backends)
            self.kept = None
            kept.owner = None
            if kept.backend is backend and kept.state == U_IDLE:
                kept.bind(self)
                self.up = kept
                if self.wpaused:
                    kept.pause_reading()
                self.t_sent = monotonic_us()
                kept.write(out)
                backend.ctr[B_BYTES_OUT] += len(out)
                return
            kept.close()        # another backend's: this request needs its own
        self.outq = [out]
        self.proxy.connect(backend, self, self.gen)

    def _send_to(self, backend):
        """Send the queued request (``outq``) over a pooled or a fresh connection."""
        self.backend = backend
        idle = backend.idle
        while idle:
            up = idle.pop()
            if up.state == U_IDLE:
                self._send_over(up, backend)
                return
        self.proxy.connect(backend, self, self.gen)

    def _send_over(self, up, backend):
        """Send the queued request (``outq``) over ``up``, a connection to
        ``backend`` (pooled or just opened), and wait for its answer."""
        outq = self.outq
        self.outq = None
        up.bind(self)
        self.up = up
        if self.wpaused:
            up.pause_reading()
        if self.proxy.log is not None:
            self.t_up = _clock()
        self.t_sent = monotonic_us()
        up.transport.writelines(outq)
        backend.ctr[B_BYTES_OUT] += _total(outq)
        self.resume_reading_for(P_CONNECTING)

    def _next_backend(self):
        """Pick another backend for a failed request: never one it failed on, at most
        ``max_tries`` in all. Returns None when there is none left."""
        pool = self.pool
        tried = self.tried
        if tried is None:
            tried = self.tried = set()
        tried.add(self.bidx)
        self._release()
        if self.tries >= pool.max_tries or self.proxy.now - self.t0 > pool.retry_timeout:
            return None
        if pool.retired:
            # a reload replaced the pool since the request started: retry in
            # the pool of the same name now, never on a backend it removed
            new = self.proxy.pools.get(pool.name)
            if new is None:
                return None
            self.move_to(new)
            pool = new
            tried = self.tried
        # retries go by the fallback of a hashing algorithm: the key's backend failed
        balancer = pool.balancer if pool.fallback is None else pool.fallback
        # the algorithm's own choice among the backends not tried yet (least-conn:
        # the least loaded of them, not the one just released for failing)
        idx = balancer.select_excluding(tried)
        if idx < 0:
            return None
        self.holding = True
        self.held_by = balancer
        self.tries += 1
        self.retried = False    # the stale keep-alive race may happen on this one too
        self.bidx = idx
        return pool.backends[idx]

    def move_to(self, pool):
        """The request goes on in ``pool``, which a reload put in the place of
        its own: the backends it tried move to their indices there (kept
        ones are the same objects; removed ones are left out), and so does
        its backend if ``pool`` kept it. The caller moves any claim on a
        selector (``held_by``) first."""
        old = self.pool
        if self.tried is not None:
            moved = set()
            for i in self.tried:
                b = old.backends[i]
                if b.pool is pool and not b.retired:
                    moved.add(b.index)
            self.tried = moved
        b = self.backend
        if b is not None and b.pool is pool:
            self.bidx = b.index
        self.pool = pool

    def upstream_connected(self, up, gen):
        """``proxy.connect`` made a fresh connection for request ``gen``."""
        if gen != self.gen or self.outq is None or self.state == R_CLOSED:
            # That request is over (answered, timed out, or the client left).
            self.proxy.release_fresh(up)
            return
        self._send_over(up, up.backend)

    def upstream_local_error(self, reason, gen):
        """fastlb itself could not open a connection (no fds, no buffers): the
        backend is not to blame, and another backend would fail the same way."""
        self.proxy.local_error(reason)
        if gen != self.gen or self.outq is None or self.state == R_CLOSED:
            return
        self.outq = None
        self._fail(503)

    def upstream_connect_failed(self, backend, reason, gen):
        """A fresh connection to ``backend`` could not be made: nothing reached it,
        so any request may go to the next backend."""
        backend.ctr[B_CONNECT_ERRORS] += 1
        self.proxy.note_failure(backend, reason)
        if gen != self.gen or self.outq is None or self.state == R_CLOSED:
            return
        nxt = self._next_backend()
        if nxt is None:
            self.outq = None
            self._fail(502)
            return
        backend.ctr[B_RETRIES] += 1
        self._send_to(nxt)

    def upstream_failed(self, up, reason):
        """The upstream connection closed (or reset) before any response byte."""
        if self.up is up:
            self.up = None
        if self.state == R_CLOSED:
            return
        if self.req_head is None or not self.req_flags & REQ_IDEMPOTENT:
            # A body we did not keep, or a method that must not run twice.
            # On a reused pooled connection this is the keep-alive race (the
            # backend closed it as we reused it), not a backend fault.
            if not up.reused:
                self.proxy.note_failure(up.backend, reason)
            self._fail(502)
            return
        if up.reused and not self.retried:
            # The stale keep-alive race: the backend closed a pooled
            # connection just as we reused it. Retry once, on a fresh one.
            self.retried = True
            self.outq = [self.req_head]
            self.proxy.connect(up.backend, self, self.gen)
            return
        if not up.reused:
            # on a reused connection it is the keep-alive race again (this
            # request's one fresh retry is spent): not the backend's fault
            self.proxy.note_failure(up.backend, reason)
        nxt = self._next_backend()
        if nxt is None:
            self._fail(502)
            return
        up.backend.ctr[B_RETRIES] += 1
        self.retried = False    # one fresh retry per backend for the race
        self.outq = [self.req_head]
        self._send_to(nxt)

    def response_aborted(self, up, reason, invalid=False):
        if self.up is up:
            self.up = None
        if self.state == R_CLOSED:
            return
        self.proxy.note_failure(up.backend, reason)
        if self.sent == 0:
            self._fail(502)
        else:
            if self.log_head is not None:
                self.proxy.log_request(self, up.status)   # cut: the status it got part of
            self._release()
            self.state = R_CLOSED
            self.transport.abort()

    def _release(self):
        """End this request's claim on its backend (least-connections counts)."""
        if self.holding:
            self.holding = False
            self.held_by.release(self.bidx)

    def write_response(self, data):
        n = len(data)
        self.sent += n
        self.front.ctr[L_BYTES_OUT] += n
        self.write(data)

    def write_response2(self, head, body):
        n = len(body)
        m = len(head) + n
        self.sent += m
        self.front.ctr[L_BYTES_OUT] += m
        if n <= TAIL_COPY and type(body) is bytes:
            small = body        # _tail copies what is this small
            self.write(head + small)
        else:
            # uvloop sends the two at the end of this loop turn in one writev,
            # from the buffers themselves: the body is not copied
            self.transport.writelines((head, body))

    def response_done(self, keep_alive, status):
        """The upstream delivered the whole response."""
        self.up = None
        proxy = self.proxy
        backend = self.backend
        if self.holding:
            self.holding = False
            self.held_by.release(self.bidx)
        if status >= 500 and self.pool.eject_5xx:
            proxy.note_failure(backend, "status %d" % status)
        elif backend.fail_streak:
            proxy.note_success(backend)
        if proxy.log is not None:
            proxy.log_request(self, status)
        if self.state != R_DONE:
            self._linger()      # answered before the client finished sending
            return
        if not keep_alive or (self.eof and not self.pending):
            if not self.eof:
                # the client may still be sending (it may even have sent more
                # already): closing now could reset the connection and destroy
                # this response (RFC 9112 9.6), so linger
                self._linger()
            else:
                self._close()
            return
        self._next_request()

    def _drain_idle(self):
        """Draining, with no request under way. A connection kept alive after
        a response closes now: a client must expect that of a reused
        connection (RFC 9112 9.3.1), and HTTP clients send the request again.
        One that has carried no request yet was just accepted, and its client
        sent its request (or is about to) without any reason to expect a
        close: as nginx does, it gets that one request answered (with
        ``Connection: close``), if it comes within ``DRAIN_FIRST_WAIT``."""
        if self.gen != 0:
            self._close()
            return
        until = self.proxy.now + DRAIN_FIRST_WAIT
        if until < self.deadline:
            self.deadline = until

    def _next_request(self):
        """The exchange is over and the connection stays open: read the next
        request, starting with any that were pipelined behind this one."""
        if self.proxy.draining or self.front.draining:
            self._close()
            return
        self.state = R_HEAD
        self.sent = 0
        if self.rid is not None:
            self.rid = None             # the next exchange has its own
        if self.trust is not None:
            self.addr = self.client_ip  # until the next request says otherwise
        self.deadline = self.proxy.now + self.front.keepalive_timeout
        # pauses that belonged to the finished exchange end with it
        self.resume_reading_for(P_CONNECTING | P_UPSTREAM)
        if self.pending:
            data = self.pending
            self.pending = b""
            self.resume_reading_for(P_PIPELINE)
            self._head(data)
        if self.eof and (self.state == R_HEAD or self.state == R_BODY):
            if self.log_head is not None:
                self._log_cut()     # a pipelined request cut short
            self._close()   # half-closed, and no complete request left

    # -------------------------------------------------------- errors, flow, close

    def _reject(self, status):
        """Refuse a request fastlb read itself: answer and close."""
        if self.state == R_HEAD:
            self.t_up = 0.0     # access log: never sent to the backend chosen for it
        self.state = R_CLOSED
        msg = _ERRORS[(status, False)]
        if status == 503 and self.pool is not None and self.pool.health is not None:
            msg = error_response(503, False, b"Retry-After: %d\r\n" % self.pool.health.retry_after())
        if self.front.request_id is not None:
            msg = self._with_id(msg)
        self.sent += len(msg)
        self.front.ctr[L_1XX - 1 + status // 100] += 1
        self.front.ctr[L_BYTES_OUT] += len(msg)
        if self.proxy.log is not None:
            if self.parts is not None:  # a head under way: what arrived of it
                self.log_head = b"".join(self.parts)
            elif self.log_head is None:     # refused before a byte was kept (stray CR/LF)
                self.log_head = self.buf
                self.started = _clock()
            self.proxy.log_request(self, status)
        self.transport.write(msg)
        self._linger()

    def _with_id(self, msg):
        """``msg``, one of fastlb's own answers, with the request's id field
        (a new id when the request has none: refused before it was parsed)."""
        rid = self.rid
        if rid is None:
            rid = self.rid = new_request_id()
        return add_request_id(msg, self.front.request_id, rid)

    def _linger(self):
        """Close after an answer without losing it, as nginx's lingering close:
        closing a socket with unread input resets it, and the reset can destroy
        the answer in flight. So shut our side only, then read and discard what
        the client still sends, for at most LINGER seconds."""
        self._release()
        self._drop_upstream()
        self.state = R_CLOSED
        self.pending = b""
        transport = self.transport
        if self.eof or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        if self.paused:
            self.paused = 0
            transport.resume_reading()
        self.deadline = self.proxy.now + LINGER

    def _fail(self, status):
        """The backend side failed: answer ``status`` if the client can still get it."""
        if self.sent and self.log_head is not None:
            self._log_cut()     # part of a response went out: that is what it got
        self._release()
        self._drop_upstream()
        if self.sent:
            self.state = R_CLOSED
            self.transport.abort()
            return
        keep = self.state == R_DONE and not self.eof and self.req_flags & REQ_KEEP_ALIVE
        proxy = self.proxy
        msg = _ERRORS[(status, bool(keep))]
        if self.front.request_id is not None:
            msg = self._with_id(msg)
        self.sent += len(msg)
        self.front.ctr[L_1XX - 1 + status // 100] += 1
        self.front.ctr[L_BYTES_OUT] += len(msg)
        if proxy.log is not None:
            proxy.log_request(self, status)
        self.transport.write(msg)
        if not keep:
            self._linger()
            return
        self._next_request()

    def timed_out(self, now):
        """Called by the ticker once ``deadline`` has passed."""
        state = self.state
        if state == R_HEAD:
            if self.buf:
                self._reject(408)   # a head that never completed (slowloris)
            else:
                self._close()       # idle keep-alive connection
        elif state == R_BODY:
            if self.paused & P_UPSTREAM:
                # The backend stopped reading the body (its socket is full):
                # the backend's fault, not the client's.
                self.proxy.note_failure(self.backend, "stopped reading the request body")
                self.outq = None
                self._fail(504)
            elif self.sent:
                if self.log_head is not None:
                    self._log_cut()
                self._abort()       # the client stopped sending its body
            else:
                self._reject(408)
        elif state == R_CLOSED:
            if self.transport.is_closing():
                self._abort()       # a close whose buffer never drained
            else:
                self._close()       # the end of a lingering close
        elif state == R_TUNNEL:
            self.end_tunnel()       # nothing either way for tunnel_timeout
        elif state == R_PROXY:
            if self.proxy.draining or self.front.draining:
                self._close()       # stopping: its wait for a header is cut short
            else:
                self.proxy.proxy_header_error(
                    self, "no complete PROXY protocol header within %gs"
                    % self.front.header_timeout if self.buf else
                    "no PROXY protocol header within %gs" % self.front.header_timeout)
        elif state == R_DONE:
            if self.wpaused:
                # The backend is waiting for us, not the other way round. A
                # client that still drains the response (its write buffer
                # shrank) gets more time, as nginx's send_timeout; one that
                # stopped reading is dropped, and the backend is not blamed.
                size = self.transport.get_write_buffer_size()
                if size < self.wmark:
                    self.wmark = size
                    self.deadline = now + self.pool.response_timeout
                else:
                    if self.log_head is not None:
                        self._log_cut()
                    self._abort()
                return
            if self.up is not None:
                self.proxy.note_failure(self.backend, "response timeout")
            self.outq = None
            self._fail(504)

    def pause_reading_for(self, reason):
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading_for(self, reason):
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.state != R_CLOSED:
                self.transport.resume_reading()

    def _close(self):
        """Close after the last response: what is still buffered is flushed,
        but for ``response_timeout`` at most (the ticker then aborts)."""
        self._release()
        self.state = R_CLOSED
        self._drop_upstream()
        transport = self.transport
        if transport.get_write_buffer_size():
            self.deadline = self.proxy.now + self.proxy.response_timeout
        else:
            self.proxy.clients.discard(self)
        transport.close()

    def _abort(self):
        """Drop the connection at once: a client that is gone or stopped
        reading keeps neither its socket nor its buffers. The close is a
        reset, so the kernel does not keep the unsent data either (a plain
        close would leave it in an orphaned socket for minutes)."""
        self._release()
        self.state = R_CLOSED
        self.proxy.clients.discard(self)
        self._drop_upstream()
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        transport.abort()

    def _log_cut(self):
        """Log the exchange in flight as cut short (the client left, or it is
        dropped): with the status of the response it got part of, and the
        bytes sent so far; 499 if no response had started (nginx's "client
        closed request")."""
        up = self.up
        self.proxy.log_request(self, up.status if self.sent and up is not None else 499)

    # -------------------------------------------------------- tunnels

    def start_tunnel(self, up):
        """``up`` relayed a 101 for the request in flight: this connection is
        a tunnel from now on. What the client sent after its request goes to
        the backend, and so does its EOF if it already half-closed."""
        proxy = self.proxy
        self.state = R_TUNNEL
        proxy.tunnels += 1
        front = self.front
        front.ctr[L_TUNNELS] += 1
        front.ctr[L_TUNNELS_TOTAL] += 1
        backend = self.backend
        if backend.fail_streak:
            proxy.note_success(backend)
        self.deadline = proxy.now + self.front.tunnel_timeout
        self.resume_reading_for(P_CONNECTING | P_PIPELINE)
        pending = self.pending
        if pending:
            self.pending = b""
            front.ctr[L_TUNNEL_BYTES_IN] += len(pending)
            up.backend.ctr[B_BYTES_OUT] += len(pending)
            up.write(pending)
        if self.eof:
            up.half_close()

    def _end_tunnel(self):
        """The tunnel is over: counted and logged once (101, every byte sent
        to the client); its upstream connection closes once what it holds is
        sent (and never goes back to the pool). The caller closes this one."""
        proxy = self.proxy
        self.state = R_CLOSED
        proxy.tunnels -= 1
        self.front.ctr[L_TUNNELS] -= 1
        if self.log_head is not None:
            proxy.log_request(self, 101)
        self._release()
        up = self.up
        if up is not None:
            self.up = None
            up.backend.ctr[B_ACTIVE] -= 1
            up.close_tunnel()

    def end_tunnel(self):
        """End the tunnel and close both connections, each once what it has
        buffered is sent (bounded by the response timeout)."""
        if self.state == R_TUNNEL:
            self._end_tunnel()
            self._close()

    def tunnel_lost(self, up):
        """The backend side of the tunnel closed: the client gets what is
        buffered for it, then the connection closes."""
        if self.up is up:
            self.up = None
        self.end_tunnel()

    def in_flight(self):
        """A request is being read or answered on this connection (a tunnel
        is not a request)."""
        return self.state == R_BODY or self.state == R_DONE or (
            self.state == R_HEAD and bool(self.buf))

    def _drop_upstream(self):
        """Abort the upstream connection of an exchange cut short (its state is
        unknown), and close a private one kept idle for this client."""
        up = self.up
        if up is not None:
            self.up = None
            up.backend.ctr[B_ACTIVE] -= 1
            up.abort()
        kept = self.kept
        if kept is not None:
            self.kept = None
            kept.owner = None
            kept.close()


# ---------------------------------------------------------------- shared state

class Proxy:
    """State shared by every connection of one balancer: the pools, the
    listeners' Fronts, the clock, fd accounting, the access log.

    ``opts`` is a ``fastlb.config.Config`` (listeners, routes, pools), or a
    ``fastlb.server.Options`` (one listener and one pool, as the flags give).
    The objects the data path reads are built from it by
    ``fastlb.runtime.build``, which also applies a reload.

    Counters go to ``tables`` (a ``fastlb.runtime.shm.Tables``), slot
    ``slot``, in the rows ``layout.assign(config)`` gives each backend and
    listener (``layout``: a ``fastlb.runtime.shm.Layout``, or anything with
    its ``assign``). ``shared``: an object with those three attributes (a
    worker's ``fastlb.runtime.worker.Shared``, on the table its master made),
    used as they are; None: a table of this process's own, sized for
    ``opts``, slot 1."""

    def __init__(self, opts, loop, shared=None):
        from fastlb.runtime import build

        self.opts = opts
        self.loop = loop
        # a worker's: what its master shares with it (the table, this
        # worker's rows and slot, ``health(proxy, pool, config)`` to make a
        # pool's health view); None: a process on its own
        self.shared = shared
        config = build.as_config(opts)
        if shared is None:
            self.tables = shm.Tables.create(*shm.Layout.capacity(config, 1))
            self.layout = shm.Layout(self.tables)
            self.slot = 1
        else:
            self.tables = shared.tables
            self.layout = shared.layout
            self.slot = shared.slot
        self.config = None
        self.pools = {}         # name -> Pool
        self.fronts = {}        # listener name -> Front
        self.front = None       # the first Front (ClientProtocol's default)
        self.retired = []       # Backends removed by a reload, finishing their requests
        self.n_backends = 0
        # the first pool's, for callers that know one pool (see build.publish)
        self.backends = []
        self.balancer = None
        self.fallback = None
        self.balancers = None
        self.weights = []
        self.health = None
        self.clients = set()
        self.response_timeout = 60.0    # closing connections flush for this long at most
        self.via = b"fastlb" if config.via else None
        self.log = None if config.access_log == "off" else AccessLog(config.access_log,
                                                                     config.access_log_format)
        self.log_add = self.log.buffer.add if self.log is not None else None
        self.log_add_id = self.log.buffer.add_id if self.log is not None else None
        self.now = loop.time()
        self.draining = False   # stopping: every response closes its connection
        self.closed = False
        self.local_errors = 0   # fastlb's own shortages (fds, buffers) since start
        self.stalls = 0         # event-loop stalls that pushed deadlines back
        self.upstreams = 0      # open upstream connections (fds)
        self.connecting = 0     # upstream connects in progress (each holds an fd)
        # tunnels open now (the listeners' counters have them too, and the
        # ones opened and the bytes relayed)
        self.tunnels = 0
        self.proxy_errors = 0   # connections closed for their PROXY protocol header
        self._pp_logged = -LOCAL_LOG_EVERY
        self._pp_quiet = 0      # of them not logged since the last line
        self.flushing = set()   # upstreams of ended tunnels still sending (UpstreamProtocol)
        # Backends' responses are read into this buffer (UpstreamProtocol.get_buffer),
        # one for all: a read is used up before the next (one loop). A view of it
        # that a client's transport keeps (not all sent yet) makes it that
        # transport's: the next read takes a new one (rview: a memoryview of it).
        self.rbuf = None
        self.rview = None
        self.read_buffers = 0   # buffers taken so far (a new one each time one is kept)
        self.listener = None    # the first Front's fastlb.server.Listener
        self.fd_base = 0        # fds open besides connections (set by start)
        self.fd_budget = 1 << 30  # connections (client + upstream) before pausing accepts
        self._local_logged = -LOCAL_LOG_EVERY
        self._local_quiet = 0   # shortages not logged since the last line
        self.tick = 0.25
        self._ticker = None
        self._tasks = set()
        self._health_stop = None
        self.hooks = None       # fastlb.hooks.Hooks, or None: no hooks (none of it runs)
        build.apply(self, build.plan(self, config))

    # -------------------------------------------------------- timers

    def start(self):
        try:
            self.fd_base = len(os.listdir("/proc/self/fd"))
        except OSError:
            self.fd_base = 64
        self._update_fd_budget()
        self._ticker = self.loop.call_later(self.tick, self._tick)

    def _update_fd_budget(self):
        """Connections (client and upstream) allowed before accepting pauses:
        the soft fd limit less what else is open and a reserve for connects,
        health checks and logs. Read each tick (the limit can change)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            self.fd_budget = 1 << 30
            return
        self.fd_budget = soft - self.fd_base - FD_RESERVE - self.n_backends

    def fd_pressure(self):
        """fastlb's connections reached its fd budget: stop accepting until
        some close (before accept() itself could fail)."""
        why = None
        for front in self.fronts.values():
            if front.listener is not None:
                if why is None:
                    why = (f"{len(self.clients)} client and {self.upstreams} "
                           f"backend connections open, near the fd limit")
                front.listener.pause(why)

    def fd_room(self):
        """Whether accepting may resume: well below the budget again. If not,
        idle pooled backend connections are given up first."""
        budget = self.fd_budget
        if len(self.clients) + self.upstreams + self.connecting < budget - max(4, budget // 8):
            return True
        for b in self.all_backends():
            if b.idle:
                b.close_idle()
        return False

    def all_backends(self):
        """Every backend with connections to look after: those of the pools,
        then the retired ones."""
        for pool in self.pools.values():
            yield from pool.backends
        yield from self.retired

    def _tick(self):
        now = self.loop.time()
        late = now - self.now - self.tick
        self.now = now
        self._update_fd_budget()
        if len(self.clients) + self.upstreams + self.connecting >= self.fd_budget:
            self.fd_pressure()
        if late > STALL:
            # The loop itself was stalled (a blocked thread, a suspended
            # process): deadlines that passed meanwhile say nothing about
            # clients or backends. Push them back by the stall.
            self.stalls += 1
            log.warning("event loop stalled for %.1fs: deadlines pushed back", late)
            for c in self.clients:
                c.deadline += late
        else:
            for client in [c for c in self.clients if c.deadline < now]:
                client.timed_out(now)
        for pool in self.pools.values():
            cutoff = now - pool.idle_timeout
            for b in pool.backends:
                if b.idle:
                    b.sweep_idle(cutoff)
        if self.flushing:
            for up in [u for u in self.flushing if u.flush_by < now]:
                self.flushing.discard(up)
                up.abort()      # a backend that stopped reading what a tunnel left it
        if self.retired:
            self._sweep_retired()
        if self.log is not None:
            self.log.refresh_stamp()
            self.log.flush()
        self._ticker = self.loop.call_later(self.tick, self._tick)

    def _sweep_retired(self):
        """Backends a reload removed: once their last request is over, their
        idle connections are closed and they are forgotten."""
        keep = []
        for b in self.retired:
            b.close_idle()      # a retired backend pools nothing (max_idle 0)
            if b.active or b.connecting:
                keep.append(b)
            else:
                log.debug("backend %s (retired) finished its requests", b.url)
        self.retired = keep

    # -------------------------------------------------------- upstream connections

    def connect(self, backend, client, gen):
        if len(self.clients) + self.upstreams + self.connecting >= self.fd_budget:
            self.fd_pressure()
        task = self.loop.create_task(_connect(self, backend, client, gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_fresh(self, up):
        """A connection made for a client that went away: keep it for the next
        one (not one that began with that client's PROXY header)."""
        if up.private:
            up.close()
            return
        up.reused = True
        up.backend.push_idle(up, self.now)

    def note_failure(self, backend, reason):
        """A request failed because of ``backend`` (passive health check input).

        State changes are logged by the health checker, once each; single
        failures only at debug level, so a dead backend under load does not
        flood the log."""
        backend.ctr[B_FAILURES] += 1
        backend.fail_streak += 1
        log.debug("backend %s: %s", backend.url, reason)
        pool = backend.pool
        if pool is not None and pool.health is not None and not backend.retired:
            pool.health.on_failure(backend.index, reason)

    def note_success(self, backend):
        """A response completed on a backend that had failed since its last success."""
        backend.fail_streak = 0
        pool = backend.pool
        if pool is not None and pool.health is not None and not backend.retired:
            pool.health.on_success(backend.index)

    def local_error(self, reason):
        """fastlb's own shortage (fds, buffers, memory): counted, logged at
        most once every LOCAL_LOG_EVERY seconds, never blamed on a backend."""
        self.local_errors += 1
        now = self.loop.time()
        if now - self._local_logged >= LOCAL_LOG_EVERY:
            quiet = self._local_quiet
            self._local_quiet = 0
            self._local_logged = now
            log.warning("cannot connect to backends: %s (fastlb's own limit, not the "
                        "backends'; answering 503)%s", reason,
                        f"; {quiet} more since the last report" if quiet else "")
        else:
            self._local_quiet += 1

    def proxy_header_error(self, client, reason):
        """``client`` must start with a PROXY protocol header and did not
        send a valid one (``reason``): it is closed without an answer,
        counted (the proxy's ``proxy_errors``, its listener's
        ``proxy_errors`` counter) and logged at most once every
        LOCAL_LOG_EVERY seconds (a flood of them says the same thing)."""
        self.proxy_errors += 1
        front = client.front
        front.ctr[L_PROXY_ERRORS] += 1
        client._close()
        now = self.loop.time()
        if now - self._pp_logged >= LOCAL_LOG_EVERY:
            quiet = self._pp_quiet
            self._pp_quiet = 0
            self._pp_logged = now
            peer = client.transport.get_extra_info("peername") if client.transport else None
            who = _peer_name(peer) if peer else "a client"
            log.warning("listener %s: connection from %s closed without an answer: %s%s",
                        front.name, who, reason,
                        f" ({quiet} more since the last report)" if quiet else "")
        else:
            self._pp_quiet += 1

    def start_drain(self):
        """Stop keeping connections alive: idle ones close now, busy ones
        after their response (which says ``Connection: close``)."""
        self.draining = True
        for c in list(self.clients):
            if (c.state == R_HEAD and not c.buf) or c.state == R_PROXY:
                c._drain_idle()

    def drain_front(self, front):
        """A listener removed by a reload: its idle connections close now,
        the others after their response."""
        front.draining = True
        for c in list(self.clients):
            if c.front is front and ((c.state == R_HEAD and not c.buf) or c.state == R_PROXY):
                c._drain_idle()

    # -------------------------------------------------------- access log

    def log_request(self, client, status):
        """The exchange in flight on ``client`` ended with ``status``: its line
        (once: a second call for the same exchange does nothing)."""
        head = client.log_head
        if head is None:
            return
        client.log_head = None
        now = _clock()
        t_resp = client.t_resp
        if t_resp < 0.0:
            t_resp = now        # the response ended in the read that brought its head
        backend = client.backend
        if client.front.request_id is not None:
            self._log_id(client, head, status, backend, now, t_resp)
            return
        if self.log_add(head, client.addr, status, client.sent,
                        backend.authority if backend is not None and client.t_up != 0.0
                        else None,
                        t_resp - client.t_up if t_resp != 0.0 else -1.0, now - client.started):
            self.log.flush()    # a full batch: to the writer thread now

    def _log_id(self, client, head, status, backend, now, t_resp):
        """``log_request`` with request ids: the line shows the exchange's id (a
        new one for an exchange cut short before its head was parsed)."""
        rid = client.rid
        if rid is None:
            rid = client.rid = new_request_id()
        if self.log_add_id(head, client.addr, status, client.sent,
                           backend.authority if backend is not None and client.t_up != 0.0
                           else None,
                           t_resp - client.t_up if t_resp != 0.0 else -1.0, now - client.started,
                           rid):
            self.log.flush()

    # -------------------------------------------------------- health, shutdown

    def start_health(self, config=None):
        """Start every pool's health checks. ``config`` (a
        ``fastlb.health.HealthConfig``) replaces the checks of a proxy built
        from Options, whose single pool then gets them."""
        from fastlb.runtime import build

        if config is not None and len(self.pools) == 1:
            (pool,) = self.pools.values()
            build.set_health(self, pool, config)
        for pool in self.pools.values():
            if pool.health is not None and not pool.health._started:
                pool.health.start()

    async def wait_closed(self):
        """After ``close()``: wait for the health checks to stop."""
        if self._health_stop is not None:
            await self._health_stop
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop_health(self, pools):
        """Stop the health checks of ``pools`` (in the background: the task
        is kept, so nothing is left behind)."""
        checkers = [p.health for p in pools if p.health is not None]
        if checkers:
            task = self.loop.create_task(_stop_all(checkers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return task
        return None

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.draining = True
        self._health_stop = self.stop_health(list(self.pools.values()))
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for b in list(self.all_backends()):
            b.close_idle()
        for c in list(self.clients):
            if c.state == R_TUNNEL:
                c.end_tunnel()      # logged, and its upstream closed, now
        for up in list(self.flushing):
            up.abort()
        self.flushing.clear()
        for c in list(self.clients):
            c.transport.close()
        for t in list(self._tasks):
            if t is not self._health_stop:
                t.cancel()
        if self.log is not None:
            for c in list(self.clients):
                if c.log_head is not None:
                    c._log_cut()    # still in flight: cut short by the stop
            self.log.close()
            self.log = None
            self.log_add = None
            self.log_add_id = None


async def _stop_all(checkers):
    await asyncio.gather(*(h.stop() for h in checkers), return_exceptions=True)


def _peer_name(peer):
    """``host:port`` of a socket's peer name (IPv6 in brackets)."""
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def strip_target(out, n):
    """``out`` (a head written for a backend) with the first ``n`` bytes of
    its target removed (a route's ``strip_prefix``); the path sent always
    starts with ``/``, and the query is kept."""
    sp1 = out.find(b" ")
    sp2 = out.find(b" ", sp1 + 1)
    rest = out[sp1 + 1 + n:sp2]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return out[:sp1 + 1] + rest + out[sp2:]


async def _connect(proxy, backend, client, gen):
    """Open a fresh connection to ``backend`` for request ``gen`` of ``client``."""
    loop = proxy.loop
    timeout = client.pool.connect_timeout
    backend.connecting += 1
    proxy.connecting += 1
    started = loop.time()
    tls = backend.tls
    try:
        if tls is None:
            connecting = loop.create_connection(
                lambda: UpstreamProtocol(backend, proxy), backend.host, backend.port)
        else:   # https://: the handshake is part of the connect, under its timeout
            connecting = loop.create_connection(
                lambda: UpstreamProtocol(backend, proxy), backend.host, backend.port,
                ssl=tls, server_hostname=backend.server_name, ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN)
        _, up = await asyncio.wait_for(connecting, timeout)
    except asyncio.TimeoutError:
        if loop.time() - started > timeout + STALL:
            # our own timer fired late: the loop was stalled, not the backend
            client.upstream_local_error("event loop stalled during connect", gen)
        else:
            client.upstream_connect_failed(backend, "connect timeout", gen)
        return
    except _SSLError as e:
        # the backend's certificate, or a backend that does not speak TLS:
        # a setup to fix, so said at warning level (once every 10 s per backend)
        reason = _tls_reason(e)
        now = loop.time()
        if now - backend.tls_logged >= LOCAL_LOG_EVERY:
            backend.tls_logged = now
            log.warning("backend %s: %s", backend.url, reason)
        client.upstream_connect_failed(backend, reason, gen)
        return
    except OSError as e:
        if e.errno in _LOCAL_ERRNOS:
            client.upstream_local_error(e.strerror or str(e), gen)
        else:
            client.upstream_connect_failed(backend, e.strerror or str(e), gen)
        return
    finally:
        backend.connecting -= 1
        proxy.connecting -= 1
    if up.transport.is_closing():
        # Closed or reset by the backend between the connect and now (a
        # backend dying, or one that drops what it accepts): nothing was
        # sent on it, so this fails like a refused connect. Never write the
        # request into it and wait for an answer that cannot come.
        client.upstream_connect_failed(backend, "closed by the backend as it opened", gen)
        return
    pool = backend.pool if backend.pool is not None else client.pool
    version = pool.send_proxy if pool is not None else 0
    if version:
        # the first bytes on the connection: it is this client's from now on
        up.private = True
        header = client.proxy_header(version)
        up.write(header)
        backend.ctr[B_BYTES_OUT] += len(header)
    client.upstream_connected(up, gen)
