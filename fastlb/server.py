"""The running balancer: options, the listener, signals, draining and shutdown.

Listening. When ``accept()`` fails for lack of file descriptors, libuv
drops waiting connections or uvloop closes the listening socket, turning a
moment of pressure into lost clients or an outage. ``Listener`` keeps the
socket itself and stops accepting *before* fds run out (connections then
wait in the kernel's backlog, as in nginx), and serves the socket again if
uvloop ever lets go of it. A TLS listener's servers do the handshake
(uvloop's SSL protocol, with the listener's ``ServerTLS`` context and
handshake timeout) before its ``ClientProtocol`` sees the connection; a
handshake that fails is at most a debug line (``_loop_exception``).

Stopping. SIGTERM and SIGINT start a drain: stop accepting at once, close
idle keep-alive connections, let requests in flight finish (their responses
say ``Connection: close``) and Upgrade tunnels go on, for up to
``drain_timeout`` seconds, then close what is left and exit. A
second SIGTERM or SIGINT stops at once. SIGHUP never stops the process: with
a configuration file it reloads it (``reload``: an invalid file changes
nothing), else it is logged.
"""
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import ssl

from fastlb import core
from fastlb.config.model import Config
from fastlb.proxy import ClientProtocol, Proxy
from fastlb.runtime import build
from fastlb.runtime.shm import TableFull
from fastlb.runtime.tls import SHUTDOWN_TIMEOUT as TLS_SHUTDOWN_TIMEOUT

log = logging.getLogger("fastlb")

ACCEPT_PAUSE = 0.1      # seconds without accepting while fds are short
WATCH_EVERY = 0.25      # seconds between checks that uvloop still accepts
DRAIN_POLL = 0.05       # seconds between checks of a drain's progress



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
    upgrade: bool = True                 # Upgrade requests become tunnels (False: 501)
    tunnel_timeout: float = 3600.0       # a tunnel idle (no byte either way) this long closes
    trusted_proxies: tuple = ()          # CIDR strings whose X-Forwarded-For is believed
    tls: object = None                   # fastlb.config.model.TLSConfig: TLS termination
    schemes: tuple = ()                  # per backend, "http" or "https"; () = all http
    backend_tls: object = None           # fastlb.config.model.BackendTLSConfig (https ones)
    proxy_protocol: bool = False         # connections start with a PROXY protocol header...
    proxy_protocol_from: tuple = ()      # ... from these CIDR networks (): from every peer
    send_proxy_protocol: object = None   # "v1" or "v2": a PROXY header to the backends
    request_id: bool = False             # give requests an id (see README, Observability)
    request_id_header: str = "X-Request-Id"  # ... in this field
    access_log: str = "off"              # "-", a path, or "off"
    access_log_format: str = "combined"  # "combined", "json" or "combined_id"
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
    workers: int = 1                     # processes serving traffic (see fastlb.runtime.master)


class Listener:
    """Listening sockets served by uvloop's own (C) accept path, that never die.

    fastlb keeps each listening socket itself and gives uvloop a duplicate
    of it. Closing the duplicate stops accepting while the socket, and the
    connections waiting in its backlog, stay; a new duplicate starts again.
    That gives what asyncio lacks, a pause:

    * ``pause()`` (the data path calls it when fastlb's own connections come
      near the fd limit, before ``accept()`` could fail): accepting stops
      for ACCEPT_PAUSE seconds at a time until there is room again, logged
      once per episode;
    * a watchdog: if uvloop's server on a duplicate goes away (closed
      after an accept error, or the duplicate fails to open), the watchdog
      notices within WATCH_EVERY seconds and serves the socket again from a
      fresh duplicate, with one retry chain at a time.

    The surface of ``asyncio.Server`` that fastlb and its tests use:
    ``sockets``, ``close()``, ``wait_closed()``, ``is_serving()``.
    """

    def __init__(self, loop, socks, protocol_factory, backlog=1024, room=None, tls=None):
        self._loop = loop
        self._tls = None            # (ssl context, handshake timeout) of a TLS listener
        if tls is not None:
            self._tls = (tls.context, tls.handshake_timeout)
        self.sockets = list(socks)
        self._inodes = [os.fstat(s.fileno()).st_ino for s in self.sockets]
        self._factory = protocol_factory
        self._backlog = backlog
        self._room = room           # () -> bool: fds to spare for new connections
        self._servers = [None] * len(self.sockets)   # uvloop servers on duplicates
        self._fds = [-1] * len(self.sockets)
        self._closed = False
        self._paused = False
        self._pressure = False      # in an episode of shortage (logged once)
        self._busy = False          # (re)starting servers
        self._watch = None
        self._retry = None          # the pending retry of a failed (re)start
        self.pauses = 0             # pauses for shortage, since start
        self.restarts = 0           # accept sockets lost by uvloop and served again

    async def start(self):
        await self._serve_all()
        self._watch = self._loop.call_later(WATCH_EVERY, self._watchdog)

    async def _serve_all(self):
        if self._busy:
            return
        self._busy = True
        try:
            for i, sock in enumerate(self.sockets):
                if self._closed or self._paused:
                    return
                if self._servers[i] is not None and self._alive(i):
                    continue
                dup = sock.dup()
                try:
                    if self._tls is None:
                        srv = await self._loop.create_server(self._factory, sock=dup,
                                                             backlog=self._backlog)
                    else:
                        ctx, timeout = self._tls
                        srv = await self._loop.create_server(
                            self._factory, sock=dup, backlog=self._backlog, ssl=ctx,
                            ssl_handshake_timeout=timeout,
                            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
                except BaseException:
                    dup.close()
                    raise
                self._servers[i] = srv
                self._fds[i] = srv.sockets[0].fileno()
        finally:
            self._busy = False

    def _alive(self, i):
        try:
            return os.fstat(self._fds[i]).st_ino == self._inodes[i]
        except OSError:
            return False

    def _stop_servers(self):
        for i, srv in enumerate(self._servers):
            if srv is not None:
                self._servers[i] = None
                self._fds[i] = -1
                srv.close()

    def set_tls(self, tls):
        """Serve with ``tls`` (a ``fastlb.runtime.tls.ServerTLS``, or None:
        plain) from now on: when its context or handshake timeout is not
        the one served with, the servers start again on the same sockets
        (connections wait in the backlog meanwhile; open ones are kept)."""
        want = None if tls is None else (tls.context, tls.handshake_timeout)
        if want == self._tls:
            return
        self._tls = want
        if self._closed or self._paused:
            return      # started with it when accepting resumes
        self._stop_servers()
        self._restart()

    def pause(self, why):
        """Stop accepting for a while: new connections wait in the backlog."""
        if self._paused or self._closed:
            return
        self._paused = True
        self.pauses += 1
        if not self._pressure:
            self._pressure = True
            log.warning("not accepting new connections for now: %s (they wait in the "
                        "backlog; raise the fd limit with ulimit -n)", why)
        self._stop_servers()
        self._loop.call_later(ACCEPT_PAUSE, self._try_resume)

    def _try_resume(self):
        if self._closed or not self._paused:
            return
        if self._room is not None and not self._room():
            self._loop.call_later(ACCEPT_PAUSE, self._try_resume)
            return
        self._paused = False
        self._restart()

    def _restart(self):
        if self._retry is not None:
            return              # a retry is already due: one chain only
        task = self._loop.create_task(self._serve_all())
        task.add_done_callback(self._restarted)

    def _restarted(self, task):
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            # no fd for a duplicate yet: try again shortly
            if not self._pressure:
                self._pressure = True
                log.warning("cannot accept connections: %s; retrying every %gs",
                            getattr(exc, "strerror", None) or exc, ACCEPT_PAUSE)
            if self._retry is None:
                self._retry = self._loop.call_later(ACCEPT_PAUSE, self._retry_now)
            return
        if self._pressure and not self._paused and not self._closed:
            self._pressure = False
            log.warning("accepting connections again")

    def _retry_now(self):
        self._retry = None
        self._restart()

    def _watchdog(self):
        self._watch = None
        if self._closed:
            return
        if not self._paused and not self._busy:
            for i in range(len(self.sockets)):
                if self._servers[i] is not None and not self._alive(i):
                    # uvloop closed its duplicate after accept() failed
                    self._servers[i] = None
                    self.restarts += 1
                    if not self._pressure:
                        self._pressure = True
                        log.warning("accept failed (out of fds or memory?): serving the "
                                    "listening socket again")
            if None in self._servers:
                self._restart()
        self._watch = self._loop.call_later(WATCH_EVERY, self._watchdog)

    def is_serving(self):
        return not self._closed

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._stop_servers()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self):
        return None


def _listen_sockets(host, port, backlog, reuseport=False):
    """Bound, listening sockets for every address of ``host`` (as asyncio binds them);
    ``reuseport``: with SO_REUSEPORT, for one set per worker on the same port."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


class ListenError(OSError):
    """A listener's address cannot be listened on: ``listener`` (its name),
    ``bind`` (``host:port``), and the OSError's errno and strerror."""

    def __init__(self, lc, err):
        super().__init__(err.errno, err.strerror or str(err))
        self.listener = lc.name
        self.bind = lc.bind


def _bind(lc, reuseport=False, port=None):
    try:
        return _listen_sockets(lc.host, lc.port if port is None else port, lc.backlog,
                               reuseport)
    except OSError as e:
        raise ListenError(lc, e) from None


async def _start_front(proxy, front, loop, socks=None):
    lc = front.config
    if socks is None:
        socks = _bind(lc)
    listener = Listener(loop, socks, lambda: ClientProtocol(proxy, front), lc.backlog,
                        room=proxy.fd_room, tls=front.tls)
    front.listener = listener
    try:
        await listener.start()
    except BaseException:
        front.listener = None
        listener.close()
        raise
    return listener


async def start(opts, loop=None, sockets=None, shared=None):
    """Start a balancer for ``opts`` (``Options`` or a ``fastlb.config.Config``);
    returns ``(proxy, listener)`` (the first listener; every one is
    ``front.listener`` of ``proxy.fronts``). Raises OSError if it cannot listen.

    A worker passes ``sockets`` (listener name -> its listening sockets, made
    by the master) and ``shared`` (see ``fastlb.runtime.worker``: also the
    counter table, rows and slot it counts in; see ``Proxy``)."""
    loop = loop or asyncio.get_running_loop()
    proxy = Proxy(opts, loop, shared)
    try:
        for front in proxy.fronts.values():
            await _start_front(proxy, front, loop,
                               sockets.get(front.name) if sockets is not None else None)
    except BaseException:
        _close_listeners(proxy)
        proxy.close()
        raise
    build.publish(proxy)
    proxy.start()
    proxy.start_health()
    return proxy, proxy.listener


def _close_listeners(proxy):
    for front in proxy.fronts.values():
        if front.listener is not None:
            front.listener.close()


async def reload(proxy, config):
    """Run ``config`` (valid: see ``fastlb.config``) from now on, without
    dropping a connection (see ``fastlb.runtime.build``). Returns the
    one-line summary of what changed. Raises OSError if a new listener
    cannot listen, or ``TableFull`` if the counter table has no room for the
    new backends or listeners; then nothing has changed."""
    loop = asyncio.get_running_loop()
    plan = build.plan(proxy, config)
    # open the new listeners' sockets first: if one cannot be bound, the
    # old configuration stays as it is
    # (a port a removed listener holds, however its address is spelled, is
    # bound after that listener closes)
    moved = {f.config.port for f in plan.fronts_remove if f.config.port}
    pending = []
    try:
        for lc in plan.fronts_add:
            if lc.port in moved:
                continue
            pending.append((lc, _bind(lc)))
        build.place(proxy, plan)    # last: once it succeeds, the plan is applied
    except BaseException:
        for _, socks in pending:
            for sock in socks:
                sock.close()
        raise
    added, removed = build.apply(proxy, plan)
    for front in removed:
        if front.listener is not None:
            front.listener.close()
    for front, _ in plan.fronts_keep:
        if front.listener is not None:
            front.listener.set_tls(front.tls)   # TLS turned on or off, another timeout
    ready = dict((lc.name, socks) for lc, socks in pending)
    for front in added:
        lc = front.config
        socks = ready.pop(lc.name, None)
        if socks is None:
            socks = _bind(lc)
        listener = Listener(loop, socks, lambda f=front: ClientProtocol(proxy, f), lc.backlog,
                            room=proxy.fd_room, tls=front.tls)
        front.listener = listener
        await listener.start()
    build.publish(proxy)
    proxy.start_health()
    return plan.summary()


async def drain(proxy, listener, timeout, interrupt=None):
    """Stop accepting, let requests in flight finish and tunnels go on (for up
    to ``timeout`` seconds, or until ``interrupt`` is done), then close
    everything. Returns ``(connections, tunnels)``: the client connections
    that were still open at the end, and how many of them were tunnels."""
    loop = asyncio.get_running_loop()
    if listener is not None:
        listener.close()
    _close_listeners(proxy)
    proxy.start_drain()
    deadline = loop.time() + timeout
    while proxy.clients and loop.time() < deadline:
        if interrupt is not None and interrupt.done():
            break
        await asyncio.sleep(DRAIN_POLL)
    left = len(proxy.clients), proxy.tunnels
    proxy.close()
    await proxy.wait_closed()
    return left


async def serve(opts, ready=None, load_config=None, sockets=None, shared=None,
                etcd_config=None):
    """Run until SIGINT or SIGTERM, then drain. ``load_config``: a function
    that reads the configuration again (SIGHUP reloads with it; it raises
    ``fastlb.errors.ConfigError`` listing the problems of an invalid one).
    Pools with ``discovery`` get their backends from it
    (``fastlb.runtime.discovery``), and ``etcd_config`` (an
    ``EtcdConfig``) makes each new configuration in etcd a reload.

    A worker (``shared`` given, see ``fastlb.runtime.worker``) serves the
    master's ``sockets``; its master reloads by replacing it (and runs the
    discovery), so SIGHUP is ignored here, and the master says where it
    listens."""
    loop = asyncio.get_running_loop()
    runner = None
    base = opts
    if shared is None and isinstance(opts, Config):
        # also without discovery now: a reload may bring a pool that has one
        from fastlb.runtime.discovery import Discovery

        runner = Discovery(etcd_config)
        opts = await runner.prime(opts)
    try:
        proxy, listener = await start(opts, loop, sockets, shared)
    except BaseException:
        if runner is not None:
            await runner.stop()
        raise
    stop = loop.create_future()
    now = loop.create_future()
    signals = []
    reloading = []
    again = [False]

    def on_stop(signame):
        if not stop.done():
            stop.set_result(signame)
        elif not now.done():
            log.warning("%s again: stopping now", signame)
            now.set_result(None)

    def on_hup():
        if shared is not None:
            return          # the master reloads, by starting new workers
        if load_config is None:
            log.warning("SIGHUP: nothing to reload (reloading needs a configuration file); "
                        "carrying on")
            return
        if stop.done():
            log.warning("SIGHUP while stopping: not reloading")
            return
        if reloading:
            again[0] = True     # read the file once more when this reload is done
            return
        task = loop.create_task(_reload_from(controller, load_config, info))
        reloading.append(task)
        task.add_done_callback(reloaded)

    def reloaded(task):
        reloading.remove(task)
        if again[0]:
            again[0] = False
            on_hup()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop, sig.name)
        signals.append(sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signals.append(signal.SIGHUP)
    from fastlb.runtime.control import ProcessController

    admin = None
    info = _Info()
    controller = ProcessController(proxy, info)
    if runner is not None:
        controller.base = base
        runner.attach(controller)
    if shared is None:
        log_listening(proxy.config, {name: f.listener.sockets
                                     for name, f in proxy.fronts.items()})
        if proxy.config.admin is not None:
            from fastlb.observe.admin import start_admin
            from fastlb.observe.sources import ProcessSource

            try:
                admin = await start_admin(ProcessSource(proxy, info, controller),
                                          proxy.config.admin)
            except OSError as e:
                if runner is not None:
                    await runner.stop()
                _close_listeners(proxy)
                proxy.close()
                await proxy.wait_closed()
                raise ListenError(_AdminPlace(proxy.config.admin), e) from None
    if ready is not None:
        ready(proxy, listener)
    try:
        signame = await stop
        if runner is not None:
            await runner.stop()
            runner = None
        for task in list(reloading):
            await task
        busy = sum(1 for c in proxy.clients if c.in_flight())
        timeout = proxy.config.drain_timeout
        # a worker's drain is one of several: the master says it once
        say = log.info if shared is None else log.debug
        say("%s: draining: %d request(s) in flight, %d tunnel(s), %d connection(s); "
            "up to %gs (send %s again to stop now)", signame, busy, proxy.tunnels,
            len(proxy.clients), timeout, signame)
        left, tunnels = await drain(proxy, None, timeout, now)
        if left:
            log.warning("drain ended with %d connection(s) still open (%d tunnel(s)): closed",
                        left, tunnels)
        else:
            say("drained: every request finished; exiting")
    finally:
        if runner is not None:
            await runner.stop()
        if admin is not None:
            admin.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        _close_listeners(proxy)
        proxy.close()
        await proxy.wait_closed()


def log_listening(config, sockets, workers=None):
    """The "listening on" line of each listener (``sockets``: name -> its sockets)."""
    for name, lc in config.listeners.items():
        addrs = ", ".join(_fmt(s.getsockname()) for s in sockets[name])
        pools = lc.pools_used()
        where = ((", ".join(f"{b.scheme}://{b.address}" for b in config.pools[pools[0]].backends)
                  or f"pool {pools[0]} (no backend yet)")
                 if len(pools) == 1 and not lc.routes
                 else f"{len(lc.routes)} routes, pools {', '.join(pools)}")
        tls = ""
        if lc.tls is not None:
            names = [n for c in lc.tls.certificates for n in c.names]
            n = len(lc.tls.certificates)
            tls = (f" (TLS, {n} certificate{'s' if n > 1 else ''}"
                   + (f": {', '.join(dict.fromkeys(names))}" if names else "") + ")")
        log.info("fastlb %s (%s core) listening on %s -> %s%s%s", _version(), core.IMPL, addrs,
                 where, tls, f" ({workers} workers)" if workers else "")
    if config.hooks is not None:
        log.info("hooks %s: %s (run on the event loop)", config.hooks.module,
                 ", ".join(config.hooks.defined))


class _Info:
    """What the status page says of the process besides the proxy."""

    def __init__(self):
        import time

        self.started = time.time()
        self.reloads = 0
        self.last_reload = None     # (time.time(), result)

    def reloaded(self, result):
        import time

        if result == "ok":
            self.reloads += 1
        self.last_reload = (time.time(), result)


class _AdminPlace:
    """The admin listener, named as ListenError names a listener."""

    def __init__(self, admin):
        self.name = "admin"
        self.bind = admin.bind


async def _reload_from(controller, load_config, info=None):
    """SIGHUP: load the configuration again and run it (through ``controller``,
    a ``fastlb.runtime.control.Controller``); every outcome is logged."""
    from fastlb.errors import ConfigError

    log.info("SIGHUP: reloading the configuration")
    def refused(why):
        log.error("reload refused, the running configuration is unchanged:%s", why)
        if info is not None:
            info.reloaded("refused")

    try:
        config = load_config()
    except ConfigError as e:
        refused(f"\n{e}")
        return
    except OSError as e:
        refused(f" {e}")
        return
    try:
        summary = await controller.reload_base(config)
    except ListenError as e:
        refused(f" cannot listen on {e.bind} (listener {e.listener}): {e.strerror}")
        return
    except TableFull as e:
        refused(f" {e}")
        return
    except Exception:
        # a bug, not a bad file: say so, keep serving what runs
        log.exception("reload failed")
        if info is not None:
            info.reloaded("failed")
        return
    if config.source is not None:
        logging.getLogger().setLevel(config.log_level.upper())
    log.info("reloaded (%s): %s", config.summary(), summary)


def _fmt(sockname):
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _version():
    from fastlb import __version__

    return __version__


def new_event_loop():
    import uvloop

    return uvloop.new_event_loop()


def _loop_exception(loop, context):
    """The event loop's exception handler: what a TLS peer does wrong (a
    failed handshake, plain HTTP on a TLS port, a reset mid-handshake) is no
    error of fastlb's, so it is a debug line, never a traceback; everything
    else goes to asyncio's default handler."""
    exc = context.get("exception")
    proto = context.get("protocol")
    if isinstance(exc, ssl.SSLError) or (
            isinstance(exc, OSError) and "SSL" in type(proto).__name__):
        log.debug("TLS: %s: %s", context.get("message"), exc)
        return
    loop.default_exception_handler(context)


def run(coro):
    """Run a coroutine on a fresh uvloop event loop."""
    loop = new_event_loop()
    loop.set_exception_handler(_loop_exception)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
