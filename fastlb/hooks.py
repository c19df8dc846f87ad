"""Python hooks: functions of the user's module on the request path.

``[hooks] module = "myhooks"`` in the configuration file (or ``--hooks
myhooks``) names a module to import (a dotted name, looked up on
``sys.path`` with the working directory first) or a Python file (a path: it
contains a ``/`` or ends in ``.py``; relative to the configuration file's
directory, or for ``--hooks`` to the working directory). It defines any of
three functions, each called only when defined:

    route(request) -> pool name or None         before the listener's routes
    select(request, pool) -> backend or None    before the pool's algorithm
    request_headers(request) -> [(name, value)]  fields added to the head sent
                                                 upstream, replacing those of the same names

``request`` is a ``Request``: a read-only view of the request head that was
parsed and validated already (method, path, query, host, the client's
address, header lookup); ``pool`` a ``PoolView`` whose ``backends`` are
``BackendView``\\ s. The README's "Python hooks" section is the contract.

Loading (``configure``) happens when a configuration is loaded, at start and
at every reload, so every problem is a configuration error that names it: a
module that cannot be imported (with the exception and where it was
raised), one that defines none of the three, a hook that is not a plain
function taking those arguments. Each load imports the module afresh (a new
module object, from its source, never from a stale ``.pyc``): a reload runs
the edited file, and a failed import leaves the module of the running
configuration as it was. A worker process imports the module itself
(``load_module``: the configuration reaches it without the module).

The data path (``fastlb._proxy``) reads ``Proxy.hooks``: a ``Hooks`` built
with the pools of the running configuration, or None (no hooks: nothing of
this module runs). Per request, when it is set::

    view = hooks.request(req, head, client_address, front)
    pool = hooks.pick_pool(view)          # a Pool, None (the routes decide) or HOOK_FAILED
    idx = hooks.pick_backend(view, pool)  # an index counted in flight on pool.balancer,
                                          # -1 (the algorithm decides) or SELECT_FAILED
    out = hooks.edit_head(view, out)      # the head to send, or HOOK_FAILED

each of the three None when the module does not define its hook. Whatever
the user's code does is caught here: an exception, or a value that is not
what the contract says, is logged (the first at once, then at most one line
per LOG_EVERY seconds for each hook and kind of problem, with the count of
those not logged) and the client gets 500.
"""
import importlib.util
import inspect
import logging
import os
import re
import sys
import time
import traceback

from fastlb.core import field_value
from fastlb.errors import HOOK_FAILED, SELECT_FAILED, ConfigError
from fastlb.runtime.routing import request_host
from fastlb.validate import header_name_problem, header_value_problem, show

__all__ = ["HOOKS", "configure", "load_module", "Hooks", "Request", "PoolView", "BackendView",
           "HOOK_FAILED", "SELECT_FAILED", "LOG_EVERY"]

log = logging.getLogger("fastlb")

HOOKS = ("route", "select", "request_headers")
_ARGS = {"route": ("request",), "select": ("request", "pool"),
         "request_headers": ("request",)}
LOG_EVERY = 10.0        # seconds between two log lines about one hook's one kind of problem
_KEYS = 256             # kinds of problem remembered at most (then forgotten at once)
_SHOWN = 80             # characters of a returned value shown in a log line

# fields a hook may not set: fastlb frames the message and owns the connection
FORBIDDEN = frozenset(["content-length", "transfer-encoding", "connection", "keep-alive",
                       "proxy-connection", "te", "trailer", "upgrade"])

_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_VCHARS = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_FORBIDDEN_B = frozenset(n.encode() for n in FORBIDDEN)

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


# ---------------------------------------------------------------- loading

def is_path(spec):
    """Whether ``spec`` names a file (else a module)."""
    return "/" in spec or os.sep in spec or spec.endswith(".py")


_ours = set()       # names in sys.modules that a hooks import put there


def _where(exc):
    """`` (at FILE:LINE)`` of the innermost frame of ``exc``, or ""."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename != __file__ and not f.filename.startswith("<frozen")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno})"


def _describe(exc):
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{_where(exc)}"


def _execute(name, spec, shown):
    """A new module of ``spec`` under ``name``, executed from its source; the
    module that was in ``sys.modules`` under that name is put back if it fails."""
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    old = sys.modules.get(name)
    sys.modules[name] = module
    try:
        source = loader.get_source(name) if hasattr(loader, "get_source") else None
        if source is None:
            loader.exec_module(module)
        else:
            # from the source itself: a .pyc is trusted by its mtime in whole
            # seconds, and a file edited within one would run its old code
            exec(compile(source, spec.origin, "exec", dont_inherit=True), module.__dict__)
    except (Exception, SystemExit) as e:
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old
        raise ConfigError(f"cannot import {shown}: {_describe(e)}") from None
    _ours.add(name)
    return module


def _import_name(name):
    shown = show(name)
    if name in sys.modules and name not in _ours:
        # already imported by fastlb itself or its libraries: used as it is
        return sys.modules[name]
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    old = sys.modules.pop(name, None)
    try:
        spec = importlib.util.find_spec(name)
    except (Exception, SystemExit) as e:     # a parent package that fails to import
        spec = None
        problem = _describe(e)
    else:
        problem = None
    finally:
        if old is not None:
            sys.modules[name] = old
    if spec is None:
        raise ConfigError(f"cannot import {shown}: "
                          f"{problem or f'no module named {shown}'} (a module name is "
                          "looked up on sys.path and in the working directory; a file "
                          "is named by its path, such as ./myhooks.py)")
    return _execute(name, spec, shown)


def _import_file(spec, path):
    shown = show(spec)
    if not os.path.isfile(path):
        raise ConfigError(f"cannot import {shown}: no such file ({path})")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"_fastlb_hooks_{stem}"
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None:
        raise ConfigError(f"cannot import {shown}: not a Python file ({path})")
    return _execute(name, mspec, shown)


def _check(module, shown):
    """The hooks ``module`` defines, in HOOKS order; ConfigError if none or a bad one."""
    found = []
    problems = []
    for name in HOOKS:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        args = ", ".join(_ARGS[name])
        if not callable(fn):
            problems.append(f"{name} is not a function (it is {type(fn).__name__})")
            continue
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            problems.append(f"{name} is async def: hooks are plain functions (they run on the "
                            "event loop and cannot await)")
            continue
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            try:
                sig.bind(*_ARGS[name])
            except TypeError:
                problems.append(f"{name}{sig} cannot be called as {name}({args})")
                continue
        found.append(name)
    if problems:
        raise ConfigError(f"{shown}: " + "; ".join(problems))
    if not found:
        raise ConfigError(f"{shown} defines none of {', '.join(HOOKS)}")
    return tuple(found)


def configure(spec, base=None):
    """The ``HooksConfig`` of ``spec`` (a module name or a file path, a file
    relative to ``base`` or the working directory), its module imported
    afresh and checked. Raises ``ConfigError`` naming the problem."""
    from fastlb.config.model import HooksConfig

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected a module name or a file path, got {show(spec)}")
    if is_path(spec):
        path = os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(spec)))
        module = _import_file(spec, path)
    else:
        if not _MODULE.match(spec):
            raise ConfigError(f"{show(spec)} is neither a module name (myhooks, pkg.hooks) "
                              "nor a file path (./myhooks.py)")
        path = None
        module = _import_name(spec)
    defined = _check(module, show(spec))
    return HooksConfig(module=spec, path=path, defined=defined, loaded=module)


def load_module(hc):
    """The module of ``hc`` (a ``HooksConfig``): the one imported with it, or,
    in a worker (which got the configuration without it), imported now."""
    if hc.loaded is not None:
        return hc.loaded
    if hc.path is not None:
        module = _import_file(hc.module, hc.path)
    else:
        module = _import_name(hc.module)
    _check(module, show(hc.module))
    return module


# ---------------------------------------------------------------- views

class Request:
    """A read-only view of one request, given to every hook of that request.

    Built from the head the data path parsed and validated already; each
    attribute is read from it when asked for (str, decoded as Latin-1):

    * ``method``: ``"GET"``; ``version``: ``"1.1"`` or ``"1.0"``;
    * ``path``: the target in origin form up to ``?``, as sent (not
      decoded): ``"/api/users"``; ``query``: what follows ``?`` (``""``:
      none); an absolute-form target gives the same path and query as its
      origin form;
    * ``host``: the request's host as routes compare it: lower-cased,
      without port or trailing dot (``""`` when it has none);
    * ``client``: the client's address (the peer's, or what a trusted proxy
      says); ``listener``: the name of the listener it arrived on;
    * ``header(name, default=None)``: the value of the first field named
      ``name`` (case-insensitive); ``headers``: every ``(name, value)``
      field of the head, in order, as sent.
    """

    __slots__ = ("_req", "_head", "_client", "_front")

    def __init__(self, req, head, client, front):
        self._req = req
        self._head = head
        self._client = client
        self._front = front

    @property
    def method(self):
        return self._req.method.decode("latin-1")

    @property
    def version(self):
        return "1.0" if self._req.version == b"HTTP/1.0" else "1.1"

    @property
    def path(self):
        return self._req.path.partition(b"?")[0].decode("latin-1")

    @property
    def query(self):
        return self._req.path.partition(b"?")[2].decode("latin-1")

    @property
    def host(self):
        return request_host(self._req.host).decode("latin-1")

    @property
    def client(self):
        return self._client.decode("latin-1")

    @property
    def listener(self):
        return self._front.name

    @property
    def headers(self):
        fields = []
        for line in self._head.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return tuple(fields)

    def header(self, name, default=None):
        value = field_value(self._head, name.encode("latin-1", "replace"))
        return default if value is None else value.decode("latin-1")

    def __repr__(self):
        return f"<Request {self.method} {self.path} host={self.host!r} client={self.client!r}>"


class BackendView:
    """A backend of a pool, as ``select`` sees it (read-only).

    ``address`` (``host:port``, what identifies it in its pool), ``url``,
    ``weight`` (as configured), ``state`` (``UP``, ``DOWN``, ``EJECTED``,
    ``DRAIN`` or ``MAINT``, as the status page says it), ``eligible`` (the
    algorithm may choose it now: a backend ``select`` returns that is not
    is passed over) and ``active`` (requests on it now, in this process).
    """

    __slots__ = ("_pool", "_index")

    def __init__(self, pool, index):
        self._pool = pool
        self._index = index

    @property
    def address(self):
        return self._pool.backends[self._index].address

    @property
    def url(self):
        return self._pool.backends[self._index].url

    @property
    def weight(self):
        return self._pool.weights[self._index]

    @property
    def state(self):
        health = self._pool.health
        return health.backend_state(self._index) if health is not None else "UP"

    @property
    def eligible(self):
        return bool(self._pool.balancer.is_eligible(self._index))

    @property
    def active(self):
        return self._pool.backends[self._index].active

    def __repr__(self):
        return f"<Backend {self._pool.name}/{self.address} {self.state}>"


class PoolView:
    """A pool, as ``select`` sees it (read-only): ``name`` and ``backends``
    (a tuple of ``BackendView``, in the pool's order)."""

    __slots__ = ("_pool", "_backends", "_by_address")

    def __init__(self, pool):
        self._pool = pool
        self._backends = tuple(BackendView(pool, i) for i in range(len(pool.backends)))
        self._by_address = {b.address: i for i, b in enumerate(pool.backends)}

    @property
    def name(self):
        return self._pool.name

    @property
    def backends(self):
        return self._backends

    def __repr__(self):
        return f"<Pool {self.name}: {len(self._backends)} backends>"


# ---------------------------------------------------------------- the hooks of a configuration

def _shown(value):
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


class Hooks:
    """The hooks of one running configuration, over its pools (``name ->
    Pool``); see the module docstring for what the data path calls."""

    def __init__(self, module, pools, name):
        self.module = module
        self.name = name            # as configured, for log lines
        self._route = getattr(module, "route", None)
        self._select = getattr(module, "select", None)
        self._headers = getattr(module, "request_headers", None)
        self.pick_pool = self._pick_pool if self._route is not None else None
        self.pick_backend = self._pick_backend if self._select is not None else None
        self.edit_head = self._edit_head if self._headers is not None else None
        self._pools = dict(pools)
        self._views = {n: PoolView(p) for n, p in pools.items()}
        self._logged = {}           # problem -> [time last logged, how many since]
        # request(req, head, client, front): the view, made by the class itself
        self.request = Request

    # -------------------------------------------------------- the three hooks

    def _pick_pool(self, request):
        try:
            got = self._route(request)
        except (Exception, SystemExit) as e:
            self._raised("route", e)
            return HOOK_FAILED
        if got is None:
            return None
        pool = self._pools.get(got) if type(got) is str else None
        if pool is None:
            if isinstance(got, str):
                self._invalid("route", "unknown pool", got, "no pool named "
                              f"{show(got)} (pools: {', '.join(self._pools)})")
            else:
                self._invalid("route", "type", got, "expected a pool name (str) or None")
            return HOOK_FAILED
        return pool

    def _pick_backend(self, request, pool):
        view = self._views.get(pool.name)
        if view is None or view._pool is not pool:
            view = PoolView(pool)
        try:
            got = self._select(request, view)
        except (Exception, SystemExit) as e:
            self._raised("select", e)
            return SELECT_FAILED
        if got is None:
            return -1
        if type(got) is BackendView:
            if got._pool is pool:
                idx = got._index
            elif got._pool.name == pool.name:
                # of an earlier build of this pool (a reload kept its name): by address
                idx = view._by_address.get(got.address)
                if idx is None:
                    self._invalid("select", "gone", got, f"{got.address} is no longer a "
                                  f"backend of pool {pool.name}")
                    return SELECT_FAILED
            else:
                self._invalid("select", "other pool", got, f"a backend of pool "
                              f"{got._pool.name}, not of pool {pool.name}")
                return SELECT_FAILED
        elif type(got) is str:
            idx = view._by_address.get(got)
            if idx is None:
                self._invalid("select", "unknown backend", got,
                              f"pool {pool.name} has no backend {show(got)} (backends: "
                              f"{', '.join(view._by_address) or 'none'})")
                return SELECT_FAILED
        else:
            self._invalid("select", "type", got, "expected one of pool.backends, a "
                          "backend's address (str) or None")
            return SELECT_FAILED
        balancer = pool.balancer
        if not balancer.is_eligible(idx):
            return -1       # DOWN, EJECTED, DRAIN, MAINT: the algorithm chooses
        balancer.acquire(idx)
        return idx

    def _edit_head(self, request, out):
        try:
            got = self._headers(request)
        except (Exception, SystemExit) as e:
            self._raised("request_headers", e)
            return HOOK_FAILED
        if got is None:
            return out
        if not isinstance(got, (list, tuple)):
            self._invalid("request_headers", "type", got,
                          "expected a list of (name, value) pairs or None")
            return HOOK_FAILED
        fields = []
        for item in got:
            problem = None
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                problem = f"{_shown(item)} is not a (name, value) pair"
            else:
                name, value = item
                field, problem = _field(name, value)
            if problem is not None:
                self._invalid("request_headers", "field", got, problem)
                return HOOK_FAILED
            fields.append(field)
        return replace_fields(out, fields) if fields else out

    # -------------------------------------------------------- log lines

    def _due(self, key):
        """``(log now, how many were not logged since the last line)``."""
        now = time.monotonic()
        seen = self._logged.get(key)
        if seen is None:
            if len(self._logged) >= _KEYS:
                self._logged.clear()
            self._logged[key] = [now, 0]
            return True, 0
        if now - seen[0] >= LOG_EVERY:
            more = seen[1]
            seen[0] = now
            seen[1] = 0
            return True, more
        seen[1] += 1
        return False, 0

    @staticmethod
    def _more(n):
        return f" ({n} more since the last report)" if n else ""

    def _raised(self, hook, exc):
        due, more = self._due((hook, "raised", type(exc)))
        if not due:
            return
        tb = exc.__traceback__
        # the user's frames: not this module's call into them
        lines = traceback.format_exception(type(exc), exc, tb.tb_next if tb is not None else None)
        log.error("hook %s of %s raised %s: %s; the client got 500%s\n%s", hook, self.name,
                  type(exc).__name__, exc, self._more(more), "".join(lines).rstrip())

    def _invalid(self, hook, kind, value, problem):
        due, more = self._due((hook, kind))
        if due:
            log.error("hook %s of %s returned %s: %s; the client got 500%s", hook, self.name,
                      _shown(value), problem, self._more(more))


def _field(name, value):
    """``(b"Name", b"value")`` of one field a hook gave, and None; or None and
    the problem."""
    if type(name) is str and type(value) is str:
        # the common case, at once: bytes.translate deletes every allowed byte
        try:
            n = name.encode("ascii")
            v = value.encode("latin-1")
        except UnicodeEncodeError:
            n = v = None
        if n and not n.translate(None, _TCHARS) and not v.translate(None, _VCHARS) \
                and n.lower() not in _FORBIDDEN_B:
            return (n, v.strip(b" \t")), None
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    if not isinstance(name, str):
        return None, f"a header name is a str, got {_shown(name)}"
    problem = header_name_problem(name)
    if problem is not None:
        return None, problem
    if name.lower() in FORBIDDEN:
        return None, f"{name} is set by fastlb (it frames the message): hooks cannot set it"
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None, f"the value of {name} is a str or bytes, got {_shown(value)}"
    try:
        raw = value.strip(" \t").encode("latin-1")
    except UnicodeEncodeError:
        return None, (f"the value of {name} has characters beyond Latin-1: give bytes "
                      "(value.encode())")
    problem = header_value_problem(value)
    if problem is not None:
        return None, f"{name}: {problem}"
    return (name.encode("ascii"), raw), None


def replace_fields(out, fields):
    """The head ``out`` (as written for a backend, ending in a blank line)
    without its fields of the names in ``fields``, then with ``fields``
    (``(name, value)`` bytes pairs, in their order) before its end."""
    added = b""
    replace = False
    for n, v in fields:
        added += n + b": " + v + b"\r\n"
        if not replace and field_value(out, n) is not None:
            replace = True
    if not replace:
        return out[:-2] + added + b"\r\n"     # none to replace: only added
    names = set()
    for n, _ in fields:
        names.add(n.lower())
    lines = out[:-4].split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line[:line.find(b":")].lower() not in names:
            kept.append(line)
    return b"\r\n".join(kept) + b"\r\n" + added + b"\r\n"
