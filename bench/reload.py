"""Reload under load: wrk against ``fastlb serve --config`` while the file
changes and fastlb reloads it every ``--every`` seconds.

    python bench/reload.py [--duration 60] [--every 1] [--connections 32]

One nginx (4 ports, a short static body) serves as the backends. The file
cycles through four shapes: backends added and removed, a route and a pool
added and removed, a second listener added and removed. Prints wrk's
requests/s, its non-2xx responses and socket errors (both must be 0), and
how many reloads fastlb applied. Skips (exit 0, says why) without wrk or
nginx. Bounded: wrk runs ``--duration`` seconds, then everything stops.
"""
import argparse
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e  # noqa: E402

BACKENDS = 4


def shapes(port, extra_port, ports):
    def pool(name, ps):
        urls = ", ".join(f'"http://127.0.0.1:{p}"' for p in ps)
        return f"[pools.{name}]\nbackends = [{urls}]\n"

    web = f'[listeners.web]\nbind = "127.0.0.1:{port}"\ndefault_pool = "app"\n'
    route = '[[listeners.web.routes]]\npath_prefix = "/r/"\npool = "r"\n'
    extra = f'[listeners.extra]\nbind = "127.0.0.1:{extra_port}"\ndefault_pool = "app"\n'
    head = 'log_level = "info"\naccess_log = "off"\n'
    return [
        head + web + pool("app", ports[:2]),
        head + web + route + pool("app", ports[:3]) + pool("r", ports[3:]),
        head + web + route + extra + pool("app", ports[2:]) + pool("r", ports[:1]),
        head + web + extra + pool("app", ports[1:2] + ports[3:]),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between reloads")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "taskset") if e2e.find_tool(t) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed")
        return 0
    with tempfile.TemporaryDirectory(prefix="fastlb-reload-") as workdir:
        ports = [e2e.free_port() for _ in range(BACKENDS)]
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(e2e.nginx_backend_conf(workdir, ports, "backends"))
        backends = e2e.Server("nginx", [e2e.find_tool("nginx"), "-p", workdir, "-c", conf],
                              ports[0], workdir, 1)
        port, extra_port = e2e.free_port(), e2e.free_port()
        texts = shapes(port, extra_port, ports)
        path = os.path.join(workdir, "fastlb.toml")
        with open(path, "w") as f:
            f.write(texts[0])
        env = dict(os.environ, PYTHONPATH=e2e.REPO)
        lb = e2e.Server("fastlb", [args.python, "-m", "fastlb", "serve", "--config", path],
                        port, workdir, 0, env=env)
        try:
            lua = e2e.write_lua(workdir)
            import threading

            result = {}
            t = threading.Thread(target=lambda: result.update(
                e2e.run_wrk(port, args.duration, args.connections, lua, 1)))
            t.start()
            sent = 0
            stop = time.monotonic() + args.duration - 1
            while time.monotonic() < stop and t.is_alive():
                time.sleep(args.every)
                sent += 1
                with open(path + ".new", "w") as f:
                    f.write(texts[sent % len(texts)])
                os.replace(path + ".new", path)
                os.kill(lb.pid, signal.SIGHUP)
            t.join(args.duration + 60)
            log = lb.log_tail(10_000_000)
        finally:
            lb.stop()
            backends.stop()
    applied = log.count("reloaded (")
    refused = log.count("reload refused")
    print(f"wrk {args.duration}s, {args.connections} connections: "
          f"{result.get('rps', 0):,.0f} req/s, {result.get('requests', 0):,} requests, "
          f"non-2xx {result.get('non2xx')}, socket errors {result.get('socket_errors')}")
    print(f"reloads: {sent} sent, {applied} applied, {refused} refused")
    return 0 if result.get("non2xx") == 0 and result.get("socket_errors") == 0 \
        and applied and not refused else 1


if __name__ == "__main__":
    sys.exit(main())
