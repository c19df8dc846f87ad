"""The running balancer: options, the listener, signals, draining and shutdown.

Listening. fastlb accepts connections itself (``Listener``) rather than
through ``loop.create_server``: when ``accept()`` fails for lack of file
descriptors or memory, uvloop closes the whole listening socket, which turns
a moment of pressure into an outage. ``Listener`` instead stops accepting for
``ACCEPT_PAUSE`` seconds (the connections wait in the kernel's backlog, as in
nginx), says so in the log once per episode, and resumes by itself.

Stopping. SIGTERM and SIGINT start a drain: stop accepting at once, close
idle keep-alive connections, let requests in flight finish (their responses
say ``Connection: close``) for up to ``drain_timeout`` seconds, then exit. A
second SIGTERM or SIGINT stops at once. SIGHUP never stops the process: it
is logged (reloading needs a configuration file).
"""
import asyncio
import dataclasses
import errno
import logging
import signal
import socket

from fastlb import core
from fastlb.health import HealthConfig
from fastlb.proxy import ClientProtocol, Proxy

log = logging.getLogger("fastlb")

ACCEPT_BATCH = 64       # connections accepted per readiness event, at most
ACCEPT_PAUSE = 0.1      # seconds without accepting after running out of fds or memory
DRAIN_POLL = 0.05       # seconds between checks of a drain's progress

# accept() and connect() errors that are fastlb's own shortage, not a peer's fault
LOCAL_ERRNOS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
# accept() errors about one connection that died in the backlog: skip it
_SKIP_ERRNOS = frozenset([errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET])


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything ``fastlb serve`` is told; built and validated by the CLI."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    backends: tuple = ()                 # ((host, port), ...)
    connect_timeout: float = 5.0         # upstream connect
    response_timeout: float = 60.0       # upstream silent this long -> 504
    header_timeout: float = 10.0         # client must send a whole head in this time
    keepalive_timeout: float = 75.0      # idle client keep-alive connection
    upstream_idle_timeout: float = 60.0  # idle pooled upstream connection
    upstream_max_idle: int = 64          # idle pooled connections per backend
    max_header_size: int = 65536         # bytes; larger head -> 431
    max_interim: int = 10                # 1xx responses relayed per request, at most
    body_timeout: float = 60.0           # a request body is due this long after its head...
    body_min_rate: float = 500.0         # ... plus 1 s per this many bytes received (0: none)
    access_log: str = "off"              # "-", a path, or "off"
    via: bool = True
    retries: int = 2                     # more backends tried after a failure (see README)
    retry_timeout: float = 10.0          # no new try this long after the request arrived
    drain_timeout: float = 30.0          # SIGTERM/SIGINT: in-flight requests get this long
    health: object = None                # fastlb.health.HealthConfig; None: defaults
    weights: tuple = ()                  # per backend; () = all 1
    algorithm: str = "round-robin"       # one of fastlb.selection.ALGORITHMS
    hash_key: str = "ip"                 # hashing: ip, path, header:NAME, cookie:NAME, query:NAME
    hash_balance_factor: float = 0.0     # hashing: bounded load (0 = off, else >= 1)
    backlog: int = 1024


class Listener:
    """Listening sockets whose connections are handed to uvloop transports.

    The surface of ``asyncio.Server`` that fastlb and its tests use:
    ``sockets``, ``close()``, ``wait_closed()``, ``is_serving()``.
    """

    def __init__(self, loop, socks, protocol_factory):
        for sock in socks:
            sock.setblocking(False)
        self._loop = loop
        self.sockets = list(socks)
        self._factory = protocol_factory
        self._reading = False
        self._closed = False
        self._resume = None     # TimerHandle of a pause
        self._pressure = False  # in an episode of fd or memory shortage (logged once)
        self.paused_total = 0   # pauses for shortage, since start

    def start(self):
        if not self._closed and not self._reading and self._resume is None:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)
            self._reading = True

    def stop_accepting(self):
        """Leave new connections in the backlog (the sockets stay open)."""
        if self._reading:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
            self._reading = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    def is_serving(self):
        return self._reading or self._resume is not None

    def close(self):
        if self._closed:
            return
        self.stop_accepting()
        self._closed = True
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self):
        return None

    def _accept(self, sock):
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _SKIP_ERRNOS:
                    continue
                self._shortage(e)
                return
            try:
                task = loop.create_task(loop.connect_accepted_socket(self._factory, conn))
            except OSError as e:    # uvloop could not make the transport
                conn.close()
                self._shortage(e)
                return
            task.add_done_callback(_accepted)
        if self._pressure:
            self._pressure = False
            log.warning("accepting connections again")

    def _shortage(self, exc):
        """accept() failed for want of fds or memory: pause instead of spinning."""
        self.paused_total += 1
        if not self._pressure:
            self._pressure = True
            if exc.errno in LOCAL_ERRNOS:
                log.warning("cannot accept connections: %s; pausing accepts for %gs at a time "
                            "until it passes (raise the fd limit: ulimit -n)",
                            exc.strerror or exc, ACCEPT_PAUSE)
            else:
                log.error("accept failed: %s; retrying in %gs", exc.strerror or exc,
                          ACCEPT_PAUSE)
        self.stop_accepting()
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self):
        self._resume = None
        self.start()
        if self._reading:
            for sock in self.sockets:
                if self._reading:
                    self._accept(sock)


def _accepted(task):
    # consume the result: a connection that failed while being set up is gone
    if not task.cancelled() and task.exception() is not None:
        log.debug("accepted connection failed: %s", task.exception())


def _listen_sockets(host, port, backlog):
    """Bound, listening sockets for every address of ``host`` (as asyncio binds them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                # the same port on every address, as asyncio does not; take the first's
                addr = (addr[0], socks[0].getsockname()[1]) + tuple(addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def start(opts, loop=None):
    """Start a balancer; returns ``(proxy, listener)``. Raises OSError if it cannot listen."""
    loop = loop or asyncio.get_running_loop()
    proxy = Proxy(opts, loop)
    socks = _listen_sockets(opts.listen_host, opts.listen_port, opts.backlog)
    listener = Listener(loop, socks, lambda: ClientProtocol(proxy))
    listener.start()
    proxy.start()
    proxy.start_health(opts.health if opts.health is not None else HealthConfig())
    return proxy, listener


async def drain(proxy, listener, timeout, interrupt=None):
    """Stop accepting, let requests in flight finish (for up to ``timeout``
    seconds, or until ``interrupt`` is done), then close everything.
    Returns the number of client connections that were still open at the end."""
    loop = asyncio.get_running_loop()
    listener.close()
    proxy.start_drain()
    deadline = loop.time() + timeout
    while proxy.clients and loop.time() < deadline:
        if interrupt is not None and interrupt.done():
            break
        await asyncio.sleep(DRAIN_POLL)
    left = len(proxy.clients)
    proxy.close()
    await proxy.wait_closed()
    return left


async def serve(opts, ready=None):
    """Run until SIGINT or SIGTERM, then drain."""
    loop = asyncio.get_running_loop()
    proxy, listener = await start(opts, loop)
    stop = loop.create_future()
    now = loop.create_future()
    signals = []

    def on_stop(signame):
        if not stop.done():
            stop.set_result(signame)
        elif not now.done():
            log.warning("%s again: stopping now", signame)
            now.set_result(None)

    def on_hup():
        log.warning("SIGHUP: nothing to reload (reloading needs a configuration file); "
                    "carrying on")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig.name)
        signals.append(sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signals.append(signal.SIGHUP)
    addrs = ", ".join(_fmt(s.getsockname()) for s in listener.sockets)
    log.info("fastlb %s (%s core) listening on %s -> %s", _version(), core.IMPL, addrs,
             ", ".join(b.url for b in proxy.backends))
    if ready is not None:
        ready(proxy, listener)
    try:
        signame = await stop
        busy = sum(1 for c in proxy.clients if c.in_flight())
        log.info("%s: draining: %d request(s) in flight, %d connection(s); "
                 "up to %gs (send %s again to stop now)", signame, busy, len(proxy.clients),
                 opts.drain_timeout, signame)
        left = await drain(proxy, listener, opts.drain_timeout, now)
        if left:
            log.warning("drain ended with %d connection(s) still open: closed", left)
        else:
            log.info("drained: every request finished; exiting")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        listener.close()
        proxy.close()
        await proxy.wait_closed()


def _fmt(sockname):
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _version():
    from fastlb import __version__

    return __version__


def new_event_loop():
    import uvloop

    return uvloop.new_event_loop()


def run(coro):
    """Run a coroutine on a fresh uvloop event loop."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
