"""``fastlb serve --workers N``: real master and worker processes, real
backends, real client connections.

Which worker holds a client connection is found from the kernel: the
server-side socket of the connection in /proc/net/tcp, and the worker whose
/proc/PID/fd has it.
"""
import os
import re
import signal
import threading
import time

import pytest

from helpers import wait_for as _wait_for
from helpers import (  # noqa: F401  (fixtures are used by name)
    FastlbProcess, Reader, Reply, active_core, backend_loop, make_backend, ok_response,
    raw_connect)

pytestmark = pytest.mark.usefixtures("active_core")


def children(pid):
    """Live child processes of ``pid`` (the workers of a master)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def wait_for(cond, timeout=10.0, every=0.05):
    return _wait_for(cond, timeout, every)


def _inode_of(server_port, client_port):
    want_local = f"{server_port:04X}"
    want_remote = f"{client_port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], parts[9]
            if local.endswith(":" + want_local) and remote.endswith(":" + want_remote):
                return inode
    return None


def owner(pids, server_port, sock, timeout=3.0):
    """The pid among ``pids`` that holds the server side of client ``sock``
    (waiting for a worker to accept it: the connection may still be queued)."""
    return wait_for(lambda: _owner(pids, server_port, sock), timeout, 0.01)


def _owner(pids, server_port, sock):
    inode = _inode_of(server_port, sock.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


def request(sock, path="/", timeout=5.0):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return Reader(sock, timeout).read_response()


def serve(backends, n=3, *extra):
    lb = FastlbProcess(backends, "--workers", str(n), *extra)
    pids = wait_for(lambda: len(children(lb.proc.pid)) == n and children(lb.proc.pid))
    assert len(pids) == n, f"expected {n} workers, found {pids}"
    return lb, pids


def stop(lb):
    code = lb.terminate(timeout=30)
    return code


def log_text(lb):
    return b"".join(lb.stderr_lines).decode("utf-8", "replace")


def test_every_worker_serves_and_connections_spread(make_backend):
    be = make_backend("A")
    lb, pids = serve([be.addr], 3)
    try:
        socks = []
        by_pid = {p: 0 for p in pids}
        for _ in range(150):
            s = raw_connect(lb.port)
            socks.append(s)
            assert request(s).status == 200
            by_pid[owner(pids, lb.port, s)] += 1
        # SO_REUSEPORT spreads by the connection's hash: every worker gets a share
        assert all(n >= 10 for n in by_pid.values()), by_pid
        assert sum(by_pid.values()) == 150
        for s in socks:
            s.close()
    finally:
        assert stop(lb) == 0
    assert "3 workers" in lb.startup.decode()


def _load(port, stop_at, errors, done, path="/"):
    """New connection per request until ``stop_at``: any failure is recorded."""
    while time.monotonic() < stop_at:
        try:
            with raw_connect(port, timeout=10) as s:
                r = request(s, path, timeout=10)
                if r.status != 200:
                    errors.append((time.monotonic(), r.status))
                else:
                    done.append(1)
        except Exception as e:      # a reset, a refusal, a timeout: all count
            errors.append((time.monotonic(), repr(e)))


def _run_load(port, seconds, threads=4, path="/"):
    errors, done = [], []
    stop_at = time.monotonic() + seconds
    ts = [threading.Thread(target=_load, args=(port, stop_at, errors, done, path))
          for _ in range(threads)]
    for t in ts:
        t.start()
    return ts, errors, done


def test_killed_worker_is_restarted_and_others_never_notice(make_backend):
    be = make_backend("A")
    lb, pids = serve([be.addr], 3)
    try:
        # keep-alive connections on every worker, opened before the kill
        held = []
        for _ in range(60):
            s = raw_connect(lb.port)
            assert request(s).status == 200
            held.append((s, owner(pids, lb.port, s)))
        victim = pids[1]
        ts, errors, done = _run_load(lb.port, 3.0)
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new = wait_for(lambda: [p for p in children(lb.proc.pid) if p not in pids], 5.0)
        restarted_in = time.monotonic() - t_kill
        for t in ts:
            t.join(20)
        assert new, "no worker took the place of the killed one"
        assert restarted_in < 1.5
        # Only what the killed worker had accepted is lost: at most the one
        # request each load thread had in flight there at the kill. Every
        # connection made after it succeeded: the killed worker's sockets
        # stayed open in the master, and the new worker serves what queued.
        assert len(errors) <= 4, errors
        for t, what in errors:
            assert t_kill <= t < t_kill + 0.5 and ("closed" in what or "reset" in what), errors
        assert len(done) > 20
        # the connections of the other workers carry on; the killed one's are gone
        for s, pid in held:
            if pid == victim:
                with pytest.raises((EOFError, OSError)):
                    request(s, timeout=2)
            else:
                assert request(s).status == 200
            s.close()
        assert sum(1 for _, p in held if p == victim) > 0
        # the new worker serves
        workers = children(lb.proc.pid)
        assert len(workers) == 3
        assert "killed by signal SIGKILL: restarting it" in log_text(lb)
    finally:
        assert stop(lb) == 0


def test_worker_dying_young_again_is_restarted_with_a_back_off(make_backend):
    be = make_backend("A")
    lb, pids = serve([be.addr], 2)
    try:
        os.kill(pids[0], signal.SIGKILL)
        first = wait_for(lambda: [p for p in children(lb.proc.pid) if p not in pids], 5.0)
        assert first
        wait_for(lambda: "restarting it\n" in log_text(lb), 2.0)
        # dies again at once: restarted after a back-off, and the master says so
        os.kill(first[0], signal.SIGKILL)
        assert wait_for(lambda: "2 times in a row" in log_text(lb), 3.0), log_text(lb)
        again = wait_for(lambda: [p for p in children(lb.proc.pid)
                                  if p not in pids and p not in first], 5.0)
        assert again
        with raw_connect(lb.port) as s:
            assert request(s).status == 200
    finally:
        assert stop(lb) == 0


def test_sigterm_drains_requests_in_flight_on_every_worker(make_backend):
    def slow(be, req):
        time.sleep(0.8)
        return ok_response(b"slow")
    be = make_backend("A", handler=slow)
    lb, pids = serve([be.addr], 2)
    try:
        socks = []
        seen = set()
        for _ in range(40):
            s = raw_connect(lb.port, timeout=10)
            socks.append(s)
            seen.add(owner(pids, lb.port, s))
            if len(seen) == 2 and len(socks) >= 6:
                break
        assert seen == set(pids)
        for s in socks:
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        lb.proc.send_signal(signal.SIGTERM)
        for s in socks:
            r = Reader(s, 10).read_response()
            assert r.status == 200 and r.body == b"slow"
            assert r.get("connection") == "close"
            s.close()
        assert lb.proc.wait(20) == 0
        # no connection is accepted any more
        with pytest.raises(OSError):
            raw_connect(lb.port, timeout=2)
    finally:
        lb.kill()


def test_active_checks_run_once_per_backend_whatever_the_workers(make_backend):
    be = make_backend("A")
    lb, pids = serve([be.addr], 3, "--health-path", "/healthz", "--health-interval", "0.5")
    try:
        time.sleep(0.8)     # past the first check's jitter
        before = sum(1 for r in be.requests if r.target == "/healthz")
        time.sleep(3.0)
        probes = sum(1 for r in be.requests if r.target == "/healthz") - before
        # one check every 0.5 s: 6 in 3 s (not 18, one per worker)
        assert 4 <= probes <= 8, probes
    finally:
        assert stop(lb) == 0


def test_active_check_verdict_reaches_every_worker(make_backend):
    healthy = {"ok": True}

    def handler(be, req):
        if req.target == "/healthz":
            return ok_response() if healthy["ok"] else \
                b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"
        return ok_response(be.name.encode())
    a = make_backend("A", handler=handler)
    b = make_backend("B", handler=lambda be, req: ok_response(be.name.encode()))
    lb, pids = serve([a.addr, b.addr], 3, "--health-path", "/healthz", "--health-interval",
                     "0.3", "--health-fall", "1")
    try:
        healthy["ok"] = False   # only A's checks fail
        time.sleep(1.0)
        bodies = []
        owners = set()
        for _ in range(60):
            with raw_connect(lb.port) as s:
                r = request(s)
                owners.add(owner(pids, lb.port, s))
                bodies.append(r.body)
        assert owners == set(pids)
        assert bodies.count(b"A") == 0, bodies.count(b"A")
        assert bodies.count(b"B") == 60
    finally:
        assert stop(lb) == 0


def test_passive_ejection_on_one_worker_is_applied_on_all(make_backend):
    # B accepts and closes without answering: a backend fault on every try
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: Reply(None, close=True))
    lb, pids = serve([a.addr, b.addr], 3, "--eject-after", "2", "--eject-base", "30")
    try:
        # find a keep-alive connection on the first worker, and send traffic
        # only through it until B has failed twice there
        s0 = None
        for _ in range(100):
            s = raw_connect(lb.port)
            assert request(s).status == 200
            if owner(pids, lb.port, s) == pids[0]:
                s0 = s
                break
            s.close()
        assert s0 is not None
        start = b.connections
        for _ in range(20):
            assert request(s0).body == b"A"     # retried on A: never an error
            if b.connections - start >= 2 and "ejected" in log_text(lb):
                break
        assert wait_for(lambda: "ejected for 30s" in log_text(lb), 3.0), log_text(lb)
        time.sleep(0.3)     # the decision is in the table; every worker reads it
        hits = b.connections
        others = set()
        for _ in range(60):
            with raw_connect(lb.port) as s:
                assert request(s).body == b"A"
                others.add(owner(pids, lb.port, s))
        assert others >= set(pids[1:])
        # no worker tried B again: the ejection decided on worker 0 is everyone's
        assert b.connections == hits
    finally:
        assert stop(lb) == 0


def _toml(pools, listeners=(("web", "app"),), workers=2):
    out = [f"workers = {workers}\n"]
    for name, pool in listeners:
        out.append(f'[listeners.{name}]\nbind = "127.0.0.1:0"\ndefault_pool = "{pool}"\n')
    for name, bes in pools.items():
        out.append(f"[pools.{name}]\nbackends = [{', '.join(repr(f'http://127.0.0.1:{b.port}') for b in bes)}]\n".replace("'", '"'))
    return "".join(out)


def _serve_file(tmp_path, text, n):
    path = tmp_path / "fastlb.toml"
    path.write_text(text)
    pid_file = tmp_path / "fastlb.pid"
    lb = FastlbProcess(None, "--config", str(path), "--pid-file", str(pid_file))
    pids = wait_for(lambda: len(children(lb.proc.pid)) == n and children(lb.proc.pid))
    assert pids and len(pids) == n
    assert wait_for(pid_file.exists, 5)
    return lb, path, pids


def test_reload_under_load_across_workers_loses_no_request(tmp_path, make_backend):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    lb, path, pids = _serve_file(tmp_path, _toml({"app": [a]}), 2)
    try:
        ts, errors, done = _run_load(lb.port, 3.0)
        time.sleep(1.0)
        path.write_text(_toml({"app": [a, b]}))
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded (" in log_text(lb), 10), log_text(lb)
        for t in ts:
            t.join(20)
        assert errors == [], errors[:5]
        assert len(done) > 50
        assert "pool app: backends +1 -0" in log_text(lb)
        # a new generation serves; the old one drained and exited
        new = wait_for(lambda: (lambda c: c if len(c) == 2 and not set(c) & set(pids)
                                else None)(children(lb.proc.pid)), 10)
        assert new, children(lb.proc.pid)
        bodies = []
        for _ in range(20):
            with raw_connect(lb.port) as s:
                bodies.append(request(s).body)
        assert bodies.count(b"B") >= 5 and bodies.count(b"A") >= 5
    finally:
        assert stop(lb) == 0


def test_invalid_reload_keeps_the_workers(tmp_path, make_backend):
    a = make_backend("A")
    lb, path, pids = _serve_file(tmp_path, _toml({"app": [a]}), 2)
    try:
        path.write_text(_toml({"app": [a]}) + "[pools.app.health]\nrise = 0\n")
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in log_text(lb), 10)
        assert "pools.app.health.rise" in log_text(lb)
        time.sleep(0.3)
        assert children(lb.proc.pid) == pids
        with raw_connect(lb.port) as s:
            assert request(s).status == 200
    finally:
        assert stop(lb) == 0


def test_reload_adds_and_removes_listeners_across_workers(tmp_path, make_backend):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    lb, path, pids = _serve_file(tmp_path, _toml({"app": [a]}, (("web", "app"), ("old", "app"))),
                                 2)
    try:
        ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)",
                                            lb.startup.decode() + log_text(lb))]
        assert len(ports) == 2
        web_port, old_port = ports
        with raw_connect(old_port) as s:
            assert request(s).body == b"A"
        path.write_text(_toml({"app": [a]}, (("web", "app"), ("new", "app"))))
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded (" in log_text(lb), 10), log_text(lb)
        assert wait_for(lambda: "generation 1) are done" in log_text(lb), 10), log_text(lb)
        with pytest.raises(OSError):
            raw_connect(old_port, timeout=2)
        with raw_connect(web_port) as s:
            assert request(s).body == b"A"
        m = re.search(r"listener new listening on 127\.0\.0\.1:(\d+)", log_text(lb))
        assert m, log_text(lb)
        for _ in range(10):     # on every worker
            with raw_connect(int(m.group(1))) as s:
                assert request(s).body == b"A"
    finally:
        assert stop(lb) == 0


@pytest.mark.parametrize("value,expect", [
    ("3", 3), ('"auto"', None), ('"AUTO"', None),
    ("0", "must be at least 1, got 0"), ("513", "at most 512, got 513"),
    ('"many"', 'expected a number of workers (1 to 512) or auto, got "many"'),
    ("2.5", "expected an integer, got 2.5"), ("true", "expected an integer, got true"),
])
def test_workers_key_is_checked(value, expect):
    from fastlb.config import loads
    from fastlb.errors import ConfigError
    from fastlb.validate import cpu_count

    text = (f"workers = {value}\n[listeners.web]\nbind = \"127.0.0.1:0\"\ndefault_pool = \"a\"\n"
            "[pools.a]\nbackends = [\"http://127.0.0.1:1\"]\n")
    if isinstance(expect, str):
        with pytest.raises(ConfigError) as e:
            loads(text, "f.toml", resolve=False)
        assert "workers" in str(e.value) and expect in str(e.value), str(e.value)
    else:
        c = loads(text, "f.toml", resolve=False)
        assert c.workers == (expect if expect is not None else cpu_count())


def test_workers_flag_errors_name_the_flag():
    from helpers import run_fastlb

    p = run_fastlb("serve", "--workers", "0", "--backend", "http://127.0.0.1:1")
    assert p.returncode == 2
    assert "--workers: must be at least 1, got 0" in p.stderr

