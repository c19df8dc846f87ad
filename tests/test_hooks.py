"""Python hooks (``[hooks] module``, ``--hooks``; ``fastlb.hooks``): real
backends behind real listeners, hooks files written by each test.

In process (``fastlb.server.start`` of a configuration, as the other
configuration tests) for what a hook decides and what the log says; as
``fastlb serve`` subprocesses for what a user sees at start, at SIGHUP and
with workers. The suite runs on both cores, so every case runs on the
compiled and on the pure data path.
"""
import json
import logging
import os
import pickle
import signal
import subprocess
import textwrap
import time

import pytest

from fastlb import hooks as hooks_mod
from fastlb.config import load, loads
from fastlb.errors import ConfigError
from fastlb.selection import ALGORITHMS
from helpers import (  # noqa: F401  (fixtures are used by name)
    HOST, REPO, FastlbProcess, Reader, active_core, backend_loop, fastlb_cmd, get,
    make_backend, make_config_lb, raw_connect, run_fastlb, wait_for)

pytestmark = pytest.mark.usefixtures("active_core")


def write_hooks(tmp_path, code, name="myhooks.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def backends_list(bes):
    return "[" + ", ".join(f'"http://{HOST}:{b.port}"' for b in bes) + "]"


def config_text(hooks_path, pools, default=None, routes=(), extra=""):
    """A configuration: one listener ``web`` on a free port, ``pools`` (name ->
    backends), ``routes`` ((path_prefix, pool), ...), the hooks file."""
    out = [extra]
    if hooks_path is not None:
        out.append(f"[hooks]\nmodule = {json.dumps(str(hooks_path))}\n")
    out.append('[listeners.web]\nbind = "127.0.0.1:0"\n')
    if default is not None:
        out.append(f'default_pool = "{default}"\n')
    for prefix, pool in routes:
        out.append(f'[[listeners.web.routes]]\npath_prefix = "{prefix}"\npool = "{pool}"\n')
    for name, bes in pools.items():
        out.append(f"[pools.{name}]\nbackends = {backends_list(bes)}\n")
    return "".join(out)


def hook_records(caplog):
    return [r for r in caplog.records if r.name == "fastlb" and r.getMessage().startswith("hook ")]


def in_flight(lb, pool):
    """Requests counted in flight on ``pool``'s selector, per backend (on the loop)."""
    p = lb.proxy.pools[pool]
    return lb.lt.call_soon(lambda: [p.balancer.in_flight(i) for i in range(len(p.backends))])


# ---------------------------------------------------------------- route

ROUTE_BY_HEADER = """
    def route(request):
        color = request.header("X-Color")
        if color == "green":
            return "green"
        return None
"""


def test_route_by_a_header_to_two_pools(tmp_path, make_backend, make_config_lb):
    blue = [make_backend("blue1"), make_backend("blue2")]
    green = [make_backend("green1"), make_backend("green2")]
    path = write_hooks(tmp_path, ROUTE_BY_HEADER)
    # a static route that takes every request: the hook runs before it
    lb = make_config_lb(config_text(path, {"blue": blue, "green": green},
                                    routes=[("/", "blue")]))
    port = lb.port("web")
    seen = {"green": [], "blue": [], "other": []}
    for i in range(12):
        seen["green"].append(get(port, f"/g{i}", headers=b"X-Color: green\r\n").json()["backend"])
        seen["blue"].append(get(port, f"/b{i}").json()["backend"])
        seen["other"].append(get(port, f"/o{i}", headers=b"x-color: red\r\n").json()["backend"])
    # each pool's own algorithm spreads its requests over its own backends
    assert sorted(set(seen["green"])) == ["green1", "green2"]
    assert sorted(set(seen["blue"] + seen["other"])) == ["blue1", "blue2"]
    assert sum(len(b.requests) for b in green) == 12
    assert sum(len(b.requests) for b in blue) == 24


def test_a_pool_reached_only_through_a_route_hook_is_no_unused_pool(tmp_path, make_backend):
    path = write_hooks(tmp_path, ROUTE_BY_HEADER)
    be = make_backend()
    c = loads(config_text(path, {"blue": [be], "green": [be]}, default="blue"), resolve=False)
    assert c.hooks.defined == ("route",)
    assert not [w for w in c.warnings if "not used" in str(w)]
    c = loads(config_text(None, {"blue": [be], "green": [be]}, default="blue"), resolve=False)
    assert [str(w) for w in c.warnings if "not used" in str(w)]


def test_the_request_view(tmp_path, make_backend, make_config_lb):
    """What a hook reads of a request, with an absolute-form target, a Host
    with a port, and repeated fields; and that request_headers can replace a
    field (User-Agent), add one, and add several of one name."""
    be = make_backend()
    path = write_hooks(tmp_path, """
        import json

        def request_headers(request):
            view = {"method": request.method, "path": request.path, "query": request.query,
                    "host": request.host, "client": request.client,
                    "listener": request.listener, "version": request.version,
                    "accept": request.header("ACCEPT"), "none": request.header("X-None", "-"),
                    "n": len(request.headers), "first": request.headers[0]}
            return [("X-View", json.dumps(view)), ("User-Agent", "hooked/1"),
                    ("X-Multi", "a"), ("X-Multi", b"b")]
    """)
    lb = make_config_lb(config_text(path, {"app": [be]}, default="app"))
    with raw_connect(lb.port("web")) as s:
        s.sendall(b"GET http://Example.COM:8080/p/q?a=1&b=2 HTTP/1.1\r\nHost: example.com:8080\r\n"
                  b"Accept: text/html\r\nUser-Agent: curl/8\r\nX-Multi: orig\r\n"
                  b"Accept: x/y\r\n\r\n")
        doc = Reader(s).read_response().json()
    headers = doc["headers"]
    view = json.loads([v for n, v in headers if n == "X-View"][0])
    assert view == {"method": "GET", "path": "/p/q", "query": "a=1&b=2", "host": "example.com",
                    "client": "127.0.0.1", "listener": "web", "version": "1.1",
                    "accept": "text/html", "none": "-", "n": 5,
                    "first": ["Host", "example.com:8080"]}
    assert doc["target"] == "/p/q?a=1&b=2"
    # replaced: one User-Agent, the hook's; X-Multi: the hook's two, not the client's
    assert [v for n, v in headers if n.lower() == "user-agent"] == ["hooked/1"]
    assert [v for n, v in headers if n.lower() == "x-multi"] == ["a", "b"]
    # the rest as fastlb always sends it
    names = [n.lower() for n, _ in headers]
    assert names.count("host") == 1 and names.count("accept") == 2
    assert [v for n, v in headers if n == "X-Forwarded-For"] == ["127.0.0.1"]


# ---------------------------------------------------------------- select

SELECT = """
    chosen_from = []        # the pool of the request in flight (hooks run one after another)

    def select(request, pool):
        chosen_from[:] = [pool]
        want = request.header("X-Want")
        if want is None:
            return None
        if want.startswith("addr:"):
            return want[5:]                 # the address, as a string
        for b in pool.backends:             # the view, as an object
            if b.address.endswith(":" + want):
                return b
        return None

    def request_headers(request):
        return [("X-States", ",".join(f"{b.address}={b.state}/{int(b.eligible)}"
                                     for b in chosen_from[0].backends))]
"""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_select_chooses_the_backend_under_every_algorithm(tmp_path, make_backend,
                                                          make_config_lb, algorithm):
    bes = [make_backend(f"B{i}") for i in range(3)]
    path = write_hooks(tmp_path, SELECT)
    extra = ""
    text = config_text(path, {"app": bes}, default="app", extra=extra).replace(
        "[pools.app]\n", f'[pools.app]\nalgorithm = "{algorithm}"\n'
        + ('hash_key = "header:X-User"\n' if algorithm == "maglev" else ""))
    lb = make_config_lb(text)
    port = lb.port("web")
    target = bes[1]
    for i in range(10):
        doc = get(port, "/", headers=b"X-User: u%d\r\nX-Want: %d\r\n" % (i, target.port)).json()
        assert doc["backend"] == "B1"
        doc = get(port, "/", headers=b"X-Want: addr:127.0.0.1:%d\r\n" % bes[2].port).json()
        assert doc["backend"] == "B2"
    # no choice (None): the algorithm's, over every backend
    got = {get(port, "/", headers=b"X-User: u%d\r\n" % i).json()["backend"] for i in range(60)}
    assert got == {"B0", "B1", "B2"}
    # every request a hook chose was counted in flight and released again
    assert wait_for(lambda: in_flight(lb, "app") == [0, 0, 0]), in_flight(lb, "app")
    assert [b.active for b in lb.proxy.pools["app"].backends] == [0, 0, 0]


def test_select_of_an_ineligible_backend_is_passed_over(tmp_path, make_backend,
                                                        make_config_lb):
    """A drained backend that select returns gets nothing: the algorithm
    chooses among the others, and the hook sees the backend as DRAIN."""
    bes = [make_backend(f"B{i}") for i in range(3)]
    path = write_hooks(tmp_path, SELECT)
    lb = make_config_lb(config_text(path, {"app": bes}, default="app"))
    port = lb.port("web")
    pool = lb.proxy.pools["app"]
    lb.lt.call_soon(pool.health.set_mode, 1, "drain")
    served = []
    for _ in range(10):
        doc = get(port, "/", headers=b"X-Want: %d\r\n" % bes[1].port).json()
        served.append(doc["backend"])
        states = [v for n, v in doc["headers"] if n == "X-States"][0]
    assert sorted(set(served)) == ["B0", "B2"]
    assert not bes[1].requests
    assert states == (f"127.0.0.1:{bes[0].port}=UP/1,127.0.0.1:{bes[1].port}=DRAIN/0,"
                      f"127.0.0.1:{bes[2].port}=UP/1")
    lb.lt.call_soon(pool.health.set_mode, 1, "enabled")
    assert get(port, "/", headers=b"X-Want: %d\r\n" % bes[1].port).json()["backend"] == "B1"
    assert wait_for(lambda: in_flight(lb, "app") == [0, 0, 0])


# ---------------------------------------------------------------- hooks that fail

FAILING = """
    import sys

    def route(request):
        if request.header("X-Fail") == "route":
            return explode(request)
        if request.header("X-Fail") == "exit":
            sys.exit(3)
        return None

    def explode(request):
        return {}["no such key"]

    def select(request, pool):
        if request.header("X-Fail") == "select":
            raise RuntimeError("select broke")
        return pool.backends[0]

    def request_headers(request):
        if request.header("X-Fail") == "request_headers":
            raise ValueError("headers broke")
        return []
"""


@pytest.mark.parametrize("which,exc,where", [
    ("route", "KeyError", "in explode"),
    ("exit", "SystemExit", "in route"),
    ("select", "RuntimeError", "in select"),
    ("request_headers", "ValueError", "in request_headers"),
])
def test_a_hook_that_raises(tmp_path, make_backend, make_config_lb, caplog, monkeypatch,
                            which, exc, where):
    monkeypatch.setattr(hooks_mod, "LOG_EVERY", 1.0)
    caplog.set_level(logging.INFO)
    be = make_backend()
    path = write_hooks(tmp_path, FAILING)
    lb = make_config_lb(config_text(path, {"app": [be]}, default="app"))
    port = lb.port("web")
    header = b"X-Fail: %s\r\n" % which.encode()
    t0 = time.monotonic()
    for _ in range(20):
        r = get(port, "/", headers=header)
        assert r.status == 500 and r.get("connection") == "close"
    burst = time.monotonic() - t0
    assert not be.requests          # nothing reached the backend
    # then the process carries on: the next requests are fine
    assert get(port, "/").status == 200
    records = hook_records(caplog)
    if burst < 1.0:
        # one line for the whole burst, with the user's traceback
        assert len(records) == 1, [r.getMessage() for r in records]
    msg = records[0].getMessage()
    hook = "route" if which == "exit" else which
    assert msg.startswith(f"hook {hook} of {path} raised {exc}"), msg
    assert "the client got 500" in msg
    assert "Traceback (most recent call last):" in msg
    assert f'File "{path}", line' in msg and where in msg
    assert "fastlb/hooks.py" not in msg     # only the user's frames
    # after LOG_EVERY the next one is logged, with how many were not
    time.sleep(1.05)
    assert get(port, "/", headers=header).status == 500
    last = hook_records(caplog)[-1].getMessage()
    if burst < 1.0:
        assert len(hook_records(caplog)) == 2
        assert "(19 more since the last report)" in last, last
    assert wait_for(lambda: in_flight(lb, "app") == [0])
    assert get(port, "/").status == 200


GARBAGE = """
    def route(request):
        return {"unknown": "nope", "type": 42, "list": ["app"]}.get(request.header("X-Route"))

    def select(request, pool):
        return {"unknown": "10.9.9.9:1", "type": 3.5, "none": None,
                }.get(request.header("X-Select"), pool.backends[0])

    def request_headers(request):
        return {"cr": [("X-A", "a\\r\\nb")], "nul": [("X-A", "a\\x00")],
                "framing": [("Content-Length", "5")], "te": [("transfer-encoding", "chunked")],
                "name": [("Bad Name", "v")], "notalist": "X-A: b", "pair": [("X-A",)],
                "value": [("X-A", 5)], "unicode": [("X-A", "\\u2603")],
                }.get(request.header("X-Headers"), [])
"""


@pytest.mark.parametrize("header,problem", [
    ("X-Route: unknown", 'hook route of {path} returned \'nope\': no pool named "nope" '
                         "(pools: app); the client got 500"),
    ("X-Route: type", "hook route of {path} returned 42: expected a pool name (str) or None"),
    ("X-Route: list", "returned ['app']: expected a pool name (str) or None"),
    ("X-Select: unknown", 'hook select of {path} returned \'10.9.9.9:1\': pool app has no '
                          'backend "10.9.9.9:1" (backends: 127.0.0.1:{port})'),
    ("X-Select: type", "hook select of {path} returned 3.5: expected one of pool.backends, a "
                       "backend's address (str) or None"),
    ("X-Headers: cr", 'hook request_headers of {path} returned [(\'X-A\', \'a\\r\\nb\')]: X-A: '
                      '"a\\r\\nb": a header value has no control characters (CR, LF, NUL)'),
    ("X-Headers: nul", "a header value has no control characters"),
    ("X-Headers: framing", "Content-Length is set by fastlb (it frames the message): hooks "
                           "cannot set it"),
    ("X-Headers: te", "transfer-encoding is set by fastlb"),
    ("X-Headers: name", '"Bad Name" is not a header name'),
    ("X-Headers: notalist", "expected a list of (name, value) pairs or None"),
    ("X-Headers: pair", "('X-A',) is not a (name, value) pair"),
    ("X-Headers: value", "the value of X-A is a str or bytes, got 5"),
    ("X-Headers: unicode", "the value of X-A has characters beyond Latin-1"),
])
def test_a_hook_that_returns_garbage(tmp_path, make_backend, make_config_lb, caplog, header,
                                     problem):
    caplog.set_level(logging.INFO)
    be = make_backend()
    path = write_hooks(tmp_path, GARBAGE)
    lb = make_config_lb(config_text(path, {"app": [be]}, default="app"))
    port = lb.port("web")
    r = get(port, "/", headers=header.encode() + b"\r\n")
    assert r.status == 500 and b"500 Internal Server Error" in r.body
    assert not be.requests
    records = hook_records(caplog)
    assert len(records) == 1
    msg = records[0].getMessage()
    assert problem.format(path=path, port=be.port) in msg, msg
    assert "Traceback" not in msg and msg.endswith("the client got 500")
    # the backend select had counted in flight is released when request_headers fails
    assert wait_for(lambda: in_flight(lb, "app") == [0])
    # the same hook with a good answer: the process serves on
    assert get(port, "/", headers=b"X-Select: none\r\n").status == 200
    assert len(be.requests) == 1


# ---------------------------------------------------------------- loading

@pytest.mark.parametrize("code,problem", [
    ("def route(:\n", 'cannot import "{name}": SyntaxError: invalid syntax ({path}, line 1)'),
    ("x = 1\n", '"{name}" defines none of route, select, request_headers'),
    ("import no_such_module_x\ndef route(r):\n    return None\n",
     "cannot import \"{name}\": ModuleNotFoundError: No module named 'no_such_module_x' "
     "(at {path}:1)"),
    ("raise RuntimeError('at import')\n",
     'cannot import "{name}": RuntimeError: at import (at {path}:1)'),
    ("route = 3\n", '"{name}": route is not a function (it is int)'),
    ("async def route(request):\n    return None\n",
     '"{name}": route is async def: hooks are plain functions'),
    ("def select(request):\n    return None\n",
     '"{name}": select(request) cannot be called as select(request, pool)'),
])
def test_a_module_that_cannot_serve_is_a_configuration_error(tmp_path, code, problem):
    path = write_hooks(tmp_path, code, "h.py")
    conf = tmp_path / "lb.toml"
    conf.write_text('# hooks\n[hooks]\nmodule = "h.py"\n[listeners.web]\nbind = "127.0.0.1:0"\n'
                    'default_pool = "app"\n[pools.app]\nbackends = ["http://127.0.0.1:9"]\n')
    want = f"{conf}:3: hooks.module: " + problem.format(name="h.py", path=path)
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert any(str(issue).startswith(want) for issue in e.value.errors), str(e.value)
    # fastlb check-config and fastlb serve say the same, and serve does not start
    p = run_fastlb("check-config", str(conf))
    assert p.returncode == 1 and want in p.stdout, p.stdout
    p = run_fastlb("serve", "--config", str(conf))
    assert p.returncode == 2 and f"fastlb: error: {want}" in p.stderr, p.stderr


def test_the_hooks_table_is_checked(tmp_path):
    base = '[listeners.web]\ndefault_pool = "app"\n[pools.app]\nbackends = ["http://127.0.0.1:9"]\n'
    for table, want in [
        ("[hooks]\n", "test.toml:1: hooks: missing module (a module name such as myhooks, or "
                      "a file such as ./myhooks.py)"),
        ("[hooks]\nmodule = 3\n", "test.toml:2: hooks.module: expected a string, got 3"),
        ('[hooks]\nmodule = "h.py"\nmodul = "x"\n',
         'test.toml:3: hooks.modul: unknown key "modul" (did you mean "module"?)'),
        ('[hooks]\nmodule = "no-such module"\n',
         'hooks.module: "no-such module" is neither a module name (myhooks, pkg.hooks) nor '
         "a file path (./myhooks.py)"),
        ('[hooks]\nmodule = "fastlb_no_such_hooks_mod"\n',
         'hooks.module: cannot import "fastlb_no_such_hooks_mod": no module named '
         '"fastlb_no_such_hooks_mod" (a module name is looked up on sys.path'),
        ('[hooks]\nmodule = "./none.py"\n', 'hooks.module: cannot import "./none.py": no such '
                                            f"file ({tmp_path}/none.py)"),
    ]:
        with pytest.raises(ConfigError) as e:
            loads(table + base, "test.toml", resolve=False, base=str(tmp_path))
        assert any(str(i).startswith(want) or want in str(i) for i in e.value.errors), \
            (want, str(e.value))


def test_a_hooks_file_is_relative_to_the_configuration_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    write_hooks(tmp_path / "conf", "def route(request):\n    return None\n", "h.py")
    conf = tmp_path / "conf" / "lb.toml"
    conf.write_text('[hooks]\nmodule = "h.py"\n[listeners.web]\ndefault_pool = "app"\n'
                    '[pools.app]\nbackends = ["http://127.0.0.1:9"]\n')
    monkeypatch.chdir(tmp_path)
    c = load("conf/lb.toml", resolve=False)
    assert c.hooks.path == str(tmp_path / "conf" / "h.py")
    assert c.hooks.module == "h.py" and c.hooks.defined == ("route",)
    # a worker gets the configuration without the module, and imports it itself
    again = pickle.loads(pickle.dumps(c))
    assert again.hooks.loaded is None and again.hooks == c.hooks and again == c
    assert hooks_mod.load_module(again.hooks) is not c.hooks.loaded


def test_the_hooks_flag(tmp_path, make_backend):
    """``--hooks FILE`` with flags (relative to the working directory), and
    a bad one: a usage error naming the flag."""
    be = make_backend()
    write_hooks(tmp_path, """
        def request_headers(request):
            return [("X-Flag", "yes")]
    """, "flaghooks.py")
    p = run_fastlb("serve", "--backend", f"http://{HOST}:{be.port}", "--listen", "127.0.0.1:0",
                   "--hooks", str(tmp_path / "nope.py"))
    assert p.returncode == 2
    assert f'fastlb: error: --hooks: cannot import "{tmp_path}/nope.py": no such file' in p.stderr
    lb = FastlbProcess([be.addr], "--hooks", "flaghooks.py", cwd=tmp_path)
    try:
        doc = get(lb.port, "/").json()
        assert ["X-Flag", "yes"] in doc["headers"]
    finally:
        assert lb.terminate() == 0


# ---------------------------------------------------------------- reload

def _serve_file(tmp_path, text, *extra, env=None):
    conf = tmp_path / "lb.toml"
    conf.write_text(text)
    lb = FastlbProcess(None, "--config", str(conf), *extra, env=env)
    return lb, conf


def _log(lb):
    return b"".join(lb.stderr_lines).decode("utf-8", "replace")


def _backend_of(port, headers=b""):
    return get(port, "/", headers=headers).json()["backend"]


VERSION = """
    def route(request):
        return "{pool}" if request.header("X-Color") else None
"""


def test_reload_runs_the_edited_file_and_keeps_the_old_one_when_it_is_broken(
        tmp_path, make_backend):
    a, b, c = make_backend("A"), make_backend("B"), make_backend("C")
    path = write_hooks(tmp_path, VERSION.format(pool="b"))
    first = path.stat()
    lb, conf = _serve_file(tmp_path, config_text(path, {"a": [a], "b": [b], "c": [c]},
                                                 default="a"))
    try:
        assert wait_for(lambda: f"hooks {path}: route (run on the event loop)"
                        in lb.startup.decode() + _log(lb), 5)
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "B"
        # broken: the reload is refused, naming the problem; the old hook runs on
        path.write_text("def route(request:\n")
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in _log(lb), 10), _log(lb)
        assert wait_for(lambda: f"{conf}:2: hooks.module: cannot import" in _log(lb), 5)
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "B"
        path.write_text("x = 1\n")
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "defines none of route, select, request_headers" in _log(lb), 10)
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "B"
        # edited to the same size and mtime as the first version (as an edit within
        # the second would leave it): the new code runs, not a cached compilation
        path.write_text(textwrap.dedent(VERSION.format(pool="c")))
        os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))
        assert path.stat().st_size == first.st_size
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "imported again" in _log(lb), 10), _log(lb)
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "C"
        assert _backend_of(lb.port) == "A"
    finally:
        assert lb.terminate() == 0


def test_reload_imports_a_module_by_name_again(tmp_path, make_backend):
    a, b = make_backend("A"), make_backend("B")
    pkg = tmp_path / "site"
    pkg.mkdir()
    mod = write_hooks(pkg, VERSION.format(pool="a"), "fastlb_test_hooks_mod.py")
    first = mod.stat()
    text = config_text(None, {"a": [a], "b": [b]}, default="a",
                       extra='[hooks]\nmodule = "fastlb_test_hooks_mod"\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg), REPO]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)    # as in production: .pyc files are written
    lb, conf = _serve_file(tmp_path, text, env=env)
    try:
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "A"
        # the same size and mtime: a .pyc of the first version would pass for this one
        mod.write_text(textwrap.dedent(VERSION.format(pool="b")))
        os.utime(mod, ns=(first.st_atime_ns, first.st_mtime_ns))
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "hooks fastlb_test_hooks_mod (route) imported again"
                        in _log(lb), 10), _log(lb)
        assert _backend_of(lb.port, b"X-Color: 1\r\n") == "B"
    finally:
        assert lb.terminate() == 0


# ---------------------------------------------------------------- workers

WORKER_HOOKS = """
    import os

    def route(request):
        return "{pool}" if request.header("X-Color") == "green" else None

    def request_headers(request):
        return [("X-Worker", str(os.getpid()))]
"""


def test_hooks_with_two_workers(tmp_path, make_backend):
    blue, green, other = make_backend("blue"), make_backend("green"), make_backend("other")
    path = write_hooks(tmp_path, WORKER_HOOKS.format(pool="green"))
    text = "workers = 2\n" + config_text(path, {"blue": [blue], "green": [green],
                                                "other": [other]}, default="blue")
    lb, conf = _serve_file(tmp_path, text)
    try:
        def spread():
            pids = set()
            for i in range(40):
                doc = get(lb.port, "/", headers=b"X-Color: green\r\n" if i % 2 else b"")
                doc = doc.json()
                assert doc["backend"] == ("green" if i % 2 else "blue")
                pids.update(v for n, v in doc["headers"] if n == "X-Worker")
            return pids

        pids = spread()
        # both workers ran the hooks, each its own import of the module
        assert len(pids) == 2 and str(lb.proc.pid) not in pids, pids
        # a reload: the new workers import the edited file
        path.write_text(textwrap.dedent(WORKER_HOOKS.format(pool="other")))
        lb.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded (" in _log(lb), 15), _log(lb)
        assert wait_for(lambda: _backend_of(lb.port, b"X-Color: green\r\n") == "other", 10)
        new = set()
        for _ in range(40):
            doc = get(lb.port, "/", headers=b"X-Color: green\r\n").json()
            assert doc["backend"] == "other"
            new.update(v for n, v in doc["headers"] if n == "X-Worker")
        assert len(new) == 2 and not new & pids
    finally:
        assert lb.terminate(timeout=30) == 0


def test_no_hooks_no_hook_object(make_backend, make_config_lb):
    be = make_backend()
    lb = make_config_lb(config_text(None, {"app": [be]}, default="app"))
    assert lb.proxy.hooks is None
    assert get(lb.port("web"), "/").status == 200


def test_select_may_choose_a_backend_of_weight_0(tmp_path, make_backend, make_config_lb):
    """Weight 0: the algorithm never chooses it, a hook may (a backend only
    hooks send requests to)."""
    bes = [make_backend("B0"), make_backend("hidden")]
    path = write_hooks(tmp_path, SELECT)
    text = config_text(path, {"app": bes}, default="app").replace(
        f'"http://{HOST}:{bes[1].port}"', f'{{ url = "http://{HOST}:{bes[1].port}", weight = 0 }}')
    lb = make_config_lb(text)
    port = lb.port("web")
    assert {get(port, "/").json()["backend"] for _ in range(10)} == {"B0"}
    for _ in range(5):
        doc = get(port, "/", headers=b"X-Want: %d\r\n" % bes[1].port).json()
        assert doc["backend"] == "hidden"
    assert len(bes[1].requests) == 5
    assert wait_for(lambda: in_flight(lb, "app") == [0, 0])


def test_the_example_module(make_backend):
    """examples/hooks.py is the README's, loads, and routes as it says."""
    from fastlb import core

    with open(os.path.join(REPO, "examples", "hooks.py")) as f:
        code = f.read()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Python hooks\n"):readme.index("## Observability\n")]
    assert "```python\n" + code + "```\n" in section
    hc = hooks_mod.configure(os.path.join(REPO, "examples", "hooks.py"))
    assert hc.defined == ("route", "select", "request_headers")
    mod = hc.loaded

    def view(head):
        return hooks_mod.Request(core.parse_request_head(head), head, b"10.0.0.1", None)

    assert mod.route(view(b"GET / HTTP/1.1\r\nHost: a\r\nx-user: alice\r\n\r\n")) == "canary"
    assert mod.route(view(b"GET / HTTP/1.1\r\nHost: a\r\nX-Canary: 1\r\n\r\n")) == "canary"
    assert mod.route(view(b"GET /v2/x?y HTTP/1.1\r\nHost: a\r\n\r\n")) == "api"
    assert mod.route(view(b"GET /v1/x HTTP/1.1\r\nHost: a\r\nX-User: carol\r\n\r\n")) is None
    # and with the example configuration it is a valid one
    text = open(os.path.join(REPO, "examples", "fastlb.toml")).read()
    c = loads(text + '\n[hooks]\nmodule = "hooks.py"\n', "fastlb.toml", resolve=False,
              base=os.path.join(REPO, "examples"))
    assert c.hooks.defined == hc.defined


def test_the_client_of_a_proxy_protocol_connection(tmp_path, make_backend, make_config_lb):
    """``request.client`` is the client the PROXY protocol header names."""
    be = make_backend()
    path = write_hooks(tmp_path, """
        def request_headers(request):
            return [("X-Client-Seen", request.client)]
    """)
    text = config_text(path, {"app": [be]}, default="app").replace(
        'bind = "127.0.0.1:0"\n', 'bind = "127.0.0.1:0"\nproxy_protocol = true\n')
    lb = make_config_lb(text)
    with raw_connect(lb.port("web")) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 198.51.100.1 41234 443\r\n"
                  b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        doc = Reader(s).read_response().json()
    assert ["X-Client-Seen", "203.0.113.7"] in doc["headers"]
