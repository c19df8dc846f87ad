"""The command line, run as a subprocess: ``python -m fastlb ...``."""
import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from fastlb import core as _core_switch
from fastlb import proxy as _proxy_switch
from helpers import (  # noqa: F401  (fixtures are used by name)
    HOST,
    FastlbProcess,
    active_core,
    backend_loop,
    fastlb_cmd,
    make_backend,
    REPO,
    run_fastlb,
)

pytestmark = [pytest.mark.usefixtures("active_core"), pytest.mark.timeout(60)]


def _one_line_error(proc):
    assert proc.returncode != 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 1, proc.stderr
    return lines


def test_version_names_core():
    p = run_fastlb("--version")
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    m = re.search(r"fastlb \S+ \((py|c) core, (py|c) data path\)", out)
    assert m, out
    assert m.group(1) == _core_switch.IMPL
    assert m.group(2) == _proxy_switch.IMPL


@pytest.mark.parametrize("args", [
    ["serve", "--no-such-flag"],
    ["serve", "--backend", "http://127.0.0.1:1", "--connect-timeout", "-1"],
    ["serve", "--backend", "http://127.0.0.1:1", "--connect-timeout", "abc"],
    ["bogus-command"],
    ["serve", "--backend", "http://127.0.0.1:1", "--max-ejected-percent", "101"],
    ["serve", "--backend", "http://127.0.0.1:1", "--max-ejected-percent", "-5"],
    ["serve", "--backend", "http://127.0.0.1:1", "--max-ejected-percent", "half"],
], ids=["unknown-flag", "negative-timeout", "non-number", "unknown-command",
        "eject-percent-over", "eject-percent-negative", "eject-percent-text"])
def test_bad_flag(args):
    p = run_fastlb(*args)
    lines = _one_line_error(p)
    assert p.returncode == 2
    assert lines[-1].startswith("fastlb") and "error" in lines[-1], p.stderr


@pytest.mark.parametrize("url", [
    "ws://127.0.0.1:8443",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:80/path",
    "http://:80",
    "ftp://x:1",
    "http://user@127.0.0.1:80",
    "http://127.0.0.1:abc",
], ids=["ws", "port-range", "path", "no-host", "ftp", "userinfo", "port-text"])
def test_bad_backend_url(url):
    p = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", url)
    lines = _one_line_error(p)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("fastlb: error:"), p.stderr
    assert p.returncode == 2


# Host name lookups in these tests never leave the machine: with
# RES_OPTIONS=attempts:0 the C resolver sends no query at all (names in
# /etc/hosts, such as localhost, still resolve; any other name fails).
LOCAL_DNS = dict(os.environ, RES_OPTIONS="attempts:0")


@pytest.mark.parametrize("url", ["foo", "foo:8080", "127.0.0.1:8080", "localhost:8080,weight=2"])
def test_backend_without_scheme_is_an_error(url):
    p = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", url, timeout=15,
                   env=LOCAL_DNS)
    lines = _one_line_error(p)
    assert p.returncode == 2
    assert lines == [f"fastlb: error: --backend {url.partition(',')[0]}: no scheme: "
                     "expected http://HOST[:PORT] or https://HOST[:PORT]"], p.stderr


def test_backend_port_zero_is_an_error():
    p = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", "http://127.0.0.1:0",
                   timeout=15)
    assert _one_line_error(p) == [
        "fastlb: error: --backend http://127.0.0.1:0: port must be from 1 to 65535"]
    assert p.returncode == 2


@pytest.mark.parametrize("backends, bad", [
    (["http://nonexistent.invalid"], "http://nonexistent.invalid"),
    (["http://127.0.0.1:1", "http://nonexistent.invalid:8080,weight=3"],
     "http://nonexistent.invalid:8080"),
], ids=["alone", "second-with-weight"])
def test_unresolvable_backend_is_an_error(backends, bad):
    args = ["serve", "--listen", f"{HOST}:0"]
    for b in backends:
        args += ["--backend", b]
    p = run_fastlb(*args, timeout=15, env=LOCAL_DNS)
    lines = _one_line_error(p)
    assert p.returncode == 2
    assert len(lines) == 1, p.stderr    # nothing else: in particular, never listened
    assert re.fullmatch(rf"fastlb: error: --backend {re.escape(bad)}: host does not resolve "
                        r"\([^()]+\)", lines[0]), lines


def test_allow_unresolved_starts_warns_and_serves(make_backend, monkeypatch):
    monkeypatch.setenv("RES_OPTIONS", "attempts:0")
    be = make_backend("A")
    lb = FastlbProcess([be.addr], "--backend", "http://nonexistent.invalid:8080",
                       "--allow-unresolved")
    try:
        with httpx.Client(timeout=5) as c:
            # round robin: half the requests first try the unresolvable one,
            # whose connect fails, and go on to A
            for i in range(4):
                r = c.get(f"{lb.url}/{i}")
                assert r.status_code == 200 and r.headers["x-backend"] == "A"
        lb.proc.send_signal(signal.SIGTERM)
        assert lb.proc.wait(10) == 0
    finally:
        lb.kill()
    startup = lb.startup.decode()
    warning = [ln for ln in startup.splitlines() if "does not resolve" in ln]
    assert len(warning) == 1 and re.fullmatch(
        r"fastlb: warning: --backend http://nonexistent.invalid:8080: host does not resolve "
        r"\([^()]+\); starting anyway \(--allow-unresolved\)", warning[0]), startup
    assert startup.index("does not resolve") < startup.index("listening on")


def test_names_resolve_once_and_literals_not_at_all(monkeypatch):
    """The start-up check looks each distinct name up once, through the real
    resolver (localhost: /etc/hosts), and never an IP literal."""
    from fastlb import cli

    calls = []
    real = socket.getaddrinfo

    def recording(host, *args, **kw):
        calls.append(host)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    backends = [("localhost", 1), ("127.0.0.1", 2), ("::1", 3), ("localhost", 1)]
    cli.check_backends_resolve(backends, [f"http://{h}:{p}" for h, p in backends])
    assert calls == ["localhost"]


def test_no_backend():
    p = run_fastlb("serve", "--listen", f"{HOST}:0")
    lines = _one_line_error(p)
    assert len(lines) == 1 and "backend" in lines[0], p.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:70000", "[::1", "host:port"])
def test_bad_listen(listen):
    p = run_fastlb("serve", "--listen", listen, "--backend", "http://127.0.0.1:1")
    lines = _one_line_error(p)
    assert len(lines) == 1 and lines[0].startswith("fastlb: error:"), p.stderr


def test_access_log_unwritable():
    p = run_fastlb("serve", "--listen", f"{HOST}:0", "--backend", "http://127.0.0.1:1",
                   "--access-log", "/nonexistent-dir/x/access.log")
    lines = _one_line_error(p)
    assert len(lines) == 1 and "access-log" in lines[0], p.stderr


def test_port_in_use():
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        p = run_fastlb("serve", "--listen", f"{HOST}:{port}", "--backend", "http://127.0.0.1:1")
    finally:
        s.close()
    lines = _one_line_error(p)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("fastlb: error:") and str(port) in lines[0], p.stderr


def test_serve_end_to_end_then_sigterm(make_backend):
    be = make_backend("A")
    lb = FastlbProcess([be.addr], "--no-via")
    try:
        with httpx.Client(timeout=5) as c:
            r = c.get(lb.url + "/cli")
            assert r.status_code == 200
            assert r.headers["x-backend"] == "A"
            assert r.json()["target"] == "/cli"
            assert "via" not in [n.lower() for n, _ in r.json()["headers"]]
        # a connection left open does not block shutdown
        idle = socket.create_connection((HOST, lb.port), timeout=5)
        try:
            lb.proc.send_signal(signal.SIGTERM)
            rc = lb.proc.wait(10)
        finally:
            idle.close()
        assert rc == 0
    finally:
        lb.kill()
    assert "Traceback" not in "".join(x.decode() for x in lb.stderr_lines)
    assert f"{HOST}:{lb.port}".encode() in lb.startup
    assert f"({_core_switch.IMPL} core)".encode() in lb.startup


def test_serve_sigint_exits_zero(make_backend):
    be = make_backend("A")
    lb = FastlbProcess([be.addr])
    try:
        lb.proc.send_signal(signal.SIGINT)
        assert lb.proc.wait(10) == 0
    finally:
        lb.kill()


def test_demo_exit():
    p = run_fastlb("demo", "--exit", "--requests", "60", timeout=60)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    counts = dict(re.findall(r"^\s+(backend-\d): (\d+) ", p.stdout, re.M))
    assert sorted(counts) == ["backend-1", "backend-2", "backend-3"], p.stdout
    assert sum(int(v) for v in counts.values()) == 60
    assert all(int(v) == 20 for v in counts.values()), p.stdout
    assert "60 responses, 0 errors" in p.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_ctrl_c(sig):
    """README's first command serves until Ctrl-C: that ends it with exit
    code 0 and no traceback."""
    p = subprocess.Popen(fastlb_cmd("demo", "--requests", "30"), cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "serving on" not in line and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
        assert "serving on" in line, p.stderr.read() if p.poll() is not None else line
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "stopped" in out


def test_no_command_prints_help():
    p = run_fastlb()
    assert p.returncode != 0
    assert "serve" in (p.stdout + p.stderr)
