#!/usr/bin/env python3
"""WebSocket tunnels: message throughput through fastlb against a direct
connection and nginx, and the memory that idle tunnels hold.

Run as a script (``python bench/websocket.py``) it prints a table;
``bench/test_bench_websocket.py`` runs a short version of it under pytest.

What it does
------------
* starts one **backend**: a ``websockets`` echo server (a Python process of
  its own, pinned with the client to CPU 1);
* starts the **proxies under test** on CPU 0, each in front of it:
  ``fastlb-c`` (``python -m fastlb serve``, compiled core) and ``nginx`` (when
  installed: one worker, ``proxy_set_header Upgrade``/``Connection "upgrade"``,
  ``proxy_buffering off``), plus ``direct`` (the client straight at the
  backend: the ceiling of the setup);
* **throughput**: ``-c`` WebSocket connections, each sending a message of
  ``--size`` bytes and waiting for its echo, again and again for
  ``--duration`` seconds (the targets interleaved over ``--rounds`` rounds);
  gives echoed messages per second and the proxy's CPU time (its process
  tree, user + system, from /proc) per echoed message, which is two messages
  relayed (there and back);
* **idle tunnels**: opens ``--tunnels`` WebSocket connections through each
  proxy and leaves them idle; gives the proxy's RSS (VmRSS) before and after,
  and the difference per tunnel (both connections of the tunnel, the client's
  and the backend's, with their buffers and protocol objects).

Nothing is installed: missing ``websockets`` or ``taskset`` is reported by
``missing_tools()``; without nginx its rows are left out (with a note). Only
127.0.0.1 is used; every loop is bounded by ``--duration`` and a timeout.
"""
import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e  # noqa: E402  (the bench helpers: ports, servers, CPU accounting)
from workers import rss_kib, tree_pids  # noqa: E402

INSTALL_HINT = "pip install websockets; apt-get install nginx-light"
TARGETS = ("direct", "fastlb-c", "nginx")


def missing_tools():
    missing = [t for t in ("taskset",) if e2e.find_tool(t) is None]
    try:
        import websockets  # noqa: F401
    except ImportError:
        missing.append("websockets")
    return missing


# ------------------------------------------------------------------ the backend

ECHO_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main(port):
    async with serve(echo, "127.0.0.1", port, max_size=None, compression=None,
                     ping_interval=None):
        await asyncio.Future()

asyncio.run(main(int(sys.argv[1])))
"""


def nginx_ws_conf(workdir, port, backend_port):
    return (e2e._nginx_common(workdir) % {"name": "ws"}) + f"""
http {{
    access_log off;
    client_body_temp_path {workdir}/nw-body;
    proxy_temp_path {workdir}/nw-proxy;
    fastcgi_temp_path {workdir}/nw-fcgi;
    uwsgi_temp_path {workdir}/nw-uwsgi;
    scgi_temp_path {workdir}/nw-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def start_target(name, workdir, backend_port, cpu, python):
    port = e2e.free_port()
    if name == "nginx":
        conf = os.path.join(workdir, "nginx-ws.conf")
        with open(conf, "w") as f:
            f.write(nginx_ws_conf(workdir, port, backend_port))
        return e2e.Server(name, [e2e.find_tool("nginx"), "-p", workdir, "-c", conf], port,
                          workdir, cpu)
    if name == "fastlb-c":
        env = dict(os.environ, FASTLB_REQUIRE_EXTENSIONS="1")
        env.pop("FASTLB_NO_EXTENSIONS", None)
        env["PYTHONPATH"] = e2e.REPO + os.pathsep + env.get("PYTHONPATH", "")
        argv = [python, "-m", "fastlb", "serve", "--listen", f"127.0.0.1:{port}",
                "--backend", f"http://127.0.0.1:{backend_port}", "--access-log", "off",
                "--log-level", "warning"]
        return e2e.Server(name, argv, port, workdir, cpu, env=env)
    raise ValueError(name)


# ------------------------------------------------------------------ the client

async def _echo_loop(port, size, stop_at, counts, errors):
    from websockets.asyncio.client import connect

    message = os.urandom(size)
    try:
        async with connect(f"ws://127.0.0.1:{port}/", max_size=None, compression=None,
                           ping_interval=None, open_timeout=10) as ws:
            while time.monotonic() < stop_at:
                await ws.send(message)
                back = await asyncio.wait_for(ws.recv(), 10)
                if back != message:
                    errors.append("echo differs")
                    return
                counts[0] += 1
    except Exception as e:  # counted: the run must have none
        errors.append(repr(e))


def throughput(port, connections, size, duration):
    """Echoed messages per second over ``connections`` for ``duration`` seconds."""
    counts, errors = [0], []

    async def go():
        stop_at = time.monotonic() + duration
        t0 = time.monotonic()
        await asyncio.wait_for(asyncio.gather(
            *(_echo_loop(port, size, stop_at, counts, errors) for _ in range(connections))),
            duration + 30)
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    return {"messages": counts[0], "mps": counts[0] / elapsed, "errors": errors}


def tree_rss_kib(pid):
    """VmRSS of ``pid`` and its descendants (nginx's master and worker), KiB."""
    return sum(r for r in (rss_kib(p) for p in tree_pids(pid)) if r is not None)


def idle_tunnels(server, n, settle=1.0):
    """Open ``n`` WebSocket connections through ``server``, idle; its RSS around them."""
    from websockets.asyncio.client import connect

    async def go():
        # a few first, so that what every connection needs once is paid before "before"
        warm = [await connect(f"ws://127.0.0.1:{server.port}/", ping_interval=None,
                              compression=None, open_timeout=10) for _ in range(4)]
        for ws in warm:
            await ws.send(b"x")
            await ws.recv()
        await asyncio.sleep(settle)
        before = tree_rss_kib(server.pid)
        held, errors = [], []
        for _ in range(n):
            try:
                ws = await connect(f"ws://127.0.0.1:{server.port}/", ping_interval=None,
                                   compression=None, open_timeout=10)
                await ws.send(b"x")
                await asyncio.wait_for(ws.recv(), 10)
                held.append(ws)
            except Exception as e:  # counted: the run must have none
                errors.append(repr(e))
        await asyncio.sleep(settle)
        after = tree_rss_kib(server.pid)
        for ws in held + warm:
            await ws.close()
        return before, after, len(held), errors

    before, after, opened, errors = asyncio.run(asyncio.wait_for(go(), 120))
    return {"rss_before_kib": before, "rss_after_kib": after, "tunnels": opened,
            "kib_per_tunnel": (after - before) / opened if opened else None, "errors": errors}


def _raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return min(want, hard) if hard != resource.RLIM_INFINITY else want


# ------------------------------------------------------------------ the run

def run(sizes=(64, 16384), connections=16, duration=3.0, rounds=2, tunnels=500,
        targets=TARGETS, out=sys.stderr):
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    python = os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable
    targets = list(targets)
    notes = []
    if "nginx" in targets and e2e.find_tool("nginx") is None:
        targets.remove("nginx")
        notes.append("nginx not installed: skipped")
    if "fastlb-c" in targets and not e2e.fastlb_c_available(python):
        targets.remove("fastlb-c")
        notes.append("compiled core fastlb._core not built: fastlb-c skipped")
    # the children inherit it: the backend holds a connection per tunnel, each proxy two
    limit = _raise_fd_limit(4 * tunnels + 256)
    if limit < 3 * tunnels + 64:
        notes.append(f"fd limit {limit}: fewer tunnels than asked for")
        tunnels = max(0, (limit - 64) // 3)
    workdir = tempfile.mkdtemp(prefix="fastlb-bench-ws-", dir="/tmp")
    servers = {}
    flow = {t: {s: [] for s in sizes} for t in targets}
    memory = {}
    try:
        script = os.path.join(workdir, "echo.py")
        with open(script, "w") as f:
            f.write(ECHO_SERVER)
        bport = e2e.free_port()
        backend = e2e.Server("backend", [python, script, str(bport)], bport, workdir, 1)
        servers["backend"] = backend
        for t in targets:
            if t != "direct":
                servers[t] = start_target(t, workdir, bport, 0, python)
        for t in targets:  # warm-up
            throughput(servers[t].port if t != "direct" else bport, connections, sizes[0], 0.5)
        for r in range(rounds):
            for size in sizes:
                for t in targets:
                    srv = servers.get(t) if t != "direct" else None
                    port = srv.port if srv is not None else bport
                    cpu0 = e2e.tree_cpu(srv.pid) if srv is not None else None
                    res = throughput(port, connections, size, duration)
                    if srv is not None:
                        u, k = e2e.tree_cpu(srv.pid)
                        res["cpu_us"] = ((u - cpu0[0]) + (k - cpu0[1])) / max(res["messages"], 1) * 1e6
                        if not srv.alive():
                            raise RuntimeError(f"{t} died; log:\n{srv.log_tail()}")
                    flow[t][size].append(res)
                    cpu = f"{res['cpu_us']:.1f} µs/msg" if "cpu_us" in res else "-"
                    print(f"round {r + 1}/{rounds} {size:>6} B {t:<9} {res['mps']:>9.0f} msg/s "
                          f"{cpu} errors={len(res['errors'])}", file=out, flush=True)
        for t in targets:
            if t != "direct" and tunnels:
                memory[t] = idle_tunnels(servers[t], tunnels)
                m = memory[t]
                print(f"{t}: {m['tunnels']} idle tunnels: RSS {m['rss_before_kib']} -> "
                      f"{m['rss_after_kib']} KiB ({m['kib_per_tunnel']:.1f} KiB each)",
                      file=out, flush=True)
    finally:
        e2e.stop_servers(servers.values(), workdir, out)
    return summarize(flow, memory, sizes, connections, duration, rounds, notes)


def summarize(flow, memory, sizes, connections, duration, rounds, notes):
    summary = {}
    for t, by_size in flow.items():
        for size, runs in by_size.items():
            row = {"mps": statistics.median(r["mps"] for r in runs),
                   "errors": sum(len(r["errors"]) for r in runs),
                   "error_sample": [e for r in runs for e in r["errors"]][:3]}
            if runs and "cpu_us" in runs[0]:
                row["cpu_us"] = statistics.median(r["cpu_us"] for r in runs)
            summary[(t, size)] = row
    for (t, size), row in summary.items():
        direct = summary.get(("direct", size))
        nginx = summary.get(("nginx", size))
        if direct and t != "direct":
            row["mps_vs_direct"] = row["mps"] / direct["mps"]
        if nginx and t.startswith("fastlb"):
            row["mps_vs_nginx"] = row["mps"] / nginx["mps"]
            if row.get("cpu_us") and nginx.get("cpu_us"):
                row["cpu_vs_nginx"] = row["cpu_us"] / nginx["cpu_us"]
    return {"summary": summary, "memory": memory, "notes": notes,
            "config": {"sizes": list(sizes), "connections": connections,
                       "duration_s": duration, "rounds": rounds}}


def errors(result):
    out = {f"{t} {s} B": r["error_sample"] for (t, s), r in result["summary"].items()
           if r["errors"]}
    out.update({f"{t} tunnels": m["errors"][:3] for t, m in result["memory"].items()
                if m["errors"]})
    return out


def format_markdown(result):
    c = result["config"]
    lines = [f"{c['connections']} connections, each echoing one message at a time, "
             f"{c['duration_s']:g} s per run, {c['rounds']} rounds interleaved, medians; "
             "proxies on CPU 0, echo server and client on CPU 1.", "",
             "| message | target | messages/s | ÷ direct | ÷ nginx | proxy CPU µs/message "
             "| CPU ÷ nginx | errors |", "|--:|:--|--:|--:|--:|--:|--:|--:|"]
    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else ""

    for (t, size), r in result["summary"].items():
        cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else ""
        lines.append(f"| {size} B | {t} | {r['mps']:,.0f} | {ratio(r, 'mps_vs_direct')} | "
                     f"{ratio(r, 'mps_vs_nginx')} | {cpu} | {ratio(r, 'cpu_vs_nginx')} | "
                     f"{r['errors']} |")
    if result["memory"]:
        lines += ["", "| target | idle tunnels | RSS before KiB | RSS after KiB | KiB per tunnel |",
                  "|:--|--:|--:|--:|--:|"]
        for t, m in result["memory"].items():
            lines.append(f"| {t} | {m['tunnels']} | {m['rss_before_kib']:,} | "
                         f"{m['rss_after_kib']:,} | {m['kib_per_tunnel']:.1f} |")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,16384", help="message sizes in bytes, comma list")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tunnels", type=int, default=500, help="idle tunnels for the memory figure")
    p.add_argument("--targets", default=",".join(TARGETS))
    a = p.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"skipped: {', '.join(missing)} not found: {INSTALL_HINT}")
        return 0
    result = run(sizes=tuple(int(s) for s in a.sizes.split(",")), connections=a.connections,
                 duration=a.duration, rounds=a.rounds, tunnels=a.tunnels,
                 targets=[t.strip() for t in a.targets.split(",")])
    print(format_markdown(result))
    bad = errors(result)
    if bad:
        print(f"errors: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
