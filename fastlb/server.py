"""The running balancer: options, backends, the ticker, the listener and shutdown."""
import asyncio
import dataclasses
import logging
import signal

from fastlb import core
from fastlb.health import HealthConfig
from fastlb.proxy import ClientProtocol, Proxy

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
    retries: int = 2                     # more backends tried after a failure (see README)
    retry_timeout: float = 10.0          # no new try this long after the request arrived
    health: object = None                # fastlb.health.HealthConfig; None: defaults
    weights: tuple = ()                  # per backend; () = all 1
    algorithm: str = "round-robin"       # one of fastlb.selection.ALGORITHMS
    hash_key: str = "ip"                 # hashing: ip, path, header:NAME, cookie:NAME, query:NAME
    hash_balance_factor: float = 0.0     # hashing: bounded load (0 = off, else >= 1)
    backlog: int = 1024


async def start(opts, loop=None):
    """Start a balancer; returns ``(proxy, server)``. Raises OSError if it cannot listen."""
    loop = loop or asyncio.get_running_loop()
    proxy = Proxy(opts, loop)
    server = await loop.create_server(
        lambda: ClientProtocol(proxy), opts.listen_host, opts.listen_port,
        reuse_address=True, backlog=opts.backlog)
    proxy.start()
    proxy.start_health(opts.health if opts.health is not None else HealthConfig())
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
        await proxy.wait_closed()
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
