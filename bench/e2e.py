#!/usr/bin/env python3
"""End-to-end benchmark: fastlb against nginx (and haproxy) as reverse proxies.

Run as a script (``python bench/e2e.py``) it prints a table; ``bench/test_bench_e2e.py``
runs the same thing once under pytest-benchmark.

What it does
------------
* starts one **backend**: nginx, 1 worker, answering every request with a
  16-byte body (``return 200``), keep-alive for a million requests, no access log;
* starts the **proxies under test**, each on its own free 127.0.0.1 port, each
  with its own config in a temp dir under /tmp:

  - ``nginx``: 1 worker, ``upstream { keepalive 64; }``, ``proxy_http_version 1.1``,
    ``proxy_set_header Connection ""``, no access log;
  - ``haproxy`` (when installed): ``nbthread 1``, ``http-reuse always``,
    ``option http-keep-alive``;
  - ``fastlb-c``: ``python -m fastlb serve`` with the compiled core
    (``FASTLB_REQUIRE_EXTENSIONS=1``; left out when ``fastlb._core`` is not built);
  - ``fastlb-py``: the same with ``FASTLB_NO_EXTENSIONS=1``;

  plus ``direct`` (wrk straight at the backend: the ceiling of the setup);
* pins the proxies to CPU 0 and the backend and wrk to CPU 1 (``taskset``);
* loads each target with ``wrk -t1 -c64 -d<N>s`` sending the 9 header lines of
  a typical browser request, the targets interleaved (direct, nginx, haproxy,
  fastlb-c, fastlb-py, then again) over several rounds, after a short warm-up;
* per run, reads utime+stime of the proxy's whole process tree (the process,
  its live descendants, and the cutime/cstime of reaped children) from
  /proc/PID/stat just before and after wrk, and divides by the requests wrk
  completed: **CPU µs per request**; reports the medians over the rounds, the
  user/kernel split of that CPU, and the ratios fastlb / nginx;
* counts wrk's non-2xx responses and socket errors (connect/read/write/timeout),
  which must all be 0.

Environment (all optional)
--------------------------
``FASTLB_BENCH_ROUNDS`` (3), ``FASTLB_BENCH_DURATION`` seconds per run (5),
``FASTLB_BENCH_WARMUP`` seconds per target before round 1 (1; 0 = none),
``FASTLB_BENCH_CONNECTIONS`` (64), ``FASTLB_BENCH_TARGETS`` (comma list, default
``direct,nginx,haproxy,fastlb-c,fastlb-py``), ``FASTLB_BENCH_PROXY_CPU`` (0),
``FASTLB_BENCH_LOAD_CPU`` (1), ``FASTLB_BENCH_PYTHON`` (the interpreter that
runs fastlb; default: this one), ``FASTLB_BENCH_KEEP`` (1 = keep the temp dir).

Nothing is installed: a missing wrk or nginx is reported by ``missing_tools()``.
Only 127.0.0.1 is used. Every wrk run is bounded by -d and by a subprocess timeout.
"""
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_HINT = "apt-get install wrk nginx-light haproxy"
ALL_TARGETS = ("direct", "nginx", "haproxy", "fastlb-c", "fastlb-py")
BODY = "0123456789abcdef"   # 16 bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The 9 header lines of a typical browser request. wrk sends Host itself (from
# the URL); the Lua script adds the other 8.
BROWSER_HEADERS = [
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
               "image/webp,*/*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Connection", "keep-alive"),
    ("Cookie", "sessionid=8f3a2c1e9b7d4f6a; csrftoken=Zx81QpLm2Vt7; theme=dark"),
    ("Upgrade-Insecure-Requests", "1"),
    ("Cache-Control", "max-age=0"),
]

WRK_LUA = """
wrk.method = "GET"
wrk.path = "/"
%(headers)s
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "FASTLB_BENCH {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"bytes\\": %%d, "
    .. "\\"connect\\": %%d, \\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, "
    .. "\\"timeout\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d}\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def env_float(name, default):
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else default


def missing_tools():
    """The tools this benchmark cannot run without, that are not on PATH."""
    return [t for t in ("wrk", "nginx", "taskset") if find_tool(t) is None]


def find_tool(name):
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None)


def fastlb_c_available(python=None):
    """True when the compiled core imports in the interpreter that will run fastlb."""
    python = python or os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable
    env = dict(os.environ, FASTLB_REQUIRE_EXTENSIONS="1")
    env.pop("FASTLB_NO_EXTENSIONS", None)
    r = subprocess.run([python, "-c", "from fastlb import core; print(core.IMPL)"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return r.returncode == 0 and r.stdout.strip() == "c"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=15.0, name="server"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


# ------------------------------------------------------------------ /proc accounting

def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # the comm field may contain spaces; everything after the last ')' is fixed
    return data[data.rindex(")") + 2:].split()


def children(pid):
    """The PIDs of the live children of ``pid`` (of every thread of it)."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_cpu(pid):
    """(user, system) seconds of ``pid`` and its descendants, reaped ones included."""
    user = system = 0
    stack, first = [pid], True
    while stack:
        p = stack.pop()
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields after comm: [0]=state ... utime=[11] stime=[12] cutime=[13] cstime=[14]
        user += int(f[11])
        system += int(f[12])
        if first:  # reaped children of the root; live descendants are walked
            user += int(f[13])
            system += int(f[14])
            first = False
        stack += children(p)
    return user / CLK_TCK, system / CLK_TCK


# ------------------------------------------------------------------ the servers

class Server:
    def __init__(self, name, argv, port, workdir, cpu, env=None):
        self.name, self.port = name, port
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        cmd = ["taskset", "-c", str(cpu)] + argv if cpu is not None else argv
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                     start_new_session=True)
        try:
            wait_port(port, self.proc, name=name)
        except Exception:
            self.stop()
            raise RuntimeError(f"{name}: could not start; log:\n{self.log_tail()}") from None

    @property
    def pid(self):
        return self.proc.pid  # taskset execs the command: same PID

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def _nginx_common(workdir, workers=1):
    return f"""
daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx-%(name)s.pid;
error_log {workdir}/nginx-%(name)s.error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""


def nginx_backend_conf(workdir, port, name="backend", workers=1):
    """nginx answering a short static body on ``port`` (or on each of a list of ports)."""
    ports = port if isinstance(port, (list, tuple)) else [port]
    listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    return (_nginx_common(workdir, workers) % {"name": name}) + f"""
http {{
    access_log off;
    client_body_temp_path {workdir}/nb-body;
    proxy_temp_path {workdir}/nb-proxy;
    fastcgi_temp_path {workdir}/nb-fcgi;
    uwsgi_temp_path {workdir}/nb-uwsgi;
    scgi_temp_path {workdir}/nb-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
{listens}
        default_type text/plain;
        location / {{ return 200 "{BODY}"; }}
    }}
}}
"""


def nginx_proxy_conf(workdir, port, backend_port, workers=1):
    return (_nginx_common(workdir, workers) % {"name": "proxy"}) + f"""
http {{
    access_log off;
    client_body_temp_path {workdir}/np-body;
    proxy_temp_path {workdir}/np-proxy;
    fastcgi_temp_path {workdir}/np-fcgi;
    uwsgi_temp_path {workdir}/np-uwsgi;
    scgi_temp_path {workdir}/np-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""


def haproxy_conf(port, backend_port, threads=1):
    return f"""
global
    nbthread {threads}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{backend_port} maxconn 1000
"""


def start_target(name, workdir, backend_port, cpu, python, workers=1):
    """Start proxy ``name`` in front of ``backend_port`` with ``workers`` workers
    (nginx ``worker_processes``, haproxy ``nbthread``, fastlb ``--workers``), pinned
    to ``cpu`` (a CPU list for taskset; None: not pinned)."""
    port = free_port()
    if name == "nginx":
        conf = os.path.join(workdir, "nginx-proxy.conf")
        with open(conf, "w") as f:
            f.write(nginx_proxy_conf(workdir, port, backend_port, workers))
        return Server(name, [find_tool("nginx"), "-p", workdir, "-c", conf], port, workdir, cpu)
    if name == "haproxy":
        conf = os.path.join(workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(haproxy_conf(port, backend_port, workers))
        return Server(name, [find_tool("haproxy"), "-db", "-f", conf], port, workdir, cpu)
    if name in ("fastlb-c", "fastlb-py"):
        env = dict(os.environ)
        env.pop("FASTLB_NO_EXTENSIONS", None)
        env.pop("FASTLB_REQUIRE_EXTENSIONS", None)
        if name == "fastlb-c":
            env["FASTLB_REQUIRE_EXTENSIONS"] = "1"
        else:
            env["FASTLB_NO_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        argv = [python, "-m", "fastlb", "serve", "--listen", f"127.0.0.1:{port}",
                "--backend", f"http://127.0.0.1:{backend_port}", "--access-log", "off",
                "--log-level", "warning"]
        if workers != 1:
            argv += ["--workers", str(workers)]
        return Server(name, argv, port, workdir, cpu, env=env)
    raise ValueError(name)


# ------------------------------------------------------------------ wrk

def write_lua(workdir):
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in BROWSER_HEADERS)
    path = os.path.join(workdir, "browser.lua")
    with open(path, "w") as f:
        f.write(WRK_LUA % {"headers": lines})
    return path


def run_wrk(port, duration, connections, lua, cpu, threads=1, scheme="http"):
    """One bounded wrk run (``-t threads``), pinned to ``cpu`` (None: not pinned),
    against ``scheme``://127.0.0.1:PORT/."""
    cmd = [find_tool("wrk"), f"-t{threads}", f"-c{connections}",
           f"-d{duration}s", "--timeout", "5s", "-s", lua, f"{scheme}://127.0.0.1:{port}/"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    stats = None
    non2xx = 0
    for line in r.stdout.splitlines():
        if line.startswith("FASTLB_BENCH "):
            stats = json.loads(line[len("FASTLB_BENCH "):])
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            non2xx = int(line.split(":")[1])
    if r.returncode != 0 or stats is None:
        raise RuntimeError(f"wrk failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    stats["non2xx"] = non2xx
    stats["socket_errors"] = stats["connect"] + stats["read"] + stats["write"] + stats["timeout"]
    stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["raw"] = r.stdout
    return stats


def measure(server, direct_port, duration, connections, lua, cpu):
    """One wrk run against ``server`` (None: ``direct_port``); CPU of its process tree around it."""
    before = tree_cpu(server.pid) if server is not None else None
    stats = run_wrk(server.port if server else direct_port, duration, connections, lua, cpu)
    if server is not None:
        after = tree_cpu(server.pid)
        user, system = after[0] - before[0], after[1] - before[1]
        n = max(stats["requests"], 1)
        stats["cpu_us"] = (user + system) / n * 1e6
        stats["user_s"], stats["sys_s"] = user, system
        if not server.alive():
            raise RuntimeError(f"{server.name} died during the run; log:\n{server.log_tail()}")
    return stats


# ------------------------------------------------------------------ the run

def run(rounds=None, duration=None, warmup=None, connections=None, targets=None,
        out=sys.stderr):
    """Run the benchmark; returns a dict with per-target medians and raw runs."""
    rounds = rounds or env_int("FASTLB_BENCH_ROUNDS", 3)
    duration = duration or env_int("FASTLB_BENCH_DURATION", 5)
    warmup = env_float("FASTLB_BENCH_WARMUP", 1.0) if warmup is None else warmup
    connections = connections or env_int("FASTLB_BENCH_CONNECTIONS", 64)
    proxy_cpu = env_int("FASTLB_BENCH_PROXY_CPU", 0)
    load_cpu = env_int("FASTLB_BENCH_LOAD_CPU", 1)
    python = os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable
    if targets is None:
        env_t = os.environ.get("FASTLB_BENCH_TARGETS")
        targets = [t.strip() for t in env_t.split(",")] if env_t else list(ALL_TARGETS)
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    notes = []
    if "haproxy" in targets and find_tool("haproxy") is None:
        targets.remove("haproxy")
        notes.append("haproxy not installed: skipped")
    if "fastlb-c" in targets and not fastlb_c_available(python):
        targets.remove("fastlb-c")
        notes.append("compiled core fastlb._core not built: fastlb-c skipped")

    workdir = tempfile.mkdtemp(prefix="fastlb-bench-", dir="/tmp")
    servers = {}
    results = {t: [] for t in targets}
    try:
        conf = os.path.join(workdir, "nginx-backend.conf")
        with open(conf, "w") as f:
            bport = free_port()
            f.write(nginx_backend_conf(workdir, bport))
        backend = Server("backend", [find_tool("nginx"), "-p", workdir, "-c", conf],
                         bport, workdir, load_cpu)
        servers["backend"] = backend
        for t in targets:
            if t != "direct":
                servers[t] = start_target(t, workdir, bport, proxy_cpu, python)
        lua = write_lua(workdir)
        if warmup > 0:
            for t in targets:
                print(f"warm-up {t} ({warmup:g}s)", file=out, flush=True)
                run_wrk(servers[t].port if t != "direct" else bport, max(1, int(round(warmup))),
                        connections, lua, load_cpu)
        for r in range(rounds):
            for t in targets:
                srv = servers[t] if t != "direct" else None
                s = measure(srv, bport, duration, connections, lua, load_cpu)
                results[t].append(s)
                cpu = f"{s['cpu_us']:.1f} µs/req" if "cpu_us" in s else "-"
                print(f"round {r + 1}/{rounds} {t:<10} {s['rps']:>9.0f} req/s  {cpu}  "
                      f"non2xx={s['non2xx']} socket_errors={s['socket_errors']}",
                      file=out, flush=True)
    finally:
        stop_servers(servers.values(), workdir, out)
    return summarize(results, rounds, duration, connections, notes)


def stop_servers(servers, workdir, out):
    """Stop ``servers`` (last started first; one that fails to stop does not
    keep the others running) and remove ``workdir``, unless
    ``FASTLB_BENCH_KEEP=1`` asks to keep it."""
    for s in reversed(list(servers)):
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            print(f"stopping {s.name}: {e}", file=out)
    if os.environ.get("FASTLB_BENCH_KEEP") == "1":
        print(f"kept {workdir}", file=out)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(results, rounds, duration, connections, notes):
    summary = {}
    for t, runs in results.items():
        row = {
            "rps": statistics.median(r["rps"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            "non2xx": sum(r["non2xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
            "p50_ms": statistics.median(r["p50_us"] for r in runs) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in runs) / 1000,
        }
        if runs and "cpu_us" in runs[0]:
            row["cpu_us"] = statistics.median(r["cpu_us"] for r in runs)
            u = sum(r["user_s"] for r in runs)
            k = sum(r["sys_s"] for r in runs)
            row["user_share"] = u / (u + k) if u + k > 0 else 0.0
        summary[t] = row
    ref = summary.get("nginx")
    for t, row in summary.items():
        if ref and t.startswith("fastlb"):
            row["rps_vs_nginx"] = row["rps"] / ref["rps"]
            if "cpu_us" in row and ref.get("cpu_us"):
                row["cpu_vs_nginx"] = row["cpu_us"] / ref["cpu_us"]
    return {
        "summary": summary,
        "runs": {t: [{k: v for k, v in r.items() if k != "raw"} for r in runs]
                 for t, runs in results.items()},
        "config": {"rounds": rounds, "duration_s": duration, "connections": connections,
                   "wrk_threads": 1, "cpus": os.cpu_count()},
        "notes": notes,
    }


def errors(result):
    """{target: (non2xx, socket_errors)} for every target that had any."""
    return {t: (r["non2xx"], r["socket_errors"]) for t, r in result["summary"].items()
            if r["non2xx"] or r["socket_errors"]}


def format_table(result):
    c = result["config"]
    lines = [
        f"wrk -t1 -c{c['connections']} -d{c['duration_s']}s, 9 browser headers, "
        f"{c['rounds']} rounds interleaved, medians; proxies on CPU 0, backend+wrk on CPU 1",
        "",
        f"{'target':<10} {'req/s':>9} {'CPU µs/req':>11} {'user%':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'req/s÷nginx':>11} {'CPU÷nginx':>9} {'non2xx':>6} {'sock err':>8}",
    ]
    for t, r in result["summary"].items():
        cpu = f"{r['cpu_us']:.1f}" if "cpu_us" in r else "-"
        us = f"{100 * r['user_share']:.0f}" if "user_share" in r else "-"
        rr = f"{r['rps_vs_nginx']:.2f}" if "rps_vs_nginx" in r else ""
        cr = f"{r['cpu_vs_nginx']:.2f}" if "cpu_vs_nginx" in r else ""
        lines.append(f"{t:<10} {r['rps']:>9.0f} {cpu:>11} {us:>6} {r['p50_ms']:>7.2f} "
                     f"{r['p99_ms']:>7.2f} {rr:>11} {cr:>9} {r['non2xx']:>6} "
                     f"{r['socket_errors']:>8}")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=int, default=None, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--connections", type=int, default=None)
    p.add_argument("--targets", default=None, help=f"comma list of {','.join(ALL_TARGETS)}")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    a = p.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"{', '.join(missing)} not found: {INSTALL_HINT}", file=sys.stderr)
        return 2
    targets = [t.strip() for t in a.targets.split(",")] if a.targets else None
    result = run(a.rounds, a.duration, a.warmup, a.connections, targets)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if errors(result) else 0


if __name__ == "__main__":
    sys.exit(main())
