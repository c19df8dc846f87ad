"""Reload: a new configuration without dropping a request.

In process (``fastlb.server.reload``, what SIGHUP runs) for the precise
checks, and as ``fastlb serve --config`` + SIGHUP / ``fastlb reload`` for
what a user does. Backends are real servers on 127.0.0.1.
"""
import asyncio
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from fastlb.errors import ConfigError
from helpers import (HANG, HOST, REPO, FastlbProcess, Reader, fastlb_cmd, free_dead_port,
                     ok_response, raw_connect, wait_for)
from helpers import active_core, backend_loop, make_backend, make_config_lb  # noqa: F401

pytestmark = pytest.mark.usefixtures("active_core")


def _text(pools, routes=(), listeners=("web",), default="app", extra=""):
    """A configuration: ``pools`` = {name: [backend, ...]}; ``routes`` =
    [(path_prefix, pool)] on every listener."""
    out = []
    for li in listeners:
        out.append(f'[listeners.{li}]\nbind = "127.0.0.1:0"\ndefault_pool = "{default}"\n')
        for prefix, pool in routes:
            out.append(f'[[listeners.{li}.routes]]\npath_prefix = "{prefix}"\npool = "{pool}"\n')
    for name, bes in pools.items():
        urls = ", ".join(f'"http://{HOST}:{b.port}"' for b in bes)
        out.append(f"[pools.{name}]\nbackends = [{urls}]\n{extra}")
    return "\n".join(out)


def test_reload_routes_apply_to_the_next_request_on_an_open_connection(make_backend,
                                                                        make_config_lb):
    a, b = make_backend("A"), make_backend("B")
    lb = make_config_lb(_text({"app": [a]}))
    with httpx.Client(timeout=5) as c:
        assert c.get(lb.url("web") + "/new/x").headers["x-backend"] == "A"
        summary = lb.reload(_text({"app": [a], "new": [b]}, routes=[("/new/", "new")]))
        assert summary == "pools added: new; listener web: routes 0 -> 1"
        r = c.get(lb.url("web") + "/new/x")     # the same keep-alive connection
        assert r.headers["x-backend"] == "B"
        assert c.get(lb.url("web") + "/other").headers["x-backend"] == "A"
    assert a.connections == 1      # one client connection, one pooled upstream: kept


def test_a_kept_backend_keeps_its_object_connections_counters_and_health(make_backend,
                                                                        make_config_lb):
    a, b, c_ = make_backend("A"), make_backend("B"), make_backend("C")
    lb = make_config_lb(_text({"app": [a, b]}))
    with httpx.Client(timeout=5) as c:
        for _ in range(4):
            c.get(lb.url("web") + "/")
    before = {bk.address: bk for bk in lb.proxy.pools["app"].backends}
    ba = before[f"{HOST}:{a.port}"]
    assert wait_for(lambda: len(ba.idle) == 1)
    idle = list(ba.idle)
    # eject B by passive checks (the balancer's own view of it)
    bb = before[f"{HOST}:{b.port}"]
    lb.lt.call_soon(lambda: [lb.proxy.note_failure(bb, "test") for _ in range(3)])
    assert lb.proxy.pools["app"].health.snapshot()[1]["ejected"]
    # reload: C before A, B kept
    lb.reload(_text({"app": [c_, a, b]}))
    pool = lb.proxy.pools["app"]
    after = {bk.address: bk for bk in pool.backends}
    assert after[ba.address] is ba and after[bb.address] is bb
    assert (ba.index, bb.index) == (1, 2)
    assert ba.idle == idle and ba.requests == 2
    snap = pool.health.snapshot()
    assert snap[2]["ejected"] and not snap[2]["eligible"] and not snap[1]["ejected"]
    with httpx.Client(timeout=5) as c:
        seen = [c.get(lb.url("web") + "/").headers["x-backend"] for _ in range(6)]
    assert set(seen) == {"A", "C"}      # B is still ejected
    assert a.connections == 1          # A's pooled connection was reused


def test_a_removed_backend_finishes_in_flight_then_closes_its_connections(make_backend,
                                                                         make_config_lb):
    release = threading.Event()

    def slow(be, req):
        if req.target == "/slow":
            conn = req.conn
            def later():
                release.wait(10)
                be.lt.loop.call_soon_threadsafe(conn.transport.write, ok_response(b"slow done"))
            threading.Thread(target=later, daemon=True).start()
            return HANG
        return ok_response(b"A")

    a = make_backend("A", handler=slow, on_head=lambda conn, req: setattr(req, "conn", conn))
    b = make_backend("B")
    lb = make_config_lb(_text({"app": [a, b]}))
    with httpx.Client(timeout=5) as c:
        # round robin: A, B; A keeps an idle pooled connection
        assert c.get(lb.url("web") + "/").text == "A"
        assert c.get(lb.url("web") + "/").headers["x-backend"] == "B"
    s = raw_connect(lb.port("web"), 10)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")       # A's turn
    assert wait_for(lambda: len(a.requests) == 2)
    ba = next(bk for bk in lb.proxy.pools["app"].backends if bk.port == a.port)
    summary = lb.reload(_text({"app": [b]}))
    assert summary == "pool app: backends +0 -1"
    assert ba.retired and lb.proxy.retired == [ba]
    with httpx.Client(timeout=5) as c:
        assert {c.get(lb.url("web") + "/").headers["x-backend"] for _ in range(4)} == {"B"}
    release.set()
    resp = Reader(s, 10).read_response()
    assert (resp.status, resp.body) == (200, b"slow done")       # finished, not dropped
    s.close()
    # then its connections close and it is forgotten
    assert wait_for(lambda: not lb.proxy.retired and not a.open_conns, timeout=5)


def test_listeners_added_and_removed(make_backend, make_config_lb):
    a = make_backend("A")
    lb = make_config_lb(_text({"app": [a]}, listeners=("one", "two")))
    port_two = lb.port("two")
    keep = raw_connect(port_two)        # an open keep-alive connection to "two"
    keep.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert Reader(keep).read_response().status == 200
    summary = lb.reload(_text({"app": [a]}, listeners=("one", "three")))
    assert summary == (f"listener three added on 127.0.0.1:0; listener two on 127.0.0.1:0 "
                       "removed")
    assert list(lb.proxy.fronts) == ["one", "three"]
    with httpx.Client(timeout=5) as c:
        assert c.get(lb.url("three") + "/").status_code == 200
        assert c.get(lb.url("one") + "/").status_code == 200
    with pytest.raises(ConnectionRefusedError):
        raw_connect(port_two, 2)        # its socket is closed
    # the idle connection of the removed listener was closed
    assert keep.recv(10) == b""
    keep.close()


def test_an_invalid_reload_changes_nothing(make_backend, make_config_lb):
    a = make_backend("A")
    text = _text({"app": [a]})
    lb = make_config_lb(text)
    pools, fronts = dict(lb.proxy.pools), dict(lb.proxy.fronts)
    with pytest.raises(ConfigError):
        lb.reload(text + '\n[[listeners.web.routes]]\npath = "/x"\npool = "nope"\n')
    assert lb.proxy.pools == pools and lb.proxy.fronts == fronts
    # a listener that cannot listen: refused before anything changed
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen(1)
    bad = text + f'\n[listeners.more]\nbind = "{HOST}:{busy.getsockname()[1]}"\n' \
                 'default_pool = "app"\n'
    try:
        with pytest.raises(OSError):
            lb.reload(bad)
    finally:
        busy.close()
    assert lb.proxy.pools == pools and lb.proxy.fronts == fronts
    with httpx.Client(timeout=5) as c:
        assert c.get(lb.url("web") + "/").status_code == 200


def test_reload_under_load_loses_no_request(make_backend, make_config_lb):
    """Constant load from 4 keep-alive clients for 10 s while backends,
    routes and a listener come and go every half second: every request gets
    a 200 from a backend its configuration allows, routes take effect at
    once, and nothing is left behind."""
    bes = {n: make_backend(n) for n in "ABCDE"}
    texts = [
        _text({"app": [bes["A"], bes["B"]]}),
        _text({"app": [bes["A"], bes["B"], bes["C"]], "v": [bes["D"]]}, routes=[("/v/", "v")]),
        _text({"app": [bes["C"]], "v": [bes["D"], bes["E"]]}, routes=[("/v/", "v")],
              listeners=("web", "extra")),
        _text({"app": [bes["B"], bes["E"]]}, listeners=("web", "extra")),
    ]
    lb = make_config_lb(texts[0])
    def loop_tasks():
        return lb.lt.call_soon(lambda: len(
            [t for t in asyncio.all_tasks(lb.lt.loop) if not t.done()]))

    tasks_before = loop_tasks()
    url = lb.url("web")
    # 12 reloads, however long a loaded machine takes for them (60 s at most),
    # with the clients sending all along
    done = threading.Event()
    give_up = time.monotonic() + 60
    failures, counts = [], [0]

    def client(k):
        with httpx.Client(timeout=10) as c:
            n = 0
            while not done.is_set() and time.monotonic() < give_up and n < 20000:
                path = "/v/x" if n % 2 else "/p"
                try:
                    r = c.get(url + path)
                    if r.status_code != 200:
                        failures.append((path, r.status_code, r.text))
                except httpx.HTTPError as e:
                    failures.append((path, repr(e)))
                n += 1
            counts[0] += n

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    i = 0
    checked = 0
    while checked < 12 and time.monotonic() < give_up:
        i += 1
        text = texts[i % len(texts)]
        lb.reload(text)
        # the new routes answer the very next request
        with httpx.Client(timeout=5) as c:
            r = c.get(url + "/v/x")
            pools = lb.proxy.pools
            allowed = {bk.port for bk in (pools["v"] if "v" in pools else pools["app"]).backends}
            assert r.status_code == 200
            assert bes[r.headers["x-backend"]].port in allowed, (i, r.headers["x-backend"])
            checked += 1
        time.sleep(0.5)
    done.set()
    for t in threads:
        t.join(20)
    assert not failures, failures[:5]
    assert checked == 12 and counts[0] > 200
    # nothing left behind: retired backends gone, no stray tasks or clients
    lb.reload(texts[0])
    assert wait_for(lambda: not lb.proxy.retired, timeout=5)
    assert wait_for(lambda: not lb.proxy.clients, timeout=5)
    assert wait_for(lambda: loop_tasks() <= tasks_before, timeout=5), (loop_tasks(),
                                                                       tasks_before)
    assert lb.proxy.upstreams == sum(len(bk.idle) for pl in lb.proxy.pools.values()
                                     for bk in pl.backends)


# ---------------------------------------------------------------- as a user does it

def _serve(tmp_path, text):
    path = tmp_path / "lb.toml"
    path.write_text(text)
    pid_file = tmp_path / "lb.pid"
    lb = FastlbProcess(None, "--config", str(path), "--pid-file", str(pid_file))
    # the file is made at start (to check it can be) and gets the pid once the
    # signal handlers are in place, just after the "listening on" line
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10)
    return lb, path, pid_file


def _log_has(lb, words, timeout=5.0):
    return wait_for(lambda: any(words in ln.decode() for ln in lb.stderr_lines), timeout)


def test_sighup_and_fastlb_reload(tmp_path, make_backend):
    a, b = make_backend("A"), make_backend("B")
    text = _text({"app": [a]}).replace('bind = "127.0.0.1:0"', 'bind = "127.0.0.1:0"', 1)
    lb, path, pid_file = _serve(tmp_path, text)
    try:
        assert pid_file.read_text().strip() == str(lb.proc.pid)
        with httpx.Client(timeout=5) as c:
            assert c.get(lb.url + "/new/").headers["x-backend"] == "A"
            # an invalid file: every error logged, nothing changes
            path.write_text(text + '[[listeners.web.routes]]\npath = "/x"\npool = "nope"\n'
                            "[pools.app.health]\nrise = 0\n")
            lb.proc.send_signal(signal.SIGHUP)
            assert _log_has(lb, "reload refused")
            assert _log_has(lb, 'listeners.web.routes[0].pool: no pool named "nope"')
            assert _log_has(lb, "pools.app.health.rise")
            assert c.get(lb.url + "/new/").headers["x-backend"] == "A"
            # fastlb reload checks the file first and does not signal
            p = subprocess.run(fastlb_cmd("reload", "--pid-file", str(pid_file), "--config",
                                          str(path)), capture_output=True, text=True, cwd=REPO,
                               timeout=30)
            assert p.returncode == 1 and "not reloading" in p.stderr
            # a valid file with fastlb reload
            path.write_text(_text({"app": [a], "new": [b]}, routes=[("/new/", "new")]))
            p = subprocess.run(fastlb_cmd("reload", "--pid-file", str(pid_file), "--config",
                                          str(path)), capture_output=True, text=True, cwd=REPO,
                               timeout=30)
            assert p.returncode == 0, p.stderr
            assert _log_has(lb, "reloaded (1 listener, 2 pools, 1 route, 2 backends): pools "
                                "added: new; listener web: routes 0 -> 1")
            assert c.get(lb.url + "/new/").headers["x-backend"] == "B"
        assert lb.terminate() == 0
        assert not pid_file.exists()
    finally:
        lb.kill()


def test_fastlb_reload_names_a_bad_pid_file(tmp_path):
    p = subprocess.run(fastlb_cmd("reload", "--pid-file", str(tmp_path / "none.pid")),
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert p.returncode == 1
    assert p.stderr.startswith(f"fastlb: error: --pid-file {tmp_path / 'none.pid'}: ")
    (tmp_path / "junk.pid").write_text("hello")
    p = subprocess.run(fastlb_cmd("reload", "--pid-file", str(tmp_path / "junk.pid")),
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert p.returncode == 1 and "no process id in it" in p.stderr


def test_serve_runs_the_example_file(tmp_path, make_backend):
    """examples/fastlb.toml as shipped (its addresses moved to free ports):
    both listeners start, and each route reaches its pool."""
    with open(f"{REPO}/examples/fastlb.toml") as f:
        text = f.read()
    bes = {}
    for port in ("9001", "9002", "9101", "9102", "9201"):
        be = make_backend(port)
        bes[port] = be
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{be.port}")
    text = text.replace("127.0.0.1:8080", "127.0.0.1:0").replace("127.0.0.1:8081", "127.0.0.1:0")
    path = tmp_path / "example.toml"
    path.write_text(text)
    lb = FastlbProcess(None, "--config", str(path), "--access-log", "off")
    try:
        with httpx.Client(timeout=10) as c:
            r = c.get(lb.url + "/v1/users", headers={"Host": "api.example.com"})
            assert r.headers["x-backend"] in ("9101", "9102") and r.json()["target"] == "/users"
            r = c.get(lb.url + "/", headers={"Host": "a.example.com", "X-Canary": "1"})
            assert r.headers["x-backend"] == "9201"
            assert c.get(lb.url + "/").headers["x-backend"] in ("9001", "9002")
    finally:
        assert lb.terminate() == 0


def test_demo_backends_serve_a_file_on_its_own_addresses(tmp_path):
    """--demo-backends starts a backend on each loopback backend address of
    the file: the example can be tried as written (ports moved here)."""
    ports = [free_dead_port() for _ in range(3)]
    text = _text({"app": [type("B", (), {"port": p})() for p in ports[:2]],
                  "r": [type("B", (), {"port": ports[2]})()]}, routes=[("/r/", "r")])
    path = tmp_path / "lb.toml"
    path.write_text(text)
    lb = FastlbProcess(None, "--config", str(path), "--demo-backends")
    try:
        with httpx.Client(timeout=5) as c:
            assert c.get(lb.url + "/r/x").headers["x-backend"] == "r-3"
            assert {c.get(lb.url + "/").headers["x-backend"] for _ in range(4)} == \
                {"app-1", "app-2"}
    finally:
        assert lb.terminate() == 0


def test_demo_backends_refuses_what_it_cannot_serve(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n'
                    '[pools.app]\nbackends = ["http://10.9.9.9:80"]\n')
    p = subprocess.run(fastlb_cmd("serve", "--config", str(path), "--demo-backends"),
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert (p.returncode, p.stderr) == (
        2, "fastlb: error: --demo-backends: pools.app.backends[0]: http://10.9.9.9:80 is not "
           "a loopback address\n")
    p = subprocess.run(fastlb_cmd("serve", "--backend", "http://127.0.0.1:1", "--demo-backends"),
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert p.returncode == 2 and "--demo-backends: needs --config" in p.stderr


def test_with_several_pools_a_backend_is_named_with_its_pool(make_backend, make_config_lb,
                                                             caplog):
    a, b = make_backend("A"), make_backend("B")
    lb = make_config_lb(_text({"app": [a], "other": [a, b]}, routes=[("/o/", "other")]))
    other = lb.proxy.pools["other"]
    ba = other.backends[0]
    assert ba is not lb.proxy.pools["app"].backends[0]     # same address, another pool
    with caplog.at_level("WARNING", logger="fastlb.health"):
        lb.lt.call_soon(lambda: [lb.proxy.note_failure(ba, "test") for _ in range(3)])
    assert f"backend http://{HOST}:{a.port} (pool other) ejected for 5s" in caplog.text
    snap = other.health.snapshot()[0]
    assert (snap["pool"], snap["address"], snap["ejected"]) == ("other", f"{HOST}:{a.port}", True)
    assert not lb.proxy.pools["app"].health.snapshot()[0]["ejected"]


def test_reloads_leave_no_fd_behind(tmp_path, make_backend):
    """Twenty reloads through four shapes (backends, a route, a listener
    added and removed) with requests in between, then the first shape again:
    once idle connections have timed out, fastlb has exactly the fds it had."""
    bes = [make_backend(n) for n in "ABC"]
    extra = "upstream_idle_timeout = 0.3\n"
    shapes = [
        _text({"app": bes[:1]}, extra=extra),
        _text({"app": bes[:2], "r": bes[2:]}, routes=[("/r/", "r")], extra=extra),
        _text({"app": bes[1:]}, listeners=("web", "more"), extra=extra),
        _text({"app": bes[2:], "r": bes[:1]}, routes=[("/r/", "r")], listeners=("web", "more"),
              extra=extra),
    ]
    lb, path, _ = _serve(tmp_path, shapes[0])

    def fds():
        return len(os.listdir(f"/proc/{lb.proc.pid}/fd"))

    try:
        with httpx.Client(timeout=5) as c:
            assert c.get(lb.url + "/").status_code == 200
        time.sleep(1.0)
        before = fds()
        for i in range(1, 21):
            path.write_text(shapes[i % 4])
            lb.proc.send_signal(signal.SIGHUP)
            assert _log_has(lb, "reloaded (", timeout=5)
            lb.stderr_lines.clear()
            with httpx.Client(timeout=5) as c:
                for p in ("/", "/r/x"):
                    assert c.get(lb.url + p).status_code == 200
        path.write_text(shapes[0])
        lb.proc.send_signal(signal.SIGHUP)
        assert _log_has(lb, "reloaded (", timeout=5)
        assert wait_for(lambda: fds() == before, timeout=5), (fds(), before)
    finally:
        lb.kill()
