#!/usr/bin/env python3
"""TLS termination: fastlb against nginx with the same certificate, in the same run.

    python bench/tls.py [--rounds 3] [--duration 5] [--connections 64]
                        [--key ec|rsa] [--targets nginx,fastlb-c] [--json FILE]

Two measurements per target, each a wrk run (``wrk -t1``) against the
proxy's TLS port, the proxy relaying to one plain nginx backend (a 16-byte
body, ``e2e.nginx_backend_conf``) over pooled keep-alive connections:

* **handshakes**: every request says ``Connection: close``, so each of wrk's
  connections does a full TLS handshake (wrk keeps no session to resume), one
  request, and is closed: **handshakes/s**, and the CPU per handshake;
* **keep-alive**: requests over open TLS connections (the 9 browser header
  lines of ``e2e.py``): **requests/s over TLS**, and the CPU per request.

Targets, each on its own free 127.0.0.1 port with the same certificate and
key (made with the ``openssl`` command into the temp dir: ECDSA P-256 by
default, ``--key rsa`` for RSA 2048):

* ``nginx``: 1 worker, ``listen ... ssl``, ``ssl_protocols TLSv1.2 TLSv1.3``,
  its defaults otherwise (ciphers, session tickets on, no session cache: as
  fastlb, whose contexts are the ``ssl`` module's), the proxy settings of
  ``e2e.py``;
* ``fastlb-c``: ``fastlb serve --tls-cert --tls-key`` with the compiled core
  (left out when it is not built); ``fastlb-py`` (the pure build) on request.

As in ``e2e.py``: proxies pinned to CPU 0, the backend and wrk to CPU 1, the
targets interleaved over the rounds, CPU as utime+stime of the proxy's
process tree from /proc before and after each run (``e2e.tree_cpu``),
medians. wrk's non-2xx responses and socket errors are counted (they must be
0, but in the handshake runs wrk counts nothing for the close it asked for).

Exits 0 with "skipped: ..." naming what is missing (wrk, nginx, openssl,
taskset) and how to install it. Only 127.0.0.1 is used; every wrk run is
bounded by ``-d`` and a subprocess timeout; only the processes started here
are stopped, by PID.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e  # noqa: E402

ALL_TARGETS = ("nginx", "fastlb-c", "fastlb-py")
DEFAULT_TARGETS = ("nginx", "fastlb-c")
MODES = ("handshakes", "keep-alive")
INSTALL_HINT = "apt-get install wrk nginx-light openssl"

CLOSE_LUA = e2e.WRK_LUA % {"headers": 'wrk.headers["Connection"] = "close"'}


def missing_tools():
    return [t for t in ("wrk", "nginx", "openssl", "taskset") if e2e.find_tool(t) is None]


def make_certificate(workdir, kind="ec"):
    """``(cert, key)`` paths: a self-signed certificate for localhost and 127.0.0.1."""
    cert, key = os.path.join(workdir, "bench.pem"), os.path.join(workdir, "bench.key")
    newkey = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ec"
              else ["-newkey", "rsa:2048"])
    subprocess.run([e2e.find_tool("openssl"), "req", "-x509", *newkey, "-nodes", "-days", "30",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def nginx_tls_conf(workdir, port, backend_port, cert, key):
    """``e2e.nginx_proxy_conf`` with the listener in TLS."""
    conf = e2e.nginx_proxy_conf(workdir, port, backend_port)
    listen = f"listen 127.0.0.1:{port} backlog=4096;"
    return conf.replace(listen, f"listen 127.0.0.1:{port} ssl backlog=4096;\n"
                                f"        ssl_certificate {cert};\n"
                                f"        ssl_certificate_key {key};\n"
                                "        ssl_protocols TLSv1.2 TLSv1.3;")


def start_target(name, workdir, backend_port, cpu, python, cert, key):
    port = e2e.free_port()
    if name == "nginx":
        conf = os.path.join(workdir, "nginx-tls.conf")
        with open(conf, "w") as f:
            f.write(nginx_tls_conf(workdir, port, backend_port, cert, key))
        return e2e.Server(name, [e2e.find_tool("nginx"), "-p", workdir, "-c", conf], port,
                          workdir, cpu)
    env = dict(os.environ)
    env.pop("FASTLB_NO_EXTENSIONS", None)
    env.pop("FASTLB_REQUIRE_EXTENSIONS", None)
    env["FASTLB_REQUIRE_EXTENSIONS" if name == "fastlb-c" else "FASTLB_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = e2e.REPO + os.pathsep + env.get("PYTHONPATH", "")
    argv = [python, "-m", "fastlb", "serve", "--listen", f"127.0.0.1:{port}",
            "--backend", f"http://127.0.0.1:{backend_port}", "--access-log", "off",
            "--log-level", "warning", "--tls-cert", cert, "--tls-key", key]
    return e2e.Server(name, argv, port, workdir, cpu, env=env)


def run_wrk(port, duration, connections, lua, cpu):
    """``e2e.run_wrk`` against https://127.0.0.1:PORT/."""
    return e2e.run_wrk(port, duration, connections, lua, cpu, scheme="https")


def measure(server, mode, duration, connections, luas, cpu):
    before = e2e.tree_cpu(server.pid)
    stats = run_wrk(server.port, duration, connections, luas[mode], cpu)
    after = e2e.tree_cpu(server.pid)
    user, system = after[0] - before[0], after[1] - before[1]
    stats["cpu_us"] = (user + system) / max(stats["requests"], 1) * 1e6
    stats["user_s"], stats["sys_s"] = user, system
    if not server.alive():
        raise RuntimeError(f"{server.name} died during the run; log:\n{server.log_tail()}")
    return stats


def run(rounds=3, duration=5, connections=64, targets=DEFAULT_TARGETS, key="ec", warmup=1,
        out=sys.stderr):
    proxy_cpu = e2e.env_int("FASTLB_BENCH_PROXY_CPU", 0)
    load_cpu = e2e.env_int("FASTLB_BENCH_LOAD_CPU", 1)
    python = os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable
    targets = list(targets)
    notes = []
    if "fastlb-c" in targets and not e2e.fastlb_c_available(python):
        targets.remove("fastlb-c")
        notes.append("compiled core fastlb._core not built: fastlb-c skipped")
    workdir = tempfile.mkdtemp(prefix="fastlb-bench-tls-", dir="/tmp")
    servers = {}
    results = {(t, m): [] for t in targets for m in MODES}
    try:
        cert, keyfile = make_certificate(workdir, key)
        bport = e2e.free_port()
        conf = os.path.join(workdir, "nginx-backend.conf")
        with open(conf, "w") as f:
            f.write(e2e.nginx_backend_conf(workdir, bport))
        servers["backend"] = e2e.Server("backend", [e2e.find_tool("nginx"), "-p", workdir,
                                                    "-c", conf], bport, workdir, load_cpu)
        for t in targets:
            servers[t] = start_target(t, workdir, bport, proxy_cpu, python, cert, keyfile)
        luas = {"keep-alive": e2e.write_lua(workdir)}
        luas["handshakes"] = os.path.join(workdir, "close.lua")
        with open(luas["handshakes"], "w") as f:
            f.write(CLOSE_LUA)
        if warmup > 0:
            for t in targets:
                for m in MODES:
                    run_wrk(servers[t].port, warmup, connections, luas[m], load_cpu)
        for r in range(rounds):
            for m in MODES:
                for t in targets:
                    s = measure(servers[t], m, duration, connections, luas, load_cpu)
                    results[(t, m)].append(s)
                    print(f"round {r + 1}/{rounds} {m:<10} {t:<9} {s['rps']:>8.0f}/s  "
                          f"{s['cpu_us']:.1f} µs each  non2xx={s['non2xx']} "
                          f"socket_errors={s['socket_errors']}", file=out, flush=True)
    finally:
        e2e.stop_servers(servers.values(), workdir, out)
    return summarize(results, targets, rounds, duration, connections, key, notes)


def summarize(results, targets, rounds, duration, connections, key, notes):
    rows = []
    for m in MODES:
        ref = None
        for t in targets:
            runs = results[(t, m)]
            u = sum(r["user_s"] for r in runs)
            k = sum(r["sys_s"] for r in runs)
            row = {"mode": m, "target": t,
                   "rate": statistics.median(r["rps"] for r in runs),
                   "cpu_us": statistics.median(r["cpu_us"] for r in runs),
                   "user_share": u / (u + k) if u + k > 0 else 0.0,
                   "requests": sum(r["requests"] for r in runs),
                   "non2xx": sum(r["non2xx"] for r in runs),
                   "socket_errors": sum(r["socket_errors"] for r in runs)}
            if t == "nginx":
                ref = row
            rows.append(row)
        for row in rows:
            if row["mode"] == m and ref is not None and row["target"] != "nginx":
                row["rate_vs_nginx"] = row["rate"] / ref["rate"]
                row["cpu_vs_nginx"] = row["cpu_us"] / ref["cpu_us"]
    return {"rows": rows, "notes": notes,
            "config": {"rounds": rounds, "duration_s": duration, "connections": connections,
                       "key": key, "targets": targets, "cpus": os.cpu_count()}}


def format_table(result):
    c = result["config"]
    key = "ECDSA P-256" if c["key"] == "ec" else "RSA 2048"
    lines = [f"wrk -t1 -c{c['connections']} -d{c['duration_s']}s over TLS ({key}), "
             f"{c['rounds']} rounds interleaved, medians; proxies on CPU 0, backend+wrk on CPU 1",
             "",
             f"{'mode':<10} {'target':<9} {'per s':>8} {'CPU µs each':>11} {'user%':>6} "
             f"{'÷nginx':>7} {'CPU÷nginx':>9} {'non2xx':>6} {'sock err':>8}"]
    for r in result["rows"]:
        rr = f"{r['rate_vs_nginx']:.2f}" if "rate_vs_nginx" in r else ""
        cr = f"{r['cpu_vs_nginx']:.2f}" if "cpu_vs_nginx" in r else ""
        lines.append(f"{r['mode']:<10} {r['target']:<9} {r['rate']:>8.0f} {r['cpu_us']:>11.1f} "
                     f"{100 * r['user_share']:>6.0f} {rr:>7} {cr:>9} {r['non2xx']:>6} "
                     f"{r['socket_errors']:>8}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def errors(result):
    return [r for r in result["rows"] if r["non2xx"] or r["socket_errors"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=1, help="seconds per target and mode (0: none)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--key", choices=("ec", "rsa"), default="ec")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma list of {','.join(ALL_TARGETS)}")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    a = p.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (Debian/Ubuntu: {INSTALL_HINT})")
        return 0
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    result = run(a.rounds, a.duration, a.connections, targets, a.key, a.warmup)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if errors(result) else 0


if __name__ == "__main__":
    sys.exit(main())
