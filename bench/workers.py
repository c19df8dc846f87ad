#!/usr/bin/env python3
"""Scaling over cores: fastlb ``--workers W`` next to nginx ``worker_processes W``.

    python bench/workers.py [--workers 1,2,4] [--rounds 3] [--duration 10]
                            [--connections N] [--threads T] [--targets nginx,haproxy,fastlb-c]
                            [--markdown FILE] [--json FILE]

For each W (default 1, 2, ... up to the CPUs this process may run on) it runs,
side by side, behind the same backend:

* ``fastlb serve --workers W`` (W=1 is the single process, no master), the
  compiled core (``fastlb-c``; ``fastlb-py`` on request, or when the core is
  not built);
* nginx with ``worker_processes W`` (the proxy config of ``e2e.py``);
* haproxy with ``nbthread W``, when installed (one process, W threads);

in front of one nginx backend answering a 16-byte body (``e2e.nginx_backend_conf``),
started once and outside every measured process tree. The rounds are
interleaved: in each round, for each W, the three proxies are started fresh,
their idle RSS read, each warmed up, then loaded one after the other with
``wrk -t T -c C -d D`` (9 browser header lines, ``e2e.write_lua``), then stopped.
Reported, as medians over the rounds:

* **req/s** from wrk, and its ratio to the same target at W=1 (scaling);
* **CPU µs per request**: utime+stime of the proxy's whole process tree
  (master and workers, from /proc/PID/stat; ``e2e.tree_cpu``) read just before
  and just after the wrk run, divided by the requests wrk completed;
* **RSS per worker**, mean VmRSS (/proc/PID/status) of the worker processes
  (the live children of the master; the process itself when it has none: fastlb
  W=1, haproxy) at idle (after start, before any load) and under load (sampled
  half-way through the run); the master's own RSS in its own column;
* the ratios req/s and CPU per request over nginx at the same W;
* wrk's non-2xx responses and socket errors (must be 0; exit status 1 otherwise);
* the 1-min load average before and after, for a machine shared with other work.

CPUs. When the machine has at least 2*W+2 CPUs, the proxies of that W are
pinned (taskset) to the first W of them and wrk and the backend to the rest
(W+2 or more), so that the load generator has its own cores. With fewer, nothing
is pinned, and the output says that the load generator shares the cores with
the proxies (on a 2-core machine: every W). Defaults that follow W:
connections ``max(64, 16*W)``, wrk threads ``min(W, free CPUs // 2)`` (at
least 1), backend ``worker_processes`` ``max(1, max(W) // 2)``.

Skips (exit 0, naming what is missing and how to install it) without wrk or
nginx. Only 127.0.0.1 is used; every wrk run is bounded by ``-d`` and a
subprocess timeout; only the processes this script started are stopped, by PID.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e  # noqa: E402

TARGETS = ("nginx", "haproxy", "fastlb-c")
KNOWN = ("nginx", "haproxy", "fastlb-c", "fastlb-py")
SHARED_NOTE = ("fewer than 2*W+2 CPUs, so nothing is pinned: the load generator (wrk) and "
               "the backend share the cores with the proxies; req/s and its scaling are what the "
               "proxies get next to them, CPU per request counts the proxies' processes only")


# ------------------------------------------------------------------ CPUs and processes

def available_cpus():
    """The CPUs this process may run on, sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpulist(cpus):
    return ",".join(str(c) for c in cpus)


def cpu_plan(w, cpus):
    """(proxy CPUs, load CPUs) for W workers; (None, None) when there are too few to pin."""
    if len(cpus) >= 2 * w + 2:
        return cpus[:w], cpus[w:]
    return None, None


def rss_kib(pid):
    """VmRSS of ``pid`` in KiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def worker_pids(pid):
    """The worker processes of a proxy: the live children of ``pid``, or ``pid`` itself."""
    return e2e.children(pid) or [pid]


def tree_pids(pid):
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += e2e.children(p)
    return out


def pin_tree(pid, cpus):
    """Set the CPU affinity of ``pid`` and of its descendants (all CPUs: ``cpus`` of the plan)."""
    for p in tree_pids(pid):
        try:
            os.sched_setaffinity(p, cpus)
        except OSError:
            pass


def memory(server):
    """(mean RSS of its workers, RSS of its master or None, number of workers), in KiB."""
    workers = worker_pids(server.pid)
    rss = [r for r in (rss_kib(p) for p in workers) if r is not None]
    master = rss_kib(server.pid) if workers != [server.pid] else None
    return (statistics.mean(rss) if rss else None), master, len(workers)


def wait_settled(servers, expect, timeout=20.0, every=0.25, steady=3):
    """Wait until each server has its ``expect[name]`` workers and their RSS stopped moving.

    A worker that is still importing or building grows; idle is read once every
    worker's RSS has been the same for ``steady`` looks in a row. Bounded by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last, same = {}, {s.name: 0 for s in servers}
    while time.monotonic() < deadline:
        for s in servers:
            if not s.alive():
                raise RuntimeError(f"{s.name} exited; log:\n{s.log_tail()}")
            pids = worker_pids(s.pid)
            n = len(pids) if pids != [s.pid] else 1
            snap = (n, tuple(rss_kib(p) for p in tree_pids(s.pid)))
            if n == expect[s.name] and snap == last.get(s.name):
                same[s.name] += 1
            else:
                same[s.name] = 0
            last[s.name] = snap
        if all(v >= steady for v in same.values()):
            return
        time.sleep(every)
    slow = [n for n, v in same.items() if v < steady]
    print(f"note: {', '.join(slow)} not settled within {timeout:.0f}s; idle RSS read anyway",
          file=sys.stderr)


def _started(pid):
    """(state, start time) of ``pid`` from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def stop_all(servers, out):
    """Stop the servers (SIGTERM to each root, by PID); then any worker of theirs left over.

    A worker is killed only if it is the same process as before (same start time).
    """
    seen = {s.name: [(p, _started(p)) for p in tree_pids(s.pid)[1:]] if s.alive() else []
            for s in servers}
    for s in reversed(servers):
        try:
            s.stop()
        except Exception as e:  # keep stopping the others
            print(f"stopping {s.name}: {e}", file=out)
    for name, pids in seen.items():
        for p, started in pids:
            now = _started(p)
            if now is None or started is None or now[1] != started[1] or now[0] == "Z":
                continue
            print(f"{name}: worker {p} outlived its master; killing it", file=out)
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


# ------------------------------------------------------------------ one measured run

def measure(server, duration, connections, threads, lua, load_cpus):
    """wrk against ``server``, its tree's CPU around the run, its workers' RSS half-way."""
    box = {}

    def load():
        try:
            box["stats"] = e2e.run_wrk(server.port, duration, connections, lua,
                                       cpulist(load_cpus) if load_cpus else None, threads)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    before = e2e.tree_cpu(server.pid)
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(duration / 2)
    loaded = memory(server) if t.is_alive() else None
    t.join(duration + 70)  # run_wrk's own timeout is duration + 60
    after = e2e.tree_cpu(server.pid)
    if "error" in box:
        raise box["error"]
    if "stats" not in box:
        raise RuntimeError(f"wrk against {server.name} did not finish")
    if not server.alive():
        raise RuntimeError(f"{server.name} died during the run; log:\n{server.log_tail()}")
    s = box["stats"]
    user, system = after[0] - before[0], after[1] - before[1]
    s["cpu_us"] = (user + system) / max(s["requests"], 1) * 1e6
    s["user_s"], s["sys_s"] = user, system
    s["cores"] = (user + system) / (s["duration_us"] / 1e6)
    s["rss_loaded_kib"] = loaded[0] if loaded else None
    s.pop("raw", None)
    return s


# ------------------------------------------------------------------ the run

def run(workers, rounds, duration, warmup, connections, threads, targets, python, out):
    cpus = available_cpus()
    notes = []
    if "haproxy" in targets and e2e.find_tool("haproxy") is None:
        targets = [t for t in targets if t != "haproxy"]
        notes.append("haproxy not installed: skipped (apt-get install haproxy)")
    if "fastlb-c" in targets and not e2e.fastlb_c_available(python):
        targets = [t if t != "fastlb-c" else "fastlb-py" for t in targets]
        notes.append("compiled core fastlb._core not built: fastlb-py (pure Python) instead")
    plans = {w: cpu_plan(w, cpus) for w in workers}
    shared = [w for w in workers if plans[w][0] is None]
    if shared:
        notes.append(f"W={','.join(map(str, shared))}: {SHARED_NOTE}")
    backend_workers = max(1, max(workers) // 2)

    def conns(w):
        return connections or max(64, 16 * w)

    def wrk_threads(w):
        if threads:
            return threads
        free = len(plans[w][1]) if plans[w][1] else len(cpus)
        return max(1, min(w, free // 2, conns(w)))

    load_before = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="fastlb-workers-", dir="/tmp")
    runs = {(w, t): [] for w in workers for t in targets}
    backend = None
    try:
        conf = os.path.join(workdir, "nginx-backend.conf")
        bport = e2e.free_port()
        with open(conf, "w") as f:
            f.write(e2e.nginx_backend_conf(workdir, bport, workers=backend_workers))
        backend = e2e.Server("backend", [e2e.find_tool("nginx"), "-p", workdir, "-c", conf],
                             bport, workdir, None)
        lua = e2e.write_lua(workdir)
        for r in range(rounds):
            for w in workers:
                proxy_cpus, load_cpus = plans[w]
                pin_tree(backend.pid, load_cpus or cpus)
                servers = []
                try:
                    for t in targets:
                        servers.append(e2e.start_target(
                            t, workdir, bport, cpulist(proxy_cpus) if proxy_cpus else None,
                            python, workers=w))
                    wait_settled(servers, {s.name: 1 if s.name == "haproxy" else w
                                           for s in servers})
                    idle = {s.name: memory(s) for s in servers}
                    if warmup > 0:
                        for s in servers:
                            e2e.run_wrk(s.port, warmup, conns(w), lua,
                                        cpulist(load_cpus) if load_cpus else None,
                                        wrk_threads(w))
                    for s in servers:
                        m = measure(s, duration, conns(w), wrk_threads(w), lua, load_cpus)
                        m["rss_idle_kib"], m["rss_master_kib"], m["nworkers"] = idle[s.name]
                        runs[(w, s.name)].append(m)
                        print(f"round {r + 1}/{rounds} W={w} {s.name:<9} {m['rps']:>9.0f} req/s"
                              f"  {m['cpu_us']:6.1f} µs/req  non2xx={m['non2xx']} "
                              f"socket_errors={m['socket_errors']}", file=out, flush=True)
                finally:
                    stop_all(servers, out)
    finally:
        if backend is not None:
            stop_all([backend], out)
        if os.environ.get("FASTLB_BENCH_KEEP") == "1":
            print(f"kept {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    config = {
        "workers": workers, "rounds": rounds, "duration_s": duration, "warmup_s": warmup,
        "connections": {w: conns(w) for w in workers},
        "wrk_threads": {w: wrk_threads(w) for w in workers},
        "backend_workers": backend_workers, "cpus": len(cpus),
        "pinned": {w: ({"proxy": cpulist(plans[w][0]), "load": cpulist(plans[w][1])}
                       if plans[w][0] else None) for w in workers},
        "targets": targets,
        "loadavg": (load_before, os.getloadavg()[0]),
    }
    return summarize(runs, config, notes)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs, config, notes):
    rows = []
    for (w, t), rs in runs.items():
        rows.append({
            "workers": w, "target": t,
            "rps": _median(r["rps"] for r in rs),
            "cpu_us": _median(r["cpu_us"] for r in rs),
            "cores": _median(r["cores"] for r in rs),
            "rss_idle_kib": _median(r["rss_idle_kib"] for r in rs),
            "rss_loaded_kib": _median(r["rss_loaded_kib"] for r in rs),
            "rss_master_kib": _median(r["rss_master_kib"] for r in rs),
            "nworkers": rs[0]["nworkers"] if rs else None,
            "requests": sum(r["requests"] for r in rs),
            "non2xx": sum(r["non2xx"] for r in rs),
            "socket_errors": sum(r["socket_errors"] for r in rs),
        })
    by = {(r["workers"], r["target"]): r for r in rows}
    first = min(config["workers"])
    for r in rows:
        ref = by.get((r["workers"], "nginx"))
        if ref and r["target"] != "nginx" and ref["rps"]:
            r["rps_vs_nginx"] = r["rps"] / ref["rps"]
            r["cpu_vs_nginx"] = r["cpu_us"] / ref["cpu_us"] if ref["cpu_us"] else None
        base = by.get((first, r["target"]))
        if base and base["rps"]:
            r["rps_vs_first"] = r["rps"] / base["rps"]
    return {"rows": rows, "config": config, "notes": notes,
            "runs": {f"{w}/{t}": rs for (w, t), rs in runs.items()}}


def errors(result):
    return {f"W={r['workers']} {r['target']}": (r["non2xx"], r["socket_errors"])
            for r in result["rows"] if r["non2xx"] or r["socket_errors"]}


def _mib(kib):
    return f"{kib / 1024:.1f}" if kib is not None else "-"


def _x(v):
    return f"{v:.2f}" if v is not None else ""


def format_markdown(result, command=None):
    c = result["config"]
    first = min(c["workers"])
    conns = sorted(set(c["connections"].values()))
    thr = sorted(set(c["wrk_threads"].values()))
    lines = []
    if command:
        lines += [f"    {command}", ""]
    rounds = f"{c['rounds']} round{'s' if c['rounds'] != 1 else ''}"
    lines.append(
        f"{c['cpus']} CPUs; wrk -t{'/'.join(map(str, thr))} -c{'/'.join(map(str, conns))} "
        f"-d{c['duration_s']}s (9 browser headers), {rounds} interleaved, medians; "
        f"backend: nginx, {c['backend_workers']} worker(s), 16-byte body; 1-min load average "
        f"{c['loadavg'][0]:.2f} before, {c['loadavg'][1]:.2f} after.")
    pinned = {w: p for w, p in c["pinned"].items() if p}
    for w, p in pinned.items():
        lines.append(f"W={w}: proxies on CPUs {p['proxy']}, wrk and backend on CPUs {p['load']}.")
    lines += [
        "",
        f"| W | target | req/s | ×W={first} | CPU µs/req | cores used | RSS/worker idle MiB "
        "| RSS/worker loaded MiB | master MiB | req/s ÷ nginx | CPU ÷ nginx | errors |",
        "|--:|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        rps = f"{r['rps']:,.0f}" if r["rps"] is not None else "-"
        cpu = f"{r['cpu_us']:.1f}" if r["cpu_us"] is not None else "-"
        lines.append(
            f"| {r['workers']} | {r['target']} | {rps} | {_x(r.get('rps_vs_first'))} | {cpu} "
            f"| {_x(r['cores'])} "
            f"| {_mib(r['rss_idle_kib'])} | {_mib(r['rss_loaded_kib'])} "
            f"| {_mib(r['rss_master_kib'])} | {_x(r.get('rps_vs_nginx'))} "
            f"| {_x(r.get('cpu_vs_nginx'))} | {r['non2xx'] + r['socket_errors']} |")
    lines.append("")
    if "haproxy" in c["targets"]:
        lines.append("haproxy is one process with W threads: its RSS is the whole process.")
    for n in result["notes"]:
        lines.append(f"Note: {n}.")
    return "\n".join(lines) + "\n"


def parse_workers(text):
    try:
        ws = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if not ws or min(ws) < 1:
        raise argparse.ArgumentTypeError("worker counts must be 1 or more")
    return sorted(set(ws))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=parse_workers, default=None,
                    help="comma list of worker counts (default 1,2,...,CPU count)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of wrk per target "
                    "before its measured run (0: none)")
    ap.add_argument("--connections", type=int, default=None,
                    help="wrk connections (default max(64, 16*W))")
    ap.add_argument("--threads", type=int, default=None,
                    help="wrk threads (default min(W, free CPUs // 2), at least 1)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma list of {','.join(KNOWN)} (default {','.join(TARGETS)})")
    ap.add_argument("--python", default=os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable,
                    help="interpreter that runs fastlb")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    ap.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    a = ap.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in KNOWN]
    if unknown:
        ap.error(f"unknown targets {', '.join(unknown)} (known: {', '.join(KNOWN)})")
    if a.rounds < 1 or a.duration < 1 or a.warmup < 0:
        ap.error("--rounds and --duration must be 1 or more, --warmup 0 or more")
    missing = [t for t in ("wrk", "nginx") if e2e.find_tool(t) is None]
    workers = a.workers or list(range(1, len(available_cpus()) + 1))
    if any(cpu_plan(w, available_cpus())[0] for w in workers) and e2e.find_tool("taskset") is None:
        missing.append("taskset")
    if missing:
        print(f"skipped: {', '.join(missing)} not installed "
              f"(Debian/Ubuntu: {e2e.INSTALL_HINT}; taskset is in util-linux)")
        return 0
    out = sys.stderr
    result = run(workers, a.rounds, a.duration, a.warmup, a.connections, a.threads, targets,
                 a.python, out)
    command = "python bench/workers.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = format_markdown(result, command.strip())
    print(text, end="")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    bad = errors(result)
    if bad:
        print(f"wrk saw errors (non-2xx, socket): {bad}", file=out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
