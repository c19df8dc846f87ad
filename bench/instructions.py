#!/usr/bin/env python3
"""User-space instructions per proxied request: fastlb, nginx and haproxy side by side.

    python bench/instructions.py                       # the default table (7-12 min here)
    python bench/instructions.py --logs off --connections 1                 # ~2 min
    python bench/instructions.py --rows big256 --logs off --connections 16 -n 300
    python bench/instructions.py --json /tmp/ir.json --keep /tmp/ir-dumps

Each proxy runs under ``valgrind --tool=callgrind`` (fastlb as ``python -m
fastlb serve``, nginx with ``master_process off; daemon off;``, haproxy with
``-db``), in front of the same three nginx backends that run outside valgrind
and serve short static bodies. For every measurement, after a warm-up with
the same request and connection count:

1. ``callgrind_control -z PID`` zeroes the proxy's counters;
2. ``h2load --h1 -n N -c C`` sends N keep-alive requests over C connections;
3. ``callgrind_control -d PID`` dumps the counters since the zero to a file;
4. the ``summary:`` line of that dump (every thread's Ir since the zero) / N
   is the figure: instructions executed in user space per request, the
   proxy's share of accepting, parsing, relaying and logging, the kernel's
   work excluded.

The ``summary:`` line is used, not ``totals:``. ``summary`` is each thread's
counter minus its value at the zero: it is 0 for a dump of an idle nginx and
grows linearly with N. ``totals`` sums the cost lines written, and in some
dumps (the first ones of a process) those still hold costs from before the
zero (seen up to 30 % too high, then equal to ``summary``), so it is only
recorded in the JSON.

Idle work counts too: a timer that fires while the requests run is in the
dump. Callgrind slows a proxy ~50x, so such work weighs ~50x more per request
than at native speed. Each target's idle rate (Ir per second with no traffic,
measured once per start, after the first warm-up) and each measurement's
length are in the JSON,
and the table's notes give the share of the figure they make.

Two parts of each figure are also shown apart, read from the dump: CPython's
cyclic GC (the inclusive cost of ``gc_collect_main``; fastlb only), and the
Ir in memcpy/memmove. Valgrind counts each byte that ``rep movsb`` moves as
one instruction (glibc's memcpy uses it for copies of a few KiB and more), so
a copy of a 256 KiB body weighs ~256,000 Ir, where the CPU takes a few
microseconds: for the big rows, read the memcpy share as "bytes copied".

What moves between repeats: with --no-rep-movsb nginx and haproxy repeat
within 0.5 %; counted per byte, their copies vary with read sizes (up to
~4.5 % for haproxy with big bodies). fastlb repeats within 0.1 % on a quiet
machine with one connection and small bodies; otherwise its count moves with work paid per second rather than per request
(its ticker, the access log's batch hand-off: their share grows with a
measurement's length), at 16 connections with how many ready sockets one
loop iteration serves, its per-connection work and CPython's GC (~1-3 %),
and with big bodies with how the body is split into reads (a body that
arrives with its head is sliced, i.e. copied; one that arrives alone is
not). The table gives each cell's spread, with and without GC.

Rows (``--rows``): ``small`` (``GET /``, 16-byte body, h2load's 2 headers),
``headers`` (``GET /`` with the 9 browser header lines of bench/inmem.py's
REQUEST), ``big`` (``GET /big``, 16 KiB), ``big256`` (``GET /big256``,
256 KiB); each with access logs off and on (``--logs``) and over 1 and 16
connections (``--connections``). Access logs, when on: nginx ``combined``
buffered (``buffer=64k flush=1s``), haproxy ``option httplog`` sent to a
unix datagram syslog socket that this script drains, fastlb ``--access-log
FILE``. Every measurement repeats (``--repeats``, 2); the repeats of one cell
should agree within 0.5 %, and the table says whether they did.

Nothing is installed: without valgrind, callgrind_control, h2load or nginx it
prints what is missing and the apt-get line and exits 0; without haproxy its
column shows "—". Everything runs on 127.0.0.1 on free ports, in one temp dir
under /tmp that is removed at the end; every process started is stopped by PID.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import BODY, REPO, Server, fastlb_c_available, find_tool, free_port, wait_port  # noqa: E402

APT_LINE = "apt-get install -y valgrind nghttp2-client nginx-light haproxy"
REQUIRED = ("valgrind", "callgrind_control", "h2load", "nginx")
ALL_TARGETS = ("fastlb", "nginx", "haproxy", "fastlb-py")
DEFAULT_TARGETS = ("fastlb", "nginx", "haproxy")
REFERENCE = "nginx"
BACKENDS = 3
BIG = 16 * 1024
BIG256 = 256 * 1024
AGREE = 0.005            # repeats of one cell should agree within 0.5 %
START_TIMEOUT = 180.0    # python under callgrind on a loaded machine starts slowly


def _browser_headers():
    """The 9 header lines of bench/inmem.py's REQUEST, as h2load -H arguments.

    Read from inmem.py's source, not imported: importing it would import
    fastlb into this process. Host goes as h2load's ``:authority``."""
    import ast

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "inmem.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "REQUEST":
            raw = ast.literal_eval(node.value)
            break
    else:  # pragma: no cover - inmem.py always defines it
        raise RuntimeError("bench/inmem.py has no REQUEST")
    args = []
    for line in raw.decode("latin-1").split("\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        args.append(f":authority: {value}" if name.lower() == "host" else f"{name}: {value}")
    return args


# name: (path, body bytes, extra h2load -H arguments, description)
ROWS = {
    "small": ("/", len(BODY), (), "GET / 16 B"),
    "headers": ("/", len(BODY), tuple(_browser_headers()), "GET / 16 B, 9 browser headers"),
    "big": ("/big", BIG, (), "GET /big 16 KiB"),
    "big256": ("/big256", BIG256, (), "GET /big256 256 KiB"),
}


def missing_tools():
    """Required tools that are not installed (haproxy is optional)."""
    return [t for t in REQUIRED if find_tool(t) is None]


# ------------------------------------------------------------------ configs

def backend_conf(workdir, name, port, root):
    """An nginx backend: ``/`` is a 16-byte ``return``, ``/big`` and ``/big256`` static files."""
    return f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        root {root};
        location = / {{ return 200 "{BODY}"; }}
        location / {{ }}
    }}
}}
"""


def nginx_proxy_conf(workdir, port, backend_ports, log_path):
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in backend_ports)
    log = (f"access_log {log_path} combined buffer=64k flush=1s;" if log_path
           else "access_log off;")
    return f"""
daemon off;
master_process off;
pid {workdir}/nginx-proxy.pid;
error_log {workdir}/nginx-proxy.error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    client_body_temp_path {workdir}/np-body;
    proxy_temp_path {workdir}/np-proxy;
    fastcgi_temp_path {workdir}/np-fcgi;
    uwsgi_temp_path {workdir}/np-uwsgi;
    scgi_temp_path {workdir}/np-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream backend {{
{servers}        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def haproxy_conf(port, backend_ports, syslog_path):
    servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(backend_ports))
    log_global = f"    log {syslog_path} len 4096 local0\n" if syslog_path else ""
    log_defaults = "    log global\n    option httplog\n" if syslog_path else ""
    return f"""
global
    nbthread 1
    maxconn 4096
{log_global}
defaults
    mode http
{log_defaults}    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
{servers}"""


# ------------------------------------------------------------------ processes

class SyslogSink:
    """A unix datagram socket that haproxy logs to; counts and drops the lines."""

    def __init__(self, path):
        self.path = path
        self.lines = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind(path)
        self._sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="syslog-sink", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            self.lines += 1

    def close(self):
        self._stop = True
        self._thread.join(timeout=5)
        self._sock.close()


# CPython's cyclic garbage collector: its cost (inclusive) is reported apart,
# because a collection lands in one measurement and not in the next.
GC_FUNCTIONS = frozenset({"gc_collect_main", "gc_collect_region"})
_COMPRESSED = re.compile(r"\((\d+)\)(?: (.*))?$")
_NAME_SPACE = {"fn": "fn", "cfn": "fn", "ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl",
               "fe": "fl", "cfi": "fl", "cfl": "fl"}


def read_dump(path, gc_functions=GC_FUNCTIONS):
    """Read a callgrind dump (first event, Ir): ``summary``, ``totals``, ``self`` (Ir by
    (function, object file), exclusive) and ``gc`` (Ir spent inside ``gc_functions``,
    inclusive, counted at the calls into them from other functions)."""
    names = {"fn": {}, "ob": {}, "fl": {}}
    own = {}
    summary = totals = None
    fn = ob = cfn = None
    gc = 0
    call_cost = False   # the line after "calls=" is the inclusive cost of that call

    def name(key, value):
        m = _COMPRESSED.match(value)
        if not m:
            return value
        table = names[_NAME_SPACE[key]]
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), value)

    with open(path) as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                ir = int(parts[1]) if len(parts) > 1 else 0
                if call_cost:
                    call_cost = False
                    if cfn in gc_functions and fn not in gc_functions:
                        gc += ir
                else:
                    key = (fn, ob)
                    own[key] = own.get(key, 0) + ir
                continue
            key, eq, value = line.rstrip("\n").partition("=")
            if eq:
                if key == "fn":
                    fn = name(key, value)
                elif key == "ob":
                    ob = name(key, value)
                elif key == "cfn":
                    cfn = name(key, value)
                elif key in _NAME_SPACE:
                    name(key, value)
                elif key == "calls":
                    call_cost = True
            elif line.startswith("summary:"):
                summary = int(line.split()[1])
            elif line.startswith("totals:"):
                totals = int(line.split()[1])
    return {"summary": summary, "totals": totals if totals is not None else summary,
            "self": own, "gc": gc}


def top_functions(d, n_requests, count=25):
    """Lines "Ir/request  share  function  [object]" for the ``count`` costliest functions."""
    total = sum(d["self"].values()) or 1
    rows = sorted(d["self"].items(), key=lambda kv: -kv[1])[:count]
    return [f"{ir / n_requests:>9,.0f} {100 * ir / total:5.1f} %  {fn}  "
            f"[{os.path.basename(ob or '?')}]" for (fn, ob), ir in rows]


class Callgrind:
    """A proxy under ``valgrind --tool=callgrind``: zero, dump and read its counters."""

    def __init__(self, name, argv, port, workdir, env=None):
        self.name, self.port, self.workdir = name, port, workdir
        self.out = os.path.join(workdir, f"{name}.cg")
        self.prefix = os.path.join(workdir, f"vgdb-{name}")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        cmd = [find_tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={self.out}",
               f"--vgdb-prefix={self.prefix}", "--vgdb=yes"] + argv
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                     start_new_session=True)
        try:
            wait_port(port, self.proc, timeout=START_TIMEOUT, name=name)
        except Exception:
            self.stop()
            raise RuntimeError(f"{name}: could not start under valgrind; log:\n"
                               f"{self.log_tail()}") from None

    @property
    def pid(self):
        return self.proc.pid

    def log_tail(self, n=3000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _control(self, *args):
        r = subprocess.run([find_tool("callgrind_control"), f"--vgdb-prefix={self.prefix}",
                            *args, str(self.pid)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or "OK" not in r.stdout:
            raise RuntimeError(f"callgrind_control {' '.join(args)} {self.name} "
                               f"failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    def zero(self):
        self._control("-z")

    def dump(self, keep_as=None):
        """Dump the counters since the last zero or dump; returns ``read_dump``'s dict."""
        self._control("-d")
        base = os.path.basename(self.out) + "."
        parts = [f for f in os.listdir(self.workdir)
                 if f.startswith(base) and f[len(base):].isdigit()]
        if not parts:
            raise RuntimeError(f"{self.name}: no callgrind dump in {self.workdir}")
        path = os.path.join(self.workdir, max(parts, key=lambda f: int(f[len(base):])))
        d = read_dump(path)
        if d["summary"] is None:
            raise RuntimeError(f"{self.name}: no summary line in {path}")
        if keep_as:
            shutil.move(path, keep_as)
        else:
            os.unlink(path)
        return d

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def check_python(python):
    """valgrind does not follow exec: the interpreter must be a binary, not a shim script."""
    with open(os.path.realpath(python), "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise RuntimeError(f"{python} is not an ELF binary (a pyenv shim?): valgrind would "
                               "measure the shell; set FASTLB_BENCH_PYTHON to the real interpreter")


IDLE_SECONDS = 2.0


def idle_rate(proc):
    """Ir per second that ``proc`` spends with no traffic (its timers)."""
    proc.zero()
    t0 = time.monotonic()
    time.sleep(IDLE_SECONDS)
    summary = proc.dump()["summary"]
    return summary / (time.monotonic() - t0)


# glibc's memcpy switches to ``rep movsb`` from a few KiB on, which valgrind counts
# as one instruction per byte; with this tunable it keeps its vector loop (what
# the CPU runs at about the same speed), so the count of a copy is closer to its
# cost. Used with --no-rep-movsb, for every target alike.
NO_REP_MOVSB = "glibc.cpu.x86_rep_movsb_threshold=4611686018427387904"


def target_env(tunables=None):
    env = dict(os.environ)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return env


def start_target(name, workdir, backend_ports, python, log, tunables=None):
    """Start ``name`` under callgrind; ``log``: access logs on; ``tunables``: a
    GLIBC_TUNABLES value. Returns (Callgrind, lines logged so far or None, syslog sink)."""
    port = free_port()
    lines = None  # () -> lines logged so far, or None when not logging
    if name == "nginx":
        log_path = os.path.join(workdir, "nginx-access.log") if log else None
        conf = os.path.join(workdir, "nginx-proxy.conf")
        with open(conf, "w") as f:
            f.write(nginx_proxy_conf(workdir, port, backend_ports, log_path))
        proc = Callgrind(name, [find_tool("nginx"), "-p", workdir, "-c", conf], port, workdir,
                         env=target_env(tunables))
        if log_path:
            lines = lambda: count_lines(log_path)  # noqa: E731
        return proc, lines, None
    if name == "haproxy":
        sink = SyslogSink(os.path.join(workdir, "haproxy.sock")) if log else None
        conf = os.path.join(workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(haproxy_conf(port, backend_ports, sink.path if sink else None))
        try:
            proc = Callgrind(name, [find_tool("haproxy"), "-db", "-f", conf], port, workdir,
                             env=target_env(tunables))
        except Exception:
            if sink:
                sink.close()
            raise
        if sink:
            lines = lambda: sink.lines  # noqa: E731
        return proc, lines, sink
    if name in ("fastlb", "fastlb-py"):
        env = target_env(tunables)
        env.pop("FASTLB_NO_EXTENSIONS", None)
        env.pop("FASTLB_REQUIRE_EXTENSIONS", None)
        env["FASTLB_REQUIRE_EXTENSIONS" if name == "fastlb" else "FASTLB_NO_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        log_path = os.path.join(workdir, f"{name}-access.log") if log else None
        argv = [python, "-m", "fastlb", "serve", "--listen", f"127.0.0.1:{port}",
                "--access-log", log_path or "off", "--log-level", "warning",
                "--drain-timeout", "1"]
        for p in backend_ports:
            argv += ["--backend", f"http://127.0.0.1:{p}"]
        proc = Callgrind(name, argv, port, workdir, env=env)
        if log_path:
            lines = lambda: count_lines(log_path)  # noqa: E731
        return proc, lines, None
    raise ValueError(name)


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


# ------------------------------------------------------------------ h2load

_H2_REQ = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout")
_H2_STATUS = re.compile(r"status codes: (\d+) 2xx")
_H2_DATA = re.compile(r"\((\d+)\) data")


def h2load(port, row, n, connections, timeout=600):
    """``h2load --h1 -n n -c connections`` for ``row``; raises unless every request got a
    2xx with the whole body."""
    path, size, headers, _ = ROWS[row]
    cmd = [find_tool("h2load"), "--h1", "-n", str(n), "-c", str(connections)]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    req, st, data = (_H2_REQ.search(r.stdout), _H2_STATUS.search(r.stdout),
                     _H2_DATA.search(r.stdout))
    if r.returncode != 0 or not (req and st and data):
        raise RuntimeError(f"h2load failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    ok, ok2xx, body = int(req.group(4)), int(st.group(1)), int(data.group(1))
    if ok != n or ok2xx != n or body != n * size:
        raise RuntimeError(f"h2load: {ok}/{n} succeeded, {ok2xx} 2xx, {body} body bytes "
                           f"(expected {n * size}):\n{r.stdout}")


# ------------------------------------------------------------------ the run

def default_n(row, connections):
    """Requests per measurement. fastlb's work per connection (accept, close, the
    cyclic GC of its protocol objects) varies by ~20,000 Ir from run to run, so the
    small rows take ~250 requests per connection; the big ones vary by how the
    body is split into reads whatever N is, and are slow under callgrind."""
    if row == "big256":
        return 400
    if row == "big":
        return 1000
    return max(1000, 250 * connections)


def run(targets=DEFAULT_TARGETS, rows=tuple(ROWS), logs=(False, True), connections=(1, 16),
        n=None, repeats=2, warmup=None, keep=None, python=None, no_rep_movsb=False,
        top=0, out=sys.stderr):
    """Measure every cell; returns a dict (see ``format_table`` and ``--json``)."""
    python = python or os.environ.get("FASTLB_BENCH_PYTHON") or sys.executable
    targets = list(targets)
    notes = []
    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: {APT_LINE}")
    if "haproxy" in targets and find_tool("haproxy") is None:
        targets.remove("haproxy")
        notes.append("haproxy not installed: its column is empty (apt-get install -y haproxy)")
    if any(t.startswith("fastlb") for t in targets):
        check_python(python)
    if "fastlb" in targets and not fastlb_c_available(python):
        targets.remove("fastlb")
        notes.append("compiled core not built (python setup.py build_ext --inplace): "
                     "fastlb skipped")
    if keep:
        os.makedirs(keep, exist_ok=True)

    workdir = tempfile.mkdtemp(prefix="fastlb-ir-", dir="/tmp")
    cells = []
    idle = {}     # target -> [Ir per second with no traffic, per start]
    backends = []
    running = []
    try:
        # nginx started as root serves files as "nobody": the dirs must be traversable
        os.chmod(workdir, 0o755)
        root = os.path.join(workdir, "www")
        os.mkdir(root, 0o755)
        for fname, size in (("big", BIG), ("big256", BIG256)):
            with open(os.path.join(root, fname), "wb") as f:
                f.write((b"0123456789abcdef" * (size // 16 + 1))[:size])
        bports = []
        for i in range(BACKENDS):
            name = f"backend{i}"
            port = free_port()
            conf = os.path.join(workdir, f"{name}.conf")
            with open(conf, "w") as f:
                f.write(backend_conf(workdir, name, port, root))
            backends.append(Server(name, [find_tool("nginx"), "-p", workdir, "-c", conf],
                                   port, workdir, None))
            bports.append(port)

        running_logs = []   # the log settings done before this one
        for log in logs:
            running = []
            logged = {}   # target -> requests sent, to compare with the lines logged
            for t in targets:
                print(f"starting {t} under callgrind (access log {'on' if log else 'off'})",
                      file=out, flush=True)
                proc, lines, sink = start_target(t, workdir, bports, python, log,
                                                 NO_REP_MOVSB if no_rep_movsb else None)
                running.append((t, proc, lines, sink))
                logged[t] = 0
            for row in rows:
                for c in connections:
                    rn = n or default_n(row, c)
                    cell = {"row": row, "log": log, "connections": c, "n": rn, "targets": {}}
                    for t, proc, _, _ in running:
                        w = warmup if warmup is not None else max(200, 10 * c)
                        h2load(proc.port, row, w, c)
                        logged[t] += w
                        if len(idle.get(t, ())) < len(running_logs) + 1:
                            # once per start, after traffic: startup work is over
                            idle.setdefault(t, []).append(idle_rate(proc))
                        reps = []
                        for r in range(repeats):
                            proc.zero()
                            t0 = time.monotonic()
                            h2load(proc.port, row, rn, c)
                            secs = time.monotonic() - t0
                            logged[t] += rn
                            keep_as = None
                            if keep:
                                keep_as = os.path.join(
                                    keep, f"{t}-{row}-c{c}-log{'on' if log else 'off'}-r{r + 1}.cg")
                            d = proc.dump(keep_as)
                            copy = sum(v for (f, _), v in d["self"].items()
                                       if f and ("memcpy" in f or "memmove" in f))
                            reps.append({"ir": d["summary"] / rn, "gc_ir": d["gc"] / rn,
                                         "memcpy_ir": copy / rn,
                                         "summary": d["summary"], "totals": d["totals"],
                                         "seconds": secs})
                        irs = [x["ir"] for x in reps]
                        mean = sum(irs) / len(irs)
                        secs = sum(x["seconds"] for x in reps) / len(reps)
                        nogc = [x["ir"] - x["gc_ir"] for x in reps]
                        mean_nogc = sum(nogc) / len(nogc)
                        cell["targets"][t] = {
                            "ir": mean,
                            "memcpy_ir": sum(x["memcpy_ir"] for x in reps) / len(reps),
                            "gc_ir": mean - mean_nogc,
                            "spread_without_gc": ((max(nogc) - min(nogc)) / mean_nogc
                                                  if mean_nogc else 0.0),
                            "idle_share": idle[t][-1] * secs / rn / mean if mean else 0.0,
                            "spread": (max(irs) - min(irs)) / mean if mean else 0.0,
                            "repeats": reps,
                        }
                        print(f"  {t:<9} {row:<8} c={c:<3} log={'on ' if log else 'off'} "
                              f"{' '.join(f'{x:,.0f}' for x in irs)} Ir/request "
                              f"({secs:.1f} s each)",
                              file=out, flush=True)
                        if top:
                            print("\n".join(f"      {x}" for x in top_functions(d, rn, top)),
                                  file=out, flush=True)
                    cells.append(cell)
            for t, proc, lines, sink in running:
                proc.stop()
                if lines is not None:
                    got = lines()
                    if got < logged[t]:
                        notes.append(f"{t}: {got} access log lines received for {logged[t]} "
                                     "requests" + (" (the kernel drops syslog datagrams that "
                                                   "find the socket full)" if sink else ""))
                if sink:
                    sink.close()
            running = []
            running_logs.append(log)
    finally:
        for _, proc, _, sink in running:
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {proc.name}: {e}", file=out)
            if sink:
                sink.close()
        for b in backends:
            try:
                b.stop()
            except Exception as e:
                print(f"stopping {b.name}: {e}", file=out)
        shutil.rmtree(workdir, ignore_errors=True)

    for cell in cells:
        ref = cell["targets"].get(REFERENCE)
        for t, v in cell["targets"].items():
            if ref and ref["ir"]:
                v["vs_nginx"] = v["ir"] / ref["ir"]
    for t in targets:
        shares = [c["targets"][t]["idle_share"] for c in cells if t in c["targets"]]
        if shares and max(idle[t]) > 0:
            notes.append(f"{t}: {max(idle[t]):,.0f} Ir/s when idle (timers); that is "
                         f"{100 * min(shares):.2f}-{100 * max(shares):.2f} % of its figures "
                         "under callgrind's slowdown")
    spread = max((v["spread"] for c in cells for v in c["targets"].values()), default=0.0)
    spread_nogc = max((v["spread_without_gc"] for c in cells for v in c["targets"].values()),
                      default=0.0)
    return {
        "cells": cells,
        "targets": targets,
        "config": {"repeats": repeats, "warmup": warmup, "backends": BACKENDS,
                   "connections": list(connections), "rows": list(rows),
                   "logs": ["on" if x else "off" for x in logs],
                   "no_rep_movsb": no_rep_movsb},
        "idle_ir_per_s": idle,
        "max_spread": spread,
        "max_spread_without_gc": spread_nogc,
        "agree": spread <= AGREE,
        "agree_without_gc": spread_nogc <= AGREE,
        "versions": versions(python),
        "notes": notes,
    }


def versions(python):
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        text = (r.stdout or r.stderr).strip()
        return text.splitlines()[0] if text else None

    return {
        "valgrind": first_line([find_tool("valgrind") or "valgrind", "--version"]),
        "nginx": first_line([find_tool("nginx") or "nginx", "-v"]),
        "haproxy": first_line([find_tool("haproxy") or "haproxy", "-v"]),
        "h2load": first_line([find_tool("h2load") or "h2load", "--version"]),
        "python": first_line([python, "--version"]),
    }


def _fmt(v):
    return f"{v:,.0f}" if v is not None else "—"


def format_table(result):
    """The result as a markdown table and its notes."""
    shown = [t for t in ALL_TARGETS if t in result["targets"] or t in DEFAULT_TARGETS]
    others = [t for t in shown if t != REFERENCE]
    gc_cols = [t for t in shown if t.startswith("fastlb") and t in result["targets"]]
    head = (["request", "conns", "access log"] + shown + [f"{t} ÷ nginx" for t in others]
            + [f"{t} of it GC" for t in gc_cols]
            + ["of it memcpy (" + " / ".join(shown) + ")", "repeats differ (w/o GC)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["cells"]:
        tv = c["targets"]
        row = [ROWS[c["row"]][3], str(c["connections"]), "on" if c["log"] else "off"]
        row += [_fmt(tv[t]["ir"]) if t in tv else "—" for t in shown]
        row += [f"{tv[t]['vs_nginx']:.2f}" if t in tv and "vs_nginx" in tv[t] else "—"
                for t in others]
        row += [_fmt(tv[t]["gc_ir"]) if t in tv else "—" for t in gc_cols]
        row.append(" / ".join(_fmt(tv[t]["memcpy_ir"]) if t in tv else "—" for t in shown))
        sp = max((v["spread"] for v in tv.values()), default=0.0)
        sp_nogc = max((v["spread_without_gc"] for v in tv.values()), default=0.0)
        row.append(f"{100 * sp:.2f} % ({100 * sp_nogc:.2f} %)")
        lines.append("| " + " | ".join(row) + " |")
    reps = result["config"]["repeats"]
    lines.append("")
    lines.append(
        f"User-space instructions (callgrind Ir) per request, mean of {reps} repeats. "
        f"Repeats differ by up to {100 * result['max_spread']:.2f} % "
        f"({'within' if result['agree'] else 'NOT within'} 0.5 %); leaving out CPython's "
        f"cyclic GC, which runs in some measurements and not others, by up to "
        f"{100 * result['max_spread_without_gc']:.2f} % "
        f"({'within' if result['agree_without_gc'] else 'NOT within'} 0.5 %). "
        + ("memcpy: Ir in memcpy/memmove, glibc kept off `rep movsb` (--no-rep-movsb)."
           if result["config"].get("no_rep_movsb") else
           "memcpy: Ir in memcpy/memmove, where valgrind counts each byte of a `rep movsb` "
           "as an instruction."))
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _csv(value, allowed, what):
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: {','.join(bad) or value!r} not in {','.join(allowed)}")
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma list of {','.join(ALL_TARGETS)} (default %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma list of {','.join(ROWS)} (default: all)")
    p.add_argument("--logs", default="off,on", help="off, on or off,on (default)")
    p.add_argument("--connections", default="1,16", help="comma list (default 1,16)")
    p.add_argument("-n", "--requests", type=int, default=None,
                   help="requests per measurement (default: 1000, 250 per connection "
                        "for small and headers, 400 for big256)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per cell (default 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests before each cell (default max(200, 10 x conns))")
    p.add_argument("--no-rep-movsb", action="store_true",
                   help="run the proxies with glibc's memcpy kept off rep movsb, which "
                        "valgrind counts per byte (GLIBC_TUNABLES)")
    p.add_argument("--top", type=int, default=0, metavar="K",
                   help="print each measurement's K costliest functions (self Ir per "
                        "request, last repeat) to stderr")
    p.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--keep", metavar="DIR",
                   help="keep every measured callgrind dump in DIR (for callgrind_annotate)")
    a = p.parse_args(argv)
    targets = _csv(a.targets, ALL_TARGETS, "targets")
    rows = _csv(a.rows, tuple(ROWS), "rows")
    logs = [x == "on" for x in _csv(a.logs, ("off", "on"), "logs")]
    conns = [int(x) for x in a.connections.split(",") if x.strip()]
    if not conns or min(conns) < 1 or a.repeats < 1 or (a.requests is not None
                                                         and a.requests < max(conns)):
        raise SystemExit("--connections must be >= 1, --repeats >= 1, -n >= connections")
    missing = missing_tools()
    if missing:
        print(f"skipped: {', '.join(missing)} not found; install with: {APT_LINE}")
        return 0
    result = run(targets, rows, logs, conns, a.requests, a.repeats, a.warmup, a.keep,
                 no_rep_movsb=a.no_rep_movsb, top=a.top)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
