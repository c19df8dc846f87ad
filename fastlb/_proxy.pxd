# C types for fastlb/_proxy.py when Cython compiles it (an augmenting .pxd).
# The .py stays plain Python; these declarations turn its classes into final
# extension types with C fields, so the per-request path reads and writes
# fields and calls methods without dictionary lookups.
cimport cython

from fastlb._core cimport Selector   # the selectors' C-level select/release
from fastlb._core cimport RequestHead  # flags, framing, length, key read as C fields
from fastlb._core cimport monotonic_us  # the clock of response times: a C call
# the head functions, called at C level (the .py imports the same names from fastlb.core)
from fastlb._core cimport find_head_end as _find_head_end
from fastlb._core cimport read_buffer as _read_buffer, buffer_bytes as _buffer_bytes
from fastlb._core cimport parse_request_head as _parse_request_head
from fastlb._core cimport write_request_head as _write_request_head
from fastlb._core cimport rewrite_response_head as _rewrite_response_head
# request ids: a new one, a parsed head's, on a response head, on fastlb's answers (C calls)
from fastlb._core cimport new_request_id, assign_request_id, rewrite_response_head_with_id
from fastlb._core cimport add_request_id
from fastlb.runtime._routing cimport Router, Route   # a listener's compiled routes

cdef int U_IDLE, U_HEAD, U_BODY, U_DONE, U_TUNNEL
cdef int R_HEAD, R_BODY, R_DONE, R_CLOSED, R_TUNNEL, R_PROXY
cdef int P_UPSTREAM, P_PIPELINE, P_CONNECTING
cdef Py_ssize_t PIPELINE_LIMIT, CONNECT_QUEUE_LIMIT, TAIL_COPY, READ_SIZE, HEAD_PROBE
cdef object _tail(bytes data, Py_ssize_t start)
cdef object _from(object data, Py_ssize_t start)
@cython.locals(n=Py_ssize_t)
cdef Py_ssize_t _total(list pieces)
cdef double LINGER, STALL, LOCAL_LOG_EVERY, DRAIN_FIRST_WAIT
cdef Py_ssize_t FD_RESERVE
cdef frozenset _LOCAL_ERRNOS
cdef int BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE
cdef int REQ_HTTP10, REQ_IDEMPOTENT, REQ_KEEP_ALIVE, REQ_UPGRADE
cdef int RESP_CLIENT_KEEP_ALIVE, RESP_DECHUNK, RESP_INFORMATIONAL, RESP_UPSTREAM_KEEP_ALIVE
cdef int RESP_UPGRADE
cdef object _ChunkedScanner
cdef object _pp_parse, _pp_header, _ProxyHeaderError   # fastlb.wire.proxyproto
cdef object _clock
# indices of the counter rows (fastlb.runtime.shm): ``ctr[B_*] += n`` is one add to memory
cdef Py_ssize_t B_1XX, B_ACTIVE, B_BYTES_IN, B_BYTES_OUT, B_CONNECT_ERRORS, B_FAILURES
cdef Py_ssize_t B_REQUESTS, B_RETRIES, B_LAT, B_LAT_SUM_US
cdef long long[::1] _LAT_US         # the histogram's bounds in microseconds
cdef Py_ssize_t N_LAT
cdef Py_ssize_t L_1XX, L_ACTIVE, L_BYTES_IN, L_BYTES_OUT, L_CONNECTIONS, L_REQUESTS
cdef Py_ssize_t L_TUNNELS, L_TUNNELS_TOTAL, L_TUNNEL_BYTES_IN, L_TUNNEL_BYTES_OUT, L_PROXY_ERRORS
cdef Py_ssize_t NB, NL
cdef object _HttpRequestParser, _HttpParserError, _HttpParserUpgrade
cdef object HOOK_FAILED               # a Python hook failed (logged): 500 (fastlb.hooks)
cdef int SELECT_FAILED                # ... what pick_backend returns then
cdef dict _ERRORS

cdef class ClientProtocol
cdef class UpstreamProtocol
cdef class Proxy
cdef class Pool
cdef class Front


@cython.final
cdef class Proxy:
    """State shared by every connection of one balancer (read on every request)."""
    cdef public object opts, loop, config, shared
    cdef public dict pools            # name -> Pool
    cdef public dict fronts           # listener name -> Front
    cdef public Front front           # the first listener's (ClientProtocol's default)
    cdef public list retired          # Backends a reload removed, finishing their requests
    cdef public Py_ssize_t n_backends
    cdef public list backends         # the first pool's (for callers that know one pool)
    cdef public object balancer, fallback, balancers, health
    cdef public list weights
    cdef public set clients
    cdef public double response_timeout   # a closing connection flushes this long at most
    cdef public double now            # the ticker's clock: deadlines are computed from it
    cdef public double tick
    cdef public bint draining         # stopping: responses close their connections
    cdef public bint closed
    cdef public long long local_errors, stalls
    cdef public Py_ssize_t upstreams  # open upstream connections
    cdef public Py_ssize_t connecting # upstream connects in progress
    cdef public Py_ssize_t tunnels    # open tunnels (after a 101)
    cdef public long long proxy_errors  # connections closed for their PROXY protocol header
    cdef public double _pp_logged
    cdef public long long _pp_quiet
    cdef public set flushing          # upstreams of ended tunnels still sending
    cdef public bytearray rbuf        # backends' reads go into it (None: a new one next)
    cdef public object rview          # a memoryview of rbuf
    cdef public long long read_buffers  # read buffers taken so far
    cdef public object listener       # the first Front's fastlb.server.Listener
    cdef public Py_ssize_t fd_base, fd_budget
    cdef public double _local_logged
    cdef public long long _local_quiet
    cdef public object _health_stop
    cdef public bytes via             # None: no Via
    cdef public object log            # AccessLog, or None when off
    cdef public object log_add        # log.buffer.add, bound once (None when off)
    cdef public object log_add_id     # log.buffer.add_id (request ids), bound once
    cdef public object _ticker
    cdef public set _tasks
    cdef public object hooks          # fastlb.hooks.Hooks, or None: no hooks (one test per request)
    cdef public object tables         # fastlb.runtime.shm.Tables: the counters' table
    cdef public object layout         # its rows: assign(config) -> (backend rows, listener rows)
    cdef public int slot              # this process's counter slot in it

    cpdef connect(self, Backend backend, ClientProtocol client, long long gen)
    @cython.locals(head=bytes, backend=Backend, now=double, t_resp=double)
    cpdef log_request(self, ClientProtocol client, int status)
    @cython.locals(rid=bytes)
    cdef _log_id(self, ClientProtocol client, bytes head, int status, Backend backend,
                 double now, double t_resp)
    cpdef local_error(self, reason)
    cpdef proxy_header_error(self, ClientProtocol client, reason)
    @cython.locals(c=ClientProtocol)
    cpdef start_drain(self)
    @cython.locals(c=ClientProtocol)
    cpdef drain_front(self, Front front)


@cython.final
cdef class Pool:
    """One pool: backends, selector, upstream settings (read on every request)."""
    cdef public str name
    cdef public list backends
    cdef public Selector balancer     # the selector (fastlb.selection)
    cdef public Selector fallback     # hashing algorithms: picks for requests without a key
    cdef public object balancers      # both, kept in step (health checks steer this)
    cdef public list weights          # configured weights
    cdef public int hash_kind         # 0: no key, 1: client address, 2: RequestHead.key
    cdef public int hash_what         # KEY_* (fastlb.errors): where parse_request_head finds the key
    cdef public bytes hash_name
    cdef public double connect_timeout, response_timeout, retry_timeout, idle_timeout
    cdef public int max_tries         # backends tried for one request, at most
    cdef public int max_interim       # 1xx responses relayed per request, at most
    cdef public int send_proxy        # PROXY protocol version to the backends (0: none)
    cdef public object health         # HealthChecker or None
    cdef public bint eject_5xx        # 5xx responses count as backend failures
    cdef public object tls_context    # ssl.SSLContext of its https:// backends, or None
    cdef public object config
    cdef public bint retired


@cython.final
cdef class Front:
    """One listener's client-side settings and routes (read on every request)."""
    cdef public str name
    cdef public double header_timeout, keepalive_timeout
    cdef public Py_ssize_t max_header_size
    cdef public double body_timeout   # a body is due this long after its head...
    cdef public double body_rate_inv  # ... plus this many seconds per byte received
    cdef public bint upgrade          # upgrade requests may become tunnels (False: 501)
    cdef public double tunnel_timeout # a tunnel idle this long (no byte either way) closes
    cdef public object trusted        # TrustedProxies (fastlb.wire.forwarded), or None
    cdef public object tls            # fastlb.runtime.tls.ServerTLS of a TLS listener, or None
    cdef public bytes proto           # X-Forwarded-Proto of its requests: b"http" or b"https"
    cdef public bint proxy_protocol   # connections start with a PROXY protocol header ...
    cdef public object pp_from        # ... from peers in these (TrustedProxies); None: all
    cdef public bytes request_id      # the request-id field's name, or None: no request ids
    cdef public Pool pool             # requests matching no route (None: 404)
    cdef public Router router         # None: no routes
    cdef public int hash_what
    cdef public bytes hash_name
    cdef public bint draining
    cdef public object listener, config
    cdef public int row               # its counters' row in the table (-1: a row of its own)
    cdef public unsigned long long[::1] ctr   # those counters (L_*), this process's slot


@cython.final
cdef class Backend:
    cdef public int index             # in its pool's selector (may change on reload)
    cdef public str url, host, address
    cdef public Pool pool
    cdef public bint retired
    cdef public int port
    cdef public bytes authority      # "host:port", sent as Host to HTTP/1.0 requests without one
    cdef public list idle            # idle UpstreamProtocol, LIFO (the oldest first)
    cdef public int max_idle
    cdef public int connecting
    cdef public int fail_streak       # consecutive failures on real traffic
    cdef public object tls            # https://: the ssl.SSLContext to connect with; None: TCP
    cdef public str server_name       # https://: SNI and the name its certificate must have
    cdef public double tls_logged     # loop time a TLS failure with it was last logged
    cdef public int row               # its counters' row in the table (-1: a row of its own)
    cdef public unsigned long long[::1] ctr   # those counters (B_*), this process's slot

    cpdef push_idle(self, UpstreamProtocol up, double now)


@cython.final
cdef class UpstreamProtocol:
    cdef public Backend backend
    cdef public Proxy proxy
    cdef public object transport
    cdef public object write           # transport.write, bound once
    cdef public ClientProtocol client  # None while idle in the pool
    cdef public int state              # U_*
    cdef public bytes buf              # partial response head
    cdef public int framing            # BODY_* of the response
    cdef public long long left         # Content-Length bytes still to relay
    cdef public object scanner         # ChunkedScanner of a chunked response
    cdef public int resp_flags, status
    cdef public bint reused, got_bytes, paused
    cdef public bint eof               # a tunnel's backend sent EOF
    cdef public int interim            # 1xx responses relayed for this request
    cdef public double idle_since
    cdef public double flush_by        # an ended tunnel's: aborted if still sending then
    cdef public bint private           # began with a client's PROXY header: never shared
    cdef public ClientProtocol owner   # idle and private: the client it is kept for
    cdef public bint backed_up         # the client's transport kept a view of the read buffer

    @cython.locals(proxy=Proxy, buf=bytearray)
    cpdef get_buffer(self, Py_ssize_t sizehint)
    @cython.locals(client=ClientProtocol, proxy=Proxy)
    cpdef buffer_updated(self, Py_ssize_t nbytes)
    @cython.locals(proxy=Proxy, pos=Py_ssize_t, end=Py_ssize_t, tail_max=Py_ssize_t,
                   req_flags=int, flags=int, framing=int, status=int, length="long long",
                   us="long long", k=Py_ssize_t)
    cdef _heads(self, bytes data, Py_ssize_t total, ClientProtocol client)
    @cython.locals(proxy=Proxy)
    cdef _rest(self, ClientProtocol client, Py_ssize_t start, Py_ssize_t total)
    cdef _view(self, ClientProtocol client, view)
    @cython.locals(proxy=Proxy)
    cdef _sent(self, ClientProtocol client)
    @cython.locals(us="long long", k=Py_ssize_t)
    cdef _switch(self, ClientProtocol client, bytes head, bytes data, Py_ssize_t end,
                 Py_ssize_t total)
    @cython.locals(proxy=Proxy)
    cpdef close_tunnel(self)
    cpdef half_close(self)
    @cython.locals(n=Py_ssize_t, left="long long", avail=Py_ssize_t, end=Py_ssize_t,
                   done=bint, view=bint, framing=int)
    cdef _body(self, data, Py_ssize_t start, ClientProtocol client, bytes head)
    @cython.locals(backend=Backend, flags=int, idle=list)
    cdef _finish(self, ClientProtocol client)
    cdef _bad(self, ClientProtocol client, reason)
    cpdef bind(self, ClientProtocol client)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef close(self)
    cpdef abort(self)
    cpdef drop_idle(self)
    @cython.locals(owner=ClientProtocol)
    cdef _unpool(self)


@cython.final
cdef class ClientProtocol:
    cdef public Proxy proxy
    cdef public Front front           # this connection's listener
    cdef public Pool pool             # the pool of the request in flight
    cdef public int bidx              # its backend's index in that pool's selector
    cdef public object transport
    cdef public object parser         # httptools.HttpRequestParser: the strict validator
    cdef public object feed           # parser.feed_data, bound once
    cdef public object write          # transport.write, bound once
    cdef public bytes client_ip       # the peer's address
    cdef public bytes addr            # the client's: the peer's, or a trusted proxy's word
    cdef public object trust          # TrustedProxies when the peer is a trusted proxy, or None
    cdef public tuple pp_addrs        # (src ip, port, dst ip, port): from a PROXY header, or
                                      # the socket's once a PROXY header to a backend needed them
    cdef public UpstreamProtocol kept # a private upstream connection, idle between requests
    cdef public int state             # R_*
    cdef public bytes buf             # the first piece of a head under way (b"": none)
    cdef public list parts            # the pieces of that head, or None
    cdef public Py_ssize_t plen       # their total length
    cdef public bytes tail            # their last 3 bytes
    cdef public bytes pending         # bytes after the request in flight (pipelining)
    cdef public int framing           # BODY_* of the request
    cdef public long long left        # Content-Length bytes still to come
    cdef public object scanner        # ChunkedScanner of a chunked request body
    cdef public bint ll_done          # llhttp reported the end of the message
    cdef public bint ll_skip          # llhttp ended this request at its head (Upgrade)
    cdef public int req_flags
    cdef public bytes req_head        # the rewritten head, kept to retry a bodiless request
    cdef public object view           # Python hooks: their view of the request being routed
    cdef public bytes rid             # the request id of the exchange in flight, or None
    cdef public UpstreamProtocol up   # serving the request in flight
    cdef public Backend backend
    cdef public list outq             # bytes waiting for the upstream connection
    cdef public Py_ssize_t queued     # body bytes of this request put in outq
    cdef public object tried
    cdef public bint retried
    cdef public int paused            # P_* bits
    cdef public bint wpaused
    cdef public Py_ssize_t wmark      # client write buffer size when last seen paused
    cdef public double deadline
    cdef public long long sent        # response bytes written to the client (this request)
    cdef public bint eof
    cdef public bytes log_head        # access log: the head of the exchange not logged yet
    cdef public double started, t_up, t_resp   # access log: first byte, sent upstream, response head
    cdef public long long t_sent      # monotonic_us() at the last send to a backend (response times)
    cdef public long long gen         # request number: stale connect attempts check it
    cdef public bint holding          # this request counts against backend in the balancer
    cdef public Selector held_by      # ... in that balancer
    cdef public int tries             # backends tried for this request
    cdef public double t0             # when the request head arrived (ticker clock)
    cdef public double body_end       # the request body is due by then

    @cython.locals(proxy=Proxy, up=UpstreamProtocol)
    cpdef data_received(self, data)
    @cython.locals(front=Front, buf=bytes, end=Py_ssize_t)
    cdef _proxy_header(self, bytes data)
    cpdef bytes proxy_header(self, int version)
    @cython.locals(proxy=Proxy, front=Front, pool=Pool, parts=list, whole=bytes, head=bytes,
                   rest=bytes, stripped=bytes,
                   probe=bytes, end=Py_ssize_t, fed=Py_ssize_t, i=Py_ssize_t, c=int, idx=int,
                   flags=int, framing=int, length="long long", backend=Backend, hash_kind=int,
                   req=RequestHead, route=Route)
    cdef _head(self, bytes data)
    cdef _hook_pool(self, RequestHead req, bytes head)
    cdef int _hook_backend(self, Pool pool) except? -4
    cdef _hook_head(self, out)
    @cython.locals(proxy=Proxy, n=Py_ssize_t, left="long long", end=Py_ssize_t, done=bint,
                   piece=bytes, rest=bytes, deadline=double)
    cdef _body(self, bytes data, Py_ssize_t start)
    cdef _send_up(self, bytes piece)
    cdef _stash(self, bytes data)
    @cython.locals(idle=list, up=UpstreamProtocol, kept=UpstreamProtocol)
    cdef _forward(self, Backend backend, bytes out)
    @cython.locals(up=UpstreamProtocol)
    cdef _send_to(self, Backend backend)
    cdef _send_over(self, UpstreamProtocol up, Backend backend)
    @cython.locals(pool=Pool, new=Pool, idx=Py_ssize_t, balancer=Selector)
    cdef _next_backend(self)
    @cython.locals(old=Pool, moved=set, b=Backend)
    cpdef move_to(self, Pool pool)
    cdef _release(self)
    cpdef upstream_connected(self, UpstreamProtocol up, long long gen)
    cpdef upstream_connect_failed(self, Backend backend, reason, long long gen)
    cpdef upstream_local_error(self, reason, long long gen)
    cdef upstream_failed(self, UpstreamProtocol up, reason)
    cdef response_aborted(self, UpstreamProtocol up, reason, bint invalid=*)
    cdef write_response(self, data)
    @cython.locals(n=Py_ssize_t, m=Py_ssize_t, small=bytes)
    cdef write_response2(self, bytes head, body)
    @cython.locals(proxy=Proxy, backend=Backend)
    cdef response_done(self, bint keep_alive, int status)
    cdef _next_request(self)
    cdef _drain_idle(self)
    cdef _reject(self, int status)
    cdef _fail(self, int status)
    @cython.locals(rid=bytes)
    cdef bytes _with_id(self, bytes msg)
    cpdef timed_out(self, double now)
    cdef pause_reading_for(self, int reason)
    cdef resume_reading_for(self, int reason)
    cdef _close(self)
    cdef _abort(self)
    cpdef bint in_flight(self)
    @cython.locals(up=UpstreamProtocol)
    cpdef _log_cut(self)
    cdef _linger(self)
    @cython.locals(kept=UpstreamProtocol)
    cdef _drop_upstream(self)
    @cython.locals(proxy=Proxy, backend=Backend)
    cpdef start_tunnel(self, UpstreamProtocol up)
    @cython.locals(proxy=Proxy, up=UpstreamProtocol)
    cdef _end_tunnel(self)
    cpdef end_tunnel(self)
    cpdef tunnel_lost(self, UpstreamProtocol up)
