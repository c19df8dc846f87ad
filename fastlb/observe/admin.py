"""The admin listener: ``/metrics``, ``/status``, ``/status.json`` and the admin API.

Off unless configured (``--admin HOST:PORT`` or ``[admin] bind``), and never
a traffic listener's socket. With workers the master serves it; else the one
process does. It speaks plain HTTP/1.1 (httptools parses it), one small
request at a time, and is not on the request path of traffic.

Writes (everything under ``/api`` but ``GET /api/pools``) need
``Authorization: Bearer TOKEN``, the token being the first line of the token
file (compared in constant time); without a token file the API is read-only.
Reads are open unless ``protect_reads`` is set.
"""
import asyncio
import hmac
import json
import logging
import re
import urllib.parse

import httptools

from fastlb.observe.status import PAGE, collect, metrics_text

__all__ = ["AdminServer", "AdminError", "start_admin", "read_token"]

log = logging.getLogger("fastlb")

MAX_HEAD = 16384
MAX_BODY = 65536
IDLE_TIMEOUT = 30.0
RUNTIME_NOTE = ("a runtime change: the next reload of the configuration file undoes it "
                "unless the file says the same")

_BACKEND_PATH = re.compile(r"/api/pools/([^/]+)/backends/([^/]+)(?:/(drain|disable|enable|weight))?\Z")
_POOL_PATH = re.compile(r"/api/pools/([^/]+)/backends\Z")


class AdminError(Exception):
    """An API answer other than 200: ``status`` and a message for the JSON body."""

    def __init__(self, status, message, field=None):
        super().__init__(message)
        self.status = status
        self.field = field


def read_token(path):
    """The token in ``path`` (its first line, stripped); OSError or ValueError."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the token must be at least 16 characters")
    return token


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _response(status, body, ctype, keep_alive, extra=b""):
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n").encode("latin-1")
    return head + extra + b"\r\n" + body


def _json(status, obj, keep_alive=True, extra=b""):
    return _response(status, (json.dumps(obj, indent=1) + "\n").encode(), "application/json",
                     keep_alive, extra)


class _Conn(asyncio.Protocol):
    def __init__(self, server):
        self.server = server
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = {}
        self.body = bytearray()
        self.size = 0
        self.busy = False
        self.pending = []
        self.timer = None
        self._name = None

    # httptools callbacks
    def on_message_begin(self):
        self.url = b""
        self.headers = {}
        self.body = bytearray()

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self._name = name.decode("latin-1").lower()
        self.headers[self._name] = value.decode("latin-1")

    def on_headers_complete(self):
        self.size = 0

    def on_body(self, body):
        self.body += body
        if len(self.body) > MAX_BODY:
            raise _TooLarge()

    def on_message_complete(self):
        self.pending.append((self.parser.get_method().decode("latin-1"), self.url,
                             self.headers, bytes(self.body), self.parser.should_keep_alive()))

    # asyncio
    def connection_made(self, transport):
        self.transport = transport
        self.server.conns.add(self)
        self._arm()

    def connection_lost(self, exc):
        self.server.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _arm(self):
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.transport.close)

    def data_received(self, data):
        self._arm()
        self.size += len(data)
        try:
            self.parser.feed_data(data)
        except _TooLarge:
            self._fail(413, "request body too large")
            return
        except httptools.HttpParserUpgrade:
            self._fail(400, "no upgrades here")
            return
        except httptools.HttpParserError as e:
            self._fail(400, f"invalid request: {e}")
            return
        if not self.pending and self.size > MAX_HEAD and not self.body:
            self._fail(431, "request head too large")
            return
        if self.pending and not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._serve())

    def _fail(self, status, message):
        self.transport.write(_json(status, {"error": message}, keep_alive=False))
        self.transport.close()

    async def _serve(self):
        try:
            while self.pending and not self.transport.is_closing():
                method, url, headers, body, keep = self.pending.pop(0)
                try:
                    out = await self.server.handle(method, url, headers, body, keep)
                except Exception:
                    log.exception("admin: %s %s failed", method, url[:200])
                    out = _json(500, {"error": "internal error (see fastlb's log)"}, keep)
                self.transport.write(out)
                if not keep:
                    self.transport.close()
                    return
        finally:
            self.busy = False


class _TooLarge(Exception):
    pass


class AdminServer:
    """Serves ``source`` (see ``fastlb.observe.status.collect``; its actions
    are ``set_mode``, ``set_weight``, ``add_backend``, ``remove_backend``)."""

    def __init__(self, source, token=None, protect_reads=False):
        self.source = source
        self.token = token
        self.protect_reads = protect_reads
        self.conns = set()
        self.server = None

    def _auth(self, headers, write):
        if not write and not self.protect_reads:
            return None
        if self.token is None:
            if write:
                return _json(403, {"error": "the admin API is read-only: no token is "
                                            "configured (--admin-token-file)"})
            return None
        got = headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return _json(401, {"error": "this needs Authorization: Bearer TOKEN"},
                         extra=b'WWW-Authenticate: Bearer realm="fastlb"\r\n')
        if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return _json(403, {"error": "wrong token"})
        return None

    async def handle(self, method, url, headers, body, keep):
        parts = urllib.parse.urlsplit(url.decode("latin-1"))
        path = parts.path
        write = method not in ("GET", "HEAD")
        denied = self._auth(headers, write)
        if denied is not None:
            return denied
        try:
            if path in ("/", "/status"):
                if method not in ("GET", "HEAD"):
                    raise AdminError(405, "GET only")
                return _response(200, PAGE.encode(), "text/html; charset=utf-8", keep)
            if path == "/status.json":
                if method not in ("GET", "HEAD"):
                    raise AdminError(405, "GET only")
                return _json(200, collect(self.source), keep)
            if path == "/metrics":
                if method not in ("GET", "HEAD"):
                    raise AdminError(405, "GET only")
                text = metrics_text(collect(self.source))
                return _response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8",
                                 keep)
            if path == "/api/pools":
                if method != "GET":
                    raise AdminError(405, "GET only")
                return _json(200, {"pools": collect(self.source)["pools"]}, keep)
            m = _POOL_PATH.match(path)
            if m:
                if method != "POST":
                    raise AdminError(405, "POST adds a backend")
                pool = urllib.parse.unquote(m.group(1))
                req = _body(body)
                url_ = req.get("url")
                if not isinstance(url_, str):
                    raise AdminError(400, "url: expected a string such as http://10.0.0.5:8080",
                                     "url")
                weight = req.get("weight", 1)
                result = await self.source.add_backend(pool, url_, weight)
                return _json(200, dict(result, note=RUNTIME_NOTE), keep)
            m = _BACKEND_PATH.match(path)
            if m:
                pool = urllib.parse.unquote(m.group(1))
                backend = urllib.parse.unquote(m.group(2))
                action = m.group(3)
                if action is None:
                    if method != "DELETE":
                        raise AdminError(405, "DELETE removes a backend")
                    result = await self.source.remove_backend(pool, backend)
                elif action == "weight":
                    if method != "PUT":
                        raise AdminError(405, "PUT sets the weight")
                    w = _body(body).get("weight")
                    result = self.source.set_weight(pool, backend, w)
                else:
                    if method != "POST":
                        raise AdminError(405, f"POST to {action}")
                    mode = {"drain": "drain", "disable": "maint", "enable": "enabled"}[action]
                    result = self.source.set_mode(pool, backend, mode)
                return _json(200, dict(result, note=RUNTIME_NOTE), keep)
            raise AdminError(404, f"no such page: {path}")
        except AdminError as e:
            err = {"error": str(e)}
            if e.field is not None:
                err["field"] = e.field
            return _json(e.status, err, keep)

    async def start(self, host, port, loop=None):
        loop = loop or asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), host, port,
                                               reuse_address=True)
        return self.server

    def close(self):
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.transport.close()

    @property
    def address(self):
        return self.server.sockets[0].getsockname()[:2]


def _body(body):
    if not body:
        raise AdminError(400, "expected a JSON object in the body")
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise AdminError(400, f"the body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise AdminError(400, "expected a JSON object in the body")
    return obj


async def start_admin(source, admin_config):
    """Start the admin listener of ``admin_config`` (a ``fastlb.config.model.AdminConfig``)."""
    token = None
    if admin_config.token_file is not None:
        token = read_token(admin_config.token_file)
    server = AdminServer(source, token, admin_config.protect_reads)
    await server.start(admin_config.host, admin_config.port)
    host, port = server.address
    log.info("admin listening on %s:%d (%s)", host, port,
             "read-only API" if token is None else "API with a token")
    return server
