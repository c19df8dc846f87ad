"""The data path in memory: requests through ClientProtocol/UpstreamProtocol with
stand-in transports, so no socket, no syscall and no other process is measured.

    python bench/inmem.py [--algorithm NAME] [--hash-key KEY] [--requests N]
                          [--access-log PATH [--access-log-format combined|json|combined_id]]
                          [--routes N] [--hooks MODULE|FILE] [--request-id [--client-id]]

prints the CPU time per request of fastlb's own user-space work (the core,
httptools, the data path and CPython). Under valgrind it gives the steadiest
figure this machine has, instructions per request::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/inmem.py -r 1 -n 2000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/inmem.py -r 1 -n 12000

(the difference of the two totals, divided by 10000). The active switch
applies: FASTLB_NO_EXTENSIONS=1 measures the pure-Python core and data path.
``--access-log /dev/null`` measures the cost of the access log (the lines are
formatted, batched and written by the log thread as in ``fastlb serve``).
``--routes N`` puts N routes on the listener, half exact hosts and half path
prefixes, of which only the last matches the request (the cost of routing).
``--connection-per-request`` opens a new client connection for every request
(``connection_made``, the request, its response, ``connection_lost``): what a
client that never reuses its connection costs, the per-connection work included.
``--proxy-protocol v1|v2`` (with ``--connection-per-request``): the listener
reads a PROXY protocol header, sent with each connection's request.
``--hooks FILE`` runs the Python hooks of FILE (``bench/hooks/``: an empty
route hook, one that reads a header, one that adds a field).
``--request-id`` turns request ids on (each request gets a new one, sent to
the backend and added to the response); with ``--client-id`` the request
carries a valid X-Request-Id of its own, which is kept.
"""
import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlb import core, proxy  # noqa: E402
from fastlb.server import Options  # noqa: E402

# The 9-header browser request of the end-to-end benchmark, and a small response.
REQUEST = (
    b"GET /index.html?q=1 HTTP/1.1\r\nHost: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=abcdef0123456789abcdef0123456789; theme=dark; lang=en\r\n"
    b"Upgrade-Insecure-Requests: 1\r\nCache-Control: max-age=0\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\r\n"
    b"0123456789abcde\n"
)


class NullTransport:
    """Accepts writes and discards them; reports a fixed peer."""

    def write(self, data):
        pass

    def writelines(self, data):
        pass

    def get_write_buffer_size(self):
        return 0

    def get_extra_info(self, name, default=None):
        return ("10.1.2.3", 50000) if name == "peername" else default

    def close(self):
        pass

    def abort(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def with_routes(opts, n):
    """The Config of ``opts`` with ``n`` routes: exact hosts and path
    prefixes that miss the benchmark's request, then one prefix that takes it."""
    import dataclasses

    from fastlb.config import RouteConfig
    from fastlb.runtime import build as rt_build

    config = rt_build.as_config(opts)
    (name, li), = config.listeners.items()
    routes = []
    for i in range(n - 1):
        if i % 2:
            routes.append(RouteConfig(pool=name, host=f"h{i}.example.com"))
        else:
            routes.append(RouteConfig(pool=name, path_prefix=f"/p{i}/"))
    routes.append(RouteConfig(pool=name, path_prefix="/index"))
    li = dataclasses.replace(li, routes=tuple(routes), default_pool=None)
    return dataclasses.replace(config, listeners={name: li})


def with_hooks(opts, spec):
    """The Config of ``opts`` (Options or a Config) with the hooks of ``spec``."""
    import dataclasses

    from fastlb.hooks import configure
    from fastlb.runtime import build as rt_build

    return dataclasses.replace(rt_build.as_config(opts), hooks=configure(spec))


CLIENT_ID = b"X-Request-Id: 8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60\r\n"


def build(algorithm="round-robin", hash_key="ip", backends=3, routes=0, per_connection=False,
          proxy_header=b"", hooks=None, client_id=False, **kw):
    """A Proxy over ``backends`` pooled upstream connections and one client.
    Returns ``run(n)``, which sends n keep-alive requests through it (each
    on a new client connection if ``per_connection``; with ``client_id``
    each with an X-Request-Id); ``kw`` are more ``Options`` (``access_log``,
    ``request_id``, ...); ``hooks``: a hooks module or file."""
    loop = asyncio.new_event_loop()
    opts = Options(backends=tuple(("127.0.0.1", 9000 + i) for i in range(backends)),
                   algorithm=algorithm, hash_key=hash_key, **kw)
    config = with_routes(opts, routes) if routes else opts
    if hooks is not None:
        config = with_hooks(config, hooks)
    p = proxy.Proxy(config, loop)
    for b in p.backends:
        up = proxy.UpstreamProtocol(b, p)
        up.connection_made(NullTransport())
        b.push_idle(up, 0.0)
    client = proxy.ClientProtocol(p)
    client.connection_made(NullTransport())

    # the response is read as uvloop reads it (UpstreamProtocol is a buffered
    # protocol): into the buffer get_buffer gives, written there only when
    # that is a new buffer (the proxy's stays the same one)
    filled = [None]

    def respond(up, resp):
        buf = up.get_buffer(65536)
        if buf is not filled[0]:
            buf[:len(resp)] = resp
            filled[0] = buf
        up.buffer_updated(len(resp))

    def run(n, req=REQUEST, resp=RESPONSE):
        if client_id:
            req = req[:-2] + CLIENT_ID + b"\r\n"
        for _ in range(n):
            client.data_received(req)
            respond(client.up, resp)

    def run_connections(n, req=proxy_header + REQUEST, resp=RESPONSE):
        transport = NullTransport()
        for _ in range(n):
            c = proxy.ClientProtocol(p)
            c.connection_made(transport)
            c.data_received(req)
            respond(c.up, resp)
            c.connection_lost(None)

    return run_connections if per_connection else run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="round-robin")
    ap.add_argument("--hash-key", default="ip")
    ap.add_argument("-n", "--requests", type=int, default=100000)
    ap.add_argument("-r", "--rounds", type=int, default=3, help="timed rounds; the best is shown")
    ap.add_argument("--access-log", default="off", metavar="PATH",
                    help="access log target, e.g. /dev/null (default off)")
    ap.add_argument("--access-log-format", default=None, metavar="FORMAT",
                    help="combined or json (default: fastlb's default)")
    ap.add_argument("--routes", type=int, default=0, metavar="N",
                    help="N routes on the listener, only the last matching (default 0)")
    ap.add_argument("--connection-per-request", action="store_true",
                    help="a new client connection for every request")
    ap.add_argument("--proxy-protocol", choices=["v1", "v2"], default=None,
                    help="with --connection-per-request: each connection starts with a "
                         "PROXY protocol header of this version")
    ap.add_argument("--hooks", default=None, metavar="MODULE|FILE",
                    help="Python hooks, e.g. bench/hooks/empty_route.py (default none)")
    ap.add_argument("--request-id", action="store_true",
                    help="request ids on (default off)")
    ap.add_argument("--client-id", action="store_true",
                    help="the request carries an X-Request-Id (kept with --request-id)")
    args = ap.parse_args()
    kw = {"access_log": args.access_log, "routes": args.routes,
          "per_connection": args.connection_per_request, "hooks": args.hooks,
          "client_id": args.client_id}
    if args.request_id:
        kw["request_id"] = True
    if args.proxy_protocol:
        if not args.connection_per_request:
            ap.error("--proxy-protocol needs --connection-per-request")
        from fastlb.wire.proxyproto import proxy_header

        kw["proxy_protocol"] = True
        kw["proxy_header"] = proxy_header(int(args.proxy_protocol[1]),
                                          ("203.0.113.7", 41234, "198.51.100.1", 443))
    if args.access_log_format is not None:
        kw["access_log_format"] = args.access_log_format
    run = build(args.algorithm, args.hash_key, **kw)
    run(200)
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.process_time()
        run(args.requests)
        best = min(best, time.process_time() - t0)
    print(f"{args.algorithm} ({core.IMPL} core, {proxy.IMPL} data path): "
          f"{best / args.requests * 1e6:.3f} us of CPU per request, user space only")


if __name__ == "__main__":
    main()
