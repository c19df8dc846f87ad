"""Shared helpers for the end-to-end tests: real sockets on 127.0.0.1 only.

* ``LoopThread``: a uvloop event loop on a daemon thread; ``call(coro)`` runs a
  coroutine on it and waits (bounded) for the result.
* ``Balancer`` / ``start_balancer``: ``fastlb.server.start(Options(...))`` on
  its own loop thread, listening on port 0, with a clean shutdown.
* ``ScriptBackend``: a small scriptable HTTP/1.1 backend (asyncio protocol).
  By default it echoes what it received (request line, headers, body length
  and hash) as JSON; ``handler`` may return raw bytes instead, a ``Reply`` (raw
  bytes + close / close-without-reply), or ``HANG``. It records every byte it
  receives, each parsed request and the number of connections. With
  ``proxy_protocol=True`` each connection may start with a PROXY protocol
  header (``read_proxy_header``, written here from the spec, independently
  of fastlb's parser), kept as ``req.proxy`` and in the echo (``proxy``).
* ``UvicornBackend``: a uvicorn ASGI echo app on a background thread.
* ``spawn_fastlb``: ``python -m fastlb serve`` as a subprocess, port read from
  its "listening on" log line.
* Raw-socket helpers: ``raw_connect``, ``send_raw``, ``recv_until_close``,
  ``read_response`` (one response, framed by Content-Length / chunked / close).
"""
import asyncio
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvloop

from fastlb import core as _core_switch
from fastlb import proxy as _proxy_switch
from fastlb.server import Options, start

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- core marker

@pytest.fixture(autouse=False)
def active_core():
    """The core the in-process balancer (and every subprocess) runs on.

    CI runs the suite with FASTLB_REQUIRE_EXTENSIONS=1 (compiled core) and with
    FASTLB_NO_EXTENSIONS=1 (pure core); these tests use whichever is active and
    fail if the switch silently picked the wrong one.
    """
    impl = _core_switch.IMPL
    if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
        assert impl == "c", "FASTLB_REQUIRE_EXTENSIONS=1 but the pure core is active"
        assert _proxy_switch.IMPL == "c", "FASTLB_REQUIRE_EXTENSIONS=1 but the data path is pure"
    if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
        assert impl == "py", "FASTLB_NO_EXTENSIONS=1 but the compiled core is active"
        assert _proxy_switch.IMPL == "py", "FASTLB_NO_EXTENSIONS=1 but the data path is compiled"
    return impl


# ---------------------------------------------------------------- loop thread

class LoopThread:
    def __init__(self, name="loop"):
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        assert self._ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # drain callbacks scheduled by the last closes
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn, *args):
        done = threading.Event()
        out = []

        def run():
            try:
                out.append(fn(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10)
        return out[0] if out else None

    def stop(self):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def stop_servers(lt, servers):
    """Close asyncio servers running on LoopThread ``lt``, cancel their
    connection tasks, and stop the loop."""
    async def down():
        for srv in servers:
            srv.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        lt.call(down())
    finally:
        lt.stop()


# ---------------------------------------------------------------- balancer in process

class Balancer:
    """``shared``: the counter table, layout and slot to count in (see
    ``fastlb.proxy.Proxy``); the other keywords are ``Options``."""

    def __init__(self, backends, shared=None, **kw):
        self.lt = LoopThread("fastlb")
        kw.setdefault("listen_host", HOST)
        kw.setdefault("listen_port", 0)
        self.opts = Options(backends=tuple(backends), **kw)

        async def go():
            return await start(self.opts, asyncio.get_running_loop(), shared=shared)

        self.proxy, self.server = self.lt.call(go())
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"

    def stop(self):
        async def down():
            self.server.close()
            self.proxy.close()
            await self.proxy.wait_closed()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 3)
            except asyncio.TimeoutError:
                pass

        try:
            self.lt.call(down(), timeout=10)
        finally:
            self.lt.stop()


class ConfigBalancer:
    """``fastlb.server.start(config)`` for TOML ``text`` on its own loop
    thread; ``reload(text)`` applies another text as SIGHUP would;
    ``port(name)`` is a listener's port (bind ``127.0.0.1:0`` in the text)."""

    def __init__(self, text):
        from fastlb.config import loads

        self.lt = LoopThread("fastlb")
        config = loads(text, "test.toml", resolve=False)

        async def go():
            return await start(config, asyncio.get_running_loop())

        self.proxy, self.server = self.lt.call(go())

    def port(self, name):
        return self.proxy.fronts[name].listener.sockets[0].getsockname()[1]

    def url(self, name):
        return f"http://{HOST}:{self.port(name)}"

    def reload(self, text):
        """The summary line of the change (ConfigError for invalid text)."""
        from fastlb import server
        from fastlb.config import loads

        config = loads(text, "test.toml", resolve=False)
        return self.lt.call(server.reload(self.proxy, config))

    def stop(self):
        from fastlb import server

        async def down():
            server._close_listeners(self.proxy)
            self.proxy.close()
            await self.proxy.wait_closed()

        try:
            self.lt.call(down(), timeout=10)
        finally:
            self.lt.stop()


@pytest.fixture
def make_config_lb():
    made = []

    def make(text):
        lb = ConfigBalancer(text)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


def free_dead_port():
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- PROXY protocol

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_proxy_header(data):
    """The PROXY protocol header at the start of ``data``, as a receiver
    written from HAProxy's proxy-protocol.txt reads it: None while it is
    incomplete (or absent: data that starts like neither version gives
    ``(0, None)``), else ``(length, dict)``. The dict: ``version`` (1, 2),
    ``command`` ("PROXY", "LOCAL", "UNKNOWN"), ``src`` and ``dst`` as
    ``"ip:port"`` (IPv6 in brackets) when the header carries them."""
    import ipaddress
    import struct

    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n")
        if end < 0:
            return None
        words = data[6:end].decode("ascii").split(" ")
        if words[0] == "UNKNOWN":
            return end + 2, {"version": 1, "command": "UNKNOWN"}
        _, src, dst, sport, dport = words
        fmt = "[{}]:{}" if words[0] == "TCP6" else "{}:{}"
        return end + 2, {"version": 1, "command": "PROXY", "proto": words[0],
                         "src": fmt.format(src, sport), "dst": fmt.format(dst, dport)}
    if data.startswith(PP2_SIGNATURE[:len(data)]) and len(data) < 16:
        return None
    if data.startswith(PP2_SIGNATURE):
        ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
        if len(data) < 16 + length:
            return None
        out = {"version": ver_cmd >> 4, "command": ["LOCAL", "PROXY"][ver_cmd & 15],
               "family": fam}
        if ver_cmd & 15 == 1 and fam in (0x11, 0x21):
            size = 4 if fam == 0x11 else 16
            a = data[16:16 + 2 * size + 4]
            src, dst = (ipaddress.ip_address(a[:size]), ipaddress.ip_address(a[size:2 * size]))
            sport, dport = struct.unpack_from("!HH", a, 2 * size)
            fmt = "{}:{}" if size == 4 else "[{}]:{}"
            out["src"] = fmt.format(src, sport)
            out["dst"] = fmt.format(dst, dport)
        return 16 + length, out
    if b"PROXY ".startswith(data):
        return None
    return 0, None


# ---------------------------------------------------------------- scripted backend

HANG = object()


class Reply:
    """Raw response bytes; ``close`` closes the connection after writing.
    ``data=None, close=True`` closes without answering."""

    def __init__(self, data, close=False):
        self.data = data
        self.close = close


class Request:
    def __init__(self, head):
        self.head = head
        lines = head[:-4].split(b"\r\n")
        self.line = lines[0].decode("latin-1")
        self.method, self.target, self.version = (self.line.split(" ", 2) + ["", ""])[:3]
        self.headers = []
        for ln in lines[1:]:
            name, _, value = ln.partition(b":")
            self.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        self.body = bytearray()
        self.body_len = 0
        self.sha = hashlib.sha256()
        self.conn_index = 0   # which connection of the backend
        self.index_on_conn = 0
        self.proxy = None     # the PROXY protocol header its connection began with (a dict)

    def get(self, name):
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def all(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self):
        return [n.lower() for n, _ in self.headers]


KEEP_BODY = 1 << 20


def echo_response(be, req, extra_headers=b""):
    doc = {
        "backend": be.name, "method": req.method, "target": req.target,
        "version": req.version, "headers": req.headers, "body_len": req.body_len,
        "sha256": req.sha.hexdigest(),
        "body": bytes(req.body).decode("latin-1") if req.body_len <= 4096 else None,
        "conn": req.conn_index, "n_on_conn": req.index_on_conn,
    }
    if be.proxy_protocol:
        doc["proxy"] = req.proxy
    body = json.dumps(doc).encode()
    close = b"Connection: close\r\n" if (req.get("connection") or "").lower() == "close" else b""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Backend: "
            + be.name.encode() + b"\r\n" + extra_headers + close
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _BackendConn(asyncio.Protocol):
    def __init__(self, be):
        self.be = be
        self.buf = bytearray()
        self.req = None
        self.left = 0
        self.chunked = False
        self.nreq = 0
        self.transport = None
        self.closed = False
        self.proxy = None       # the connection's PROXY protocol header (a dict), if any
        self.proxy_done = not be.proxy_protocol

    def connection_made(self, transport):
        self.transport = transport
        self.index = self.be.connections
        self.be.connections += 1
        self.be.open_conns.add(self)
        self.be.conn_event(True)

    def connection_lost(self, exc):
        self.closed = True
        self.be.open_conns.discard(self)
        self.be.conn_event(False)

    def data_received(self, data):
        be = self.be
        be.received += data
        self.buf += data
        if not self.proxy_done:
            got = read_proxy_header(bytes(self.buf))
            if got is None:
                return
            n, self.proxy = got
            del self.buf[:n]
            self.proxy_done = True
            be.proxy_headers.append(self.proxy)
        for _ in range(10000):
            if self.closed or not self._step():
                break

    def _step(self):
        be = self.be
        if self.req is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(self.buf[:end + 4])
            del self.buf[:end + 4]
            req = self.req = Request(head)
            req.conn_index = self.index
            req.index_on_conn = self.nreq
            req.proxy = self.proxy
            self.nreq += 1
            te = (req.get("transfer-encoding") or "").lower()
            self.chunked = "chunked" in te
            self.left = int(req.get("content-length") or 0) if not self.chunked else 0
            self.chunk_state = "size"
            if (req.get("expect") or "").lower() == "100-continue" and be.send_continue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if be.on_head is not None:
                be.on_head(self, req)
            return True
        req = self.req
        if not self.chunked:
            take = min(self.left, len(self.buf))
            if take:
                self._add_body(bytes(self.buf[:take]))
                del self.buf[:take]
                self.left -= take
            if self.left:
                return False
        else:
            if not self._chunk_step():
                return False
            if self.chunk_state != "done":
                return True
        self.req = None
        be.requests.append(req)
        self._respond(req)
        return True

    def _chunk_step(self):
        st = self.chunk_state
        if st == "size":
            i = self.buf.find(b"\r\n")
            if i < 0:
                return False
            size = int(bytes(self.buf[:i]).split(b";")[0], 16)
            del self.buf[:i + 2]
            self.left = size
            self.chunk_state = "data" if size else "trailer"
            return True
        if st == "data":
            if self.left:
                take = min(self.left, len(self.buf))
                if not take:
                    return False
                self._add_body(bytes(self.buf[:take]))
                del self.buf[:take]
                self.left -= take
                return True
            if len(self.buf) < 2:
                return False
            del self.buf[:2]
            self.chunk_state = "size"
            return True
        if st == "trailer":
            i = self.buf.find(b"\r\n")
            if i < 0:
                return False
            line = bytes(self.buf[:i])
            del self.buf[:i + 2]
            if line == b"":
                self.chunk_state = "done"
            else:
                self.req.headers.append(("trailer:" + line.decode("latin-1"), ""))
            return True
        return False

    def _add_body(self, piece):
        req = self.req
        req.body_len += len(piece)
        req.sha.update(piece)
        if len(req.body) < KEEP_BODY:
            req.body += piece[:KEEP_BODY - len(req.body)]

    def _respond(self, req):
        be = self.be
        out = be.handler(be, req) if be.handler is not None else echo_response(be, req)
        if out is HANG:
            return
        close = False
        if isinstance(out, Reply):
            close = out.close
            out = out.data
        if out is not None:
            if isinstance(out, (list, tuple)):
                for piece in out:
                    self.transport.write(piece)
            else:
                self.transport.write(out)
        if be.max_requests is not None and self.nreq >= be.max_requests:
            close = True
        if close:
            self.transport.close()
            self.closed = True


class ScriptBackend:
    """A backend server on ``lt`` (a LoopThread). ``handler(be, req)`` returns
    the response: bytes, a list of byte strings, a ``Reply``, or ``HANG``.
    ``ssl``: an ``ssl.SSLContext`` to serve HTTPS with."""

    def __init__(self, lt, name="A", handler=None, max_requests=None, send_continue=True,
                 on_head=None, ssl=None, proxy_protocol=False):
        self.lt = lt
        self.proxy_protocol = proxy_protocol
        self.proxy_headers = []     # the PROXY protocol header of each connection, in order
        self.name = name
        self.handler = handler
        self.max_requests = max_requests
        self.send_continue = send_continue
        self.on_head = on_head
        self.received = bytearray()
        self.requests = []
        self.connections = 0
        self.open_conns = set()
        self.events = []

        async def go():
            loop = asyncio.get_running_loop()
            return await loop.create_server(lambda: _BackendConn(self), HOST, 0, ssl=ssl)

        self.server = lt.call(go())
        self.port = self.server.sockets[0].getsockname()[1]
        self.addr = (HOST, self.port)

    def conn_event(self, opened):
        self.events.append(opened)

    def close_idle_connections(self):
        def run():
            for c in list(self.open_conns):
                c.transport.close()
        self.lt.call_soon(run)

    def stop(self):
        def run():
            self.server.close()
            for c in list(self.open_conns):
                c.transport.abort()
        self.lt.call_soon(run)


@pytest.fixture
def backend_loop():
    lt = LoopThread("backends")
    yield lt
    lt.stop()


@pytest.fixture
def make_backend(backend_loop):
    made = []

    def make(name="A", **kw):
        be = ScriptBackend(backend_loop, name, **kw)
        made.append(be)
        return be

    yield make
    for be in made:
        be.stop()


@pytest.fixture
def make_lb():
    made = []

    def make(backends, **kw):
        addrs = [b.addr if hasattr(b, "addr") else b for b in backends]
        lb = Balancer(addrs, **kw)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.stop()


# ---------------------------------------------------------------- uvicorn backend

async def echo_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = bytearray()
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    doc = {
        "backend": "uvicorn", "method": scope["method"], "path": scope["path"],
        "query": scope["query_string"].decode(), "http_version": scope["http_version"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body_len": len(body), "sha256": hashlib.sha256(body).hexdigest(),
    }
    out = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


class UvicornBackend:
    def __init__(self, app=echo_asgi):
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.addr = (HOST, self.port)
        config = uvicorn.Config(app, host=HOST, port=self.port, lifespan="off",
                                log_level="warning", access_log=False, loop="asyncio")
        self.server = uvicorn.Server(config)
        # only needed on old uvicorn versions: never touch signals from a thread
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn thread died"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ---------------------------------------------------------------- subprocess balancer

def fastlb_cmd(*args):
    return [sys.executable, "-m", "fastlb", *args]


def run_fastlb(*args, timeout=30, **kw):
    return subprocess.run(fastlb_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kw)


class FastlbProcess:
    """``python -m fastlb serve`` with ``--listen 127.0.0.1:0``; the port is read
    from its "listening on" line on stderr. ``backends=None``: ``serve`` with
    only the ``extra`` arguments (e.g. ``--config FILE``); ``cwd`` (the
    repository by default) and ``env`` are the process's."""

    def __init__(self, backends, *extra, stdout=subprocess.DEVNULL, cwd=REPO, env=None):
        args = ["serve"]
        if backends is not None:
            args += ["--listen", f"{HOST}:0"]
            for h, p in backends:
                args += ["--backend", f"http://{h}:{p}"]
        args += list(extra)
        if cwd != REPO and env is None:
            # python -m fastlb from elsewhere: the package is still this checkout's
            env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen(fastlb_cmd(*args), stdout=stdout,
                                     stderr=subprocess.PIPE, cwd=cwd, env=env)
        self.stderr_lines = []
        self.port = None
        deadline = time.monotonic() + 15
        fd = self.proc.stderr.fileno()
        buf = b""
        while self.port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"fastlb did not start: {buf!r}")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                self.proc.wait(5)
                raise AssertionError(f"fastlb exited ({self.proc.returncode}): {buf!r}")
            buf += chunk
            m = re.search(rb"listening on [^\n]*?:(\d+) ->", buf)
            if m:
                self.port = int(m.group(1))
        self.startup = buf
        # keep draining stderr so the child never blocks on a full pipe
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        self.url = f"http://{HOST}:{self.port}"

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def status(self, key):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def terminate(self, timeout=10):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self._close_pipes()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_pipes()

    def _close_pipes(self):
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(5)
        for f in (self.proc.stderr, self.proc.stdout):
            if f is not None and not f.closed and (drain is None or not drain.is_alive()):
                f.close()


# ---------------------------------------------------------------- raw sockets

def raw_connect(port, timeout=5.0, nodelay=True, source=None):
    """A TCP connection to 127.0.0.1:``port``; ``source``: the local address
    to connect from (any of 127.0.0.0/8 is this machine)."""
    s = socket.create_connection((HOST, port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_raw(sock, data, split=None, delay=0.002):
    """Send ``data``: whole, at the offsets in ``split``, or one byte at a time
    (``split="bytes"``), with a tiny pause between pieces (bounded by len(data))."""
    if split is None:
        sock.sendall(data)
        return
    if split == "bytes":
        points = list(range(1, len(data)))
    else:
        points = sorted(p for p in split if 0 < p < len(data))
    prev = 0
    for p in points + [len(data)]:
        if prev and select.select([sock], [], [], 0)[0]:
            return False  # the proxy already answered (an error): stop like a real client
        try:
            sock.sendall(data[prev:p])
        except (BrokenPipeError, ConnectionResetError):
            return False
        prev = p
        if p != len(data):
            time.sleep(delay)
    return True


def recv_until_close(sock, timeout=5.0, limit=1 << 24):
    """Read until the peer closes (or ``timeout``). Returns (data, closed)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return bytes(out), False
        except ConnectionResetError:
            return bytes(out), True
        if not chunk:
            return bytes(out), True
        out += chunk
    return bytes(out), False


def exchange(port, data, timeout=5.0, split=None, shut=False):
    """Connect, send ``data``, read until the proxy closes. Returns (data, closed)."""
    with raw_connect(port, timeout) as s:
        send_raw(s, data, split)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return recv_until_close(s, timeout)


def ok_response(body=b"ok", extra=b""):
    return (b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            + extra + b"\r\n" + body)


def get(port, path="/", method="GET", body=b"", timeout=5.0, headers=b""):
    with raw_connect(port, timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\n".encode() + headers
                  + (b"Content-Length: %d\r\n" % len(body) if body else b"") + b"\r\n" + body)
        return Reader(s, timeout).read_response(method=method)


class Response:
    def __init__(self, status, reason, version, headers, body, raw_head):
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def get(self, name):
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:200]!r}>"


class Reader:
    """Buffered reader of responses from a raw socket."""

    def __init__(self, sock, timeout=5.0):
        self.sock = sock
        self.buf = bytearray()
        self.timeout = timeout
        self.eof = False

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading a response")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("timed out reading a response") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _until(self, sep, deadline):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            if not self._fill(deadline):
                raise EOFError(f"connection closed; got {bytes(self.buf)!r}")

    def _exactly(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise EOFError(f"connection closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_response(self, head_only=False, method="GET", timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self._until(b"\r\n\r\n", deadline)
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        headers = []
        for ln in lines[1:]:
            n, _, v = ln.partition(b":")
            headers.append((n.decode("latin-1"), v.strip().decode("latin-1")))
        resp = Response(int(code), reason.decode("latin-1"), version.decode(), headers, b"", head)
        status = resp.status
        if head_only or method == "HEAD" or status < 200 or status in (204, 304):
            return resp
        te = (resp.get("transfer-encoding") or "").lower()
        cl = resp.get("content-length")
        if "chunked" in te:
            body = bytearray()
            for _ in range(1 << 20):
                size_line = self._until(b"\r\n", deadline)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self._until(b"\r\n", deadline) != b"\r\n":
                        pass
                    break
                body += self._exactly(size, deadline)
                assert self._exactly(2, deadline) == b"\r\n"
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = self._exactly(int(cl), deadline)
        else:
            while self._fill(deadline):
                pass
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def at_eof(self, timeout=2.0):
        """True when the peer closes without sending more bytes within ``timeout``."""
        deadline = time.monotonic() + timeout
        if self.buf:
            return False
        try:
            return not self._fill(deadline)
        except TimeoutError:
            return False


def parse_one(data, method="GET"):
    """Parse the first response in ``data`` (bytes already read)."""
    class _S:
        def __init__(self, d):
            self.d = d

        def settimeout(self, t):
            pass

        def recv(self, n):
            d, self.d = self.d[:n], self.d[n:]
            return d

    return Reader(_S(data)).read_response(method=method)


def wait_for(pred, timeout=5.0, step=0.02):
    """``pred()``'s first true value within ``timeout`` seconds, else its last."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


# ---------------------------------------------------------------- access log

# One combined line (the default --access-log-format): nginx's combined, then
# backend, total and upstream time. A field holds no raw '"' (they are escaped).
ACCESS_LOG_COMBINED = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<ua>[^"]*)" (?P<backend>\S+) '
    r'(?P<total>\d+\.\d{3})ms (?P<upstream>\d+\.\d{3}ms|-)$')

ACCESS_LOG_JSON_KEYS = ["time", "client", "method", "target", "version", "status", "bytes_sent",
                        "backend", "upstream_ms", "total_ms", "request_id"]


def access_log_lines(path, n, timeout=5.0, settle=0.3):
    """The lines of the access log at ``path`` once it has at least ``n``
    (waiting up to ``timeout``), read again after ``settle`` seconds so that a
    line too many shows up too (the log is written a few times a second)."""
    def count():
        try:
            with open(path, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    wait_for(lambda: count() >= n, timeout)
    time.sleep(settle)
    with open(path, "rb") as f:
        return f.read().decode("ascii").splitlines()
