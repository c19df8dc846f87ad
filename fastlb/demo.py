"""``fastlb demo``: three small backends on free local ports, the balancer in front,
a burst of requests through it, and a report of how they were spread."""
import asyncio
import signal
import time

from fastlb import server as _server
from fastlb.cli import options_from_args


class DemoBackend(asyncio.Protocol):
    """A tiny keep-alive HTTP/1.1 server answering every request with its own name."""

    def __init__(self, name):
        self.name = name
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            lines = head.split(b"\r\n")
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            self.buf = self.buf[length:]  # demo requests carry tiny bodies, if any
            body = f"hello from {self.name}\n".encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Backend: " + self.name.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            if close:
                self.transport.close()
                return


async def start_backends(addresses):
    """A DemoBackend server on each ``(host, port)`` of ``addresses`` (a dict
    address -> name); returns the servers. OSError names the address."""
    loop = asyncio.get_running_loop()
    servers = []
    try:
        for (host, port), name in addresses.items():
            try:
                servers.append(await loop.create_server(lambda n=name: DemoBackend(n),
                                                        host, port))
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") \
                    from None
    except BaseException:
        for srv in servers:
            srv.close()
        raise
    return servers


async def _get(reader, writer, host):
    writer.write(b"GET /demo HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: fastlb-demo\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    backend = "?"
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"x-backend":
            backend = value.strip().decode()
    await reader.readexactly(length)
    return int(head[9:12]), backend


async def _burst(host, port, total, concurrency):
    counts = {}
    latencies = []
    errors = 0
    todo = iter(range(total))
    hosthdr = f"{host}:{port}".encode()

    async def worker():
        nonlocal errors
        reader = writer = None
        for _ in todo:
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status, backend = await asyncio.wait_for(_get(reader, writer, hosthdr), 10)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                errors += 1
                if writer is not None:
                    writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            key = backend if status == 200 else f"status {status}"
            counts[key] = counts.get(key, 0) + 1
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return counts, sorted(latencies), errors, time.perf_counter() - t0


def _pct(values, p):
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p))] * 1000.0


async def _demo(args):
    loop = asyncio.get_running_loop()
    backends = []
    servers = []
    for i in range(3):
        name = f"backend-{i + 1}"
        srv = await loop.create_server(lambda n=name: DemoBackend(n), "127.0.0.1", 0)
        servers.append(srv)
        backends.append(("127.0.0.1", srv.sockets[0].getsockname()[1]))
    opts = options_from_args(args, backends)
    try:
        proxy, lb = await _server.start(opts, loop)
    except OSError as e:
        from fastlb.errors import ConfigError

        raise ConfigError(f"cannot listen on {args.listen}: {e.strerror or e}") from None
    host, port = lb.sockets[0].getsockname()[:2]
    print(f"fastlb demo: balancer on http://{host}:{port}/ in front of")
    for b in proxy.backends:
        print(f"  {b.url}")
    print(f"sending {args.requests} requests over {args.concurrency} keep-alive connections...")
    counts, lat, errors, took = await _burst(host, port, args.requests, args.concurrency)
    done = sum(counts.values())
    print(f"{done} responses, {errors} errors in {took:.2f}s ({done / took:.0f} requests/s)")
    for name in sorted(counts):
        print(f"  {name}: {counts[name]} ({100.0 * counts[name] / max(done, 1):.1f}%)")
    print(f"latency ms: p50 {_pct(lat, 0.5):.2f}  p90 {_pct(lat, 0.9):.2f}  "
          f"p99 {_pct(lat, 0.99):.2f}  max {_pct(lat, 1.0):.2f}")
    stop = asyncio.Event()
    signals = () if args.exit_after else (signal.SIGINT, signal.SIGTERM)
    try:
        if not args.exit_after:
            # Ctrl-C or SIGTERM ends the wait inside the loop, so the balancer
            # and the backends are closed while it still runs
            for sig in signals:
                loop.add_signal_handler(sig, stop.set)
            print(f"serving on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
            await stop.wait()
            print("stopped", flush=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        lb.close()
        proxy.close()
        await proxy.wait_closed()
        for srv in servers:
            srv.close()
    return 0 if errors == 0 else 1


def run_demo(args):
    try:
        return _server.run(_demo(args))
    except KeyboardInterrupt:
        return 0
