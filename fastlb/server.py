"""The running balancer: options, backends, the ticker, the listener and shutdown."""
import asyncio
import dataclasses
import logging
import signal

from fastlb import core
from fastlb.accesslog import AccessLog
from fastlb.proxy import Backend, ClientProtocol, UpstreamProtocol

log = logging.getLogger("fastlb")


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
    access_log: str = "off"              # "-", a path, or "off"
    via: bool = True
    backlog: int = 1024


class Proxy:
    """State shared by every connection of one balancer."""

    def __init__(self, opts, loop):
        self.opts = opts
        self.loop = loop
        self.backends = [Backend(i, h, p, opts.upstream_max_idle)
                         for i, (h, p) in enumerate(opts.backends)]
        self.balancer = core.RoundRobin([1] * len(self.backends))
        self.clients = set()
        self.connect_timeout = opts.connect_timeout
        self.response_timeout = opts.response_timeout
        self.header_timeout = opts.header_timeout
        self.keepalive_timeout = opts.keepalive_timeout
        self.max_header_size = opts.max_header_size
        self.proto = b"http"
        self.via = b"fastlb" if opts.via else None
        self.log = None if opts.access_log == "off" else AccessLog(opts.access_log)
        self.now = loop.time()
        self.tick = min(0.25, opts.header_timeout / 4, opts.response_timeout / 4,
                        opts.keepalive_timeout / 4, opts.upstream_idle_timeout / 4)
        self._ticker = None
        self._tasks = set()

    # -------------------------------------------------------- timers

    def start(self):
        self._ticker = self.loop.call_later(self.tick, self._tick)

    def _tick(self):
        now = self.now = self.loop.time()
        for client in [c for c in self.clients if c.deadline < now]:
            client.timed_out(now)
        cutoff = now - self.opts.upstream_idle_timeout
        for b in self.backends:
            if b.idle:
                b.sweep_idle(cutoff)
        if self.log is not None:
            self.log.refresh_stamp()
            self.log.flush()
        self._ticker = self.loop.call_later(self.tick, self._tick)

    # -------------------------------------------------------- upstream connections

    def connect(self, backend, client, gen):
        task = self.loop.create_task(self._connect(backend, client, gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, backend, client, gen):
        backend.connecting += 1
        try:
            _, up = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamProtocol(backend, self), backend.host, backend.port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            client.upstream_connect_failed(backend, "connect timeout", gen)
            return
        except OSError as e:
            client.upstream_connect_failed(backend, e.strerror or str(e), gen)
            return
        finally:
            backend.connecting -= 1
        client.upstream_connected(up, gen)

    def release_fresh(self, up):
        """A connection made for a client that went away: keep it for the next one."""
        up.reused = True
        up.backend.push_idle(up, self.now)

    def note_failure(self, backend, reason):
        backend.failures += 1
        log.warning("backend %s: %s", backend.url, reason)

    # -------------------------------------------------------- access log

    def log_request(self, client, status):
        line = client.line
        client.line = None
        if line is None:
            line = b"-"
            ms = 0.0
        else:
            ms = (self.loop.time() - client.started) * 1000.0
        backend = client.backend.url if client.backend is not None else "-"
        self.log.add(
            f'{client.client_ip.decode()} [{self.log.stamp}] '
            f'"{line.decode("latin-1")}" {status} {client.sent} {backend} {ms:.2f}ms\n')

    # -------------------------------------------------------- shutdown

    def close(self):
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for b in self.backends:
            b.close_idle()
        for c in list(self.clients):
            c.transport.close()
        for t in list(self._tasks):
            t.cancel()
        if self.log is not None:
            self.log.close()


async def start(opts, loop=None):
    """Start a balancer; returns ``(proxy, server)``. Raises OSError if it cannot listen."""
    loop = loop or asyncio.get_running_loop()
    proxy = Proxy(opts, loop)
    server = await loop.create_server(
        lambda: ClientProtocol(proxy), opts.listen_host, opts.listen_port,
        reuse_address=True, backlog=opts.backlog)
    proxy.start()
    return proxy, server


async def serve(opts, ready=None):
    """Run until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    proxy, server = await start(opts, loop)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    addrs = ", ".join(_fmt(s.getsockname()) for s in server.sockets)
    log.info("fastlb %s (%s core) listening on %s -> %s", _version(), core.IMPL, addrs,
             ", ".join(b.url for b in proxy.backends))
    if ready is not None:
        ready(proxy, server)
    try:
        await stop
    finally:
        server.close()
        proxy.close()
        await server.wait_closed()


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
