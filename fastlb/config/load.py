"""Loading a configuration file: TOML text -> a validated ``Config``.

``load(path)`` reads and parses the file with ``tomllib``, checks every key
and value, every reference between sections and every backend host name,
and returns the model, or raises ``ConfigError`` listing *all* the problems
found, each as ``FILE:LINE: PATH: MESSAGE`` (``fastlb.errors.ConfigIssue``).
Problems that do not stop the configuration from running (an unused pool, a
``hash_key`` that the algorithm ignores, a host that does not resolve with
``allow_unresolved = true``) are kept in ``Config.warnings``.

Line numbers come from ``fastlb.config.locate`` (tomllib gives none): the
line of the key itself, or of its table when the key is missing. A TOML
syntax error is reported where tomllib says it is (``FILE:LINE:COLUMN``).

The schema is the tables below (``GLOBAL_KEYS``, ``LISTENER_KEYS``, ...):
one entry per key, mapping it to a converter that checks its type and range
(with ``fastlb.validate``, the same checks as the flags) and returns the
model's value. ``[pools.NAME.health]`` has one key per field of
``fastlb.health.HealthConfig``, checked by ``HealthConfig.check``.

``[hooks] module`` is imported while loading (``fastlb.hooks.configure``), a
file path relative to the configuration file's directory: a module that
cannot be imported, or that defines no hook, is an error of the file.
"""
import concurrent.futures
import dataclasses
import difflib
import os
import re
import tomllib
import typing

from fastlb import validate
from fastlb.observe.accesslog import FORMATS as ACCESS_LOG_FORMATS
from fastlb.config.locate import Locator, dotted
from fastlb.config.model import (AdminConfig, BackendConfig, BackendTLSConfig, Config,
                                 DiscoveryConfig, ListenerConfig, PoolConfig, RouteConfig,
                                 TLSConfig)
from fastlb.errors import ConfigError, ConfigIssue
from fastlb.health import HealthConfig
from fastlb.selection import ALGORITHMS, HASHED
from fastlb.validate import show

__all__ = ["load", "loads", "GLOBAL_KEYS", "LISTENER_KEYS", "ROUTE_KEYS", "POOL_KEYS",
           "BACKEND_KEYS", "HEALTH_KEYS", "DISCOVERY_KEYS", "TLS_KEYS", "CERTIFICATE_KEYS",
           "BACKEND_TLS_KEYS", "HOOKS_KEYS"]

_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_RESOLVERS = 16         # host names looked up at once, at most
_SYNTAX = re.compile(r"(.*) \(at line (\d+), column (\d+)\)\Z", re.S)


# ---------------------------------------------------------------- converters
# Each takes the value from tomllib and returns the model's value, or raises
# ConfigError with the bare reason (the loader adds the place).

def _token_problem(path):
    """Why the admin token file ``path`` cannot be used, or None."""
    from fastlb.observe.admin import read_token

    try:
        read_token(path)
    except OSError as e:
        return f"{show(path)}: {e.strerror or e}"
    except ValueError as e:
        return str(e)
    return None


def _fail(problem):
    if problem is not None:
        raise ConfigError(problem)


def _number(minimum=0.0, strict=False):
    def conv(value):
        _fail(validate.number_problem(value, minimum=minimum, strict=strict))
        return float(value)
    return conv


def _integer(minimum=0):
    def conv(value):
        _fail(validate.number_problem(value, integer=True, minimum=minimum))
        return value
    return conv


def _boolean(value):
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {show(value)}")
    return value


def _string(check=None):
    def conv(value):
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {show(value)}")
        return value if check is None else check(value)
    return conv


def _choice(choices):
    def conv(value):
        _fail(validate.choice_problem(value, choices))
        return value
    return conv


def _checked(problem):
    def check(value):
        _fail(problem(value))
        return value
    return check


def _name(value):
    if not _NAME.match(value):
        raise ConfigError(f"expected a pool name (letters, digits, - and _), got {show(value)}")
    return value


def _listen(value):
    try:
        return validate.listen_address(value)
    except ConfigError as e:
        raise ConfigError(f"{e}; expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080") \
            from None


def _hash_balance_factor(value):
    _fail(validate.hash_balance_factor_problem(value))
    return float(value)


_DNS_NAME = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?\Z")


def _srv_name(value):
    if len(value) > 253 or not _DNS_NAME.match(value):
        raise ConfigError(f"expected a DNS name such as _http._tcp.app.example, got {show(value)}")
    return value


def _resolver(value):
    """``IP[:PORT]`` or ``[IPv6]:PORT`` (port 53 when left out) -> (ip, port)."""
    host, port = value, 53
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"expected IP[:PORT] such as 127.0.0.1:5353, got {show(value)}")
        port = rest[1:] if rest else 53
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    if not validate.is_ip(host):
        raise ConfigError(f"the resolver is an IP address (with a port: 127.0.0.1:5353, "
                          f"[::1]:53), got {show(value)}")
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError(f"port must be from 1 to 65535, got {show(value)}")
    return host, port


def _etcd_endpoints(value):
    """``["http://HOST[:PORT]", ...]`` (port 2379 when left out) -> the same, checked."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError('expected an array of etcd endpoints (["http://127.0.0.1:2379"]), '
                          f"got {show(value)}")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"expected an endpoint such as http://127.0.0.1:2379, got "
                              f"{show(item)}")
        try:
            validate.etcd_endpoint(item)
        except ConfigError as e:
            raise ConfigError(f"{show(item)}: {e}") from None
        out.append(item)
    return tuple(out)


def _prefix(value):
    if not value or any(ord(c) < 0x20 for c in value):
        raise ConfigError(f"expected a key prefix such as /services/app/, got {show(value)}")
    return value


_POSITIVE = _number(strict=True)
_NON_NEGATIVE = _number()
_SPECIAL = None     # a key the loader reads itself (a table or an array of them)

# The schema: key -> converter, per section, in the order of the README's tables.
GLOBAL_KEYS = {
    "access_log": _string(_checked(validate.access_log_problem)),
    "access_log_format": _choice(tuple(ACCESS_LOG_FORMATS)),
    "via": _boolean,
    "log_level": _choice(validate.LOG_LEVELS),
    "drain_timeout": _NON_NEGATIVE,
    "allow_unresolved": _boolean,
    "workers": validate.workers,
    "request_id": _boolean,
    "request_id_header": _string(validate.request_id_header),
    "admin": _SPECIAL,
    "hooks": _SPECIAL,
    "listeners": _SPECIAL,
    "pools": _SPECIAL,
}
LISTENER_KEYS = {
    "bind": _string(_listen),
    "default_pool": _string(_name),
    "header_timeout": _POSITIVE,
    "keepalive_timeout": _POSITIVE,
    "max_header_size": _integer(1),
    "body_timeout": _NON_NEGATIVE,
    "body_min_rate": _NON_NEGATIVE,
    "upgrade": _boolean,
    "tunnel_timeout": _POSITIVE,
    "trusted_proxies": validate.trusted_networks,
    "tls": _SPECIAL,
    "proxy_protocol": _boolean,
    "proxy_protocol_from": validate.trusted_networks,
    "request_id": _boolean,
    "request_id_header": _string(validate.request_id_header),
    "backlog": _integer(1),
    "routes": _SPECIAL,
}
TLS_KEYS = {
    "certificates": _SPECIAL,
    "handshake_timeout": _POSITIVE,
}
CERTIFICATE_KEYS = {
    "cert": _string(),
    "key": _string(),
}
ROUTE_KEYS = {
    "host": _string(validate.route_host),
    "path_prefix": _string(_checked(validate.path_problem)),
    "path": _string(_checked(validate.path_problem)),
    "headers": _SPECIAL,
    "pool": _string(_name),
    "strip_prefix": _boolean,
}
POOL_KEYS = {
    "algorithm": _choice(ALGORITHMS),
    "hash_key": _string(validate.hash_key),
    "hash_balance_factor": _hash_balance_factor,
    "backends": _SPECIAL,
    "connect_timeout": _POSITIVE,
    "response_timeout": _POSITIVE,
    "retries": _integer(0),
    "retry_timeout": _POSITIVE,
    "upstream_idle_timeout": _POSITIVE,
    "upstream_max_idle": _integer(1),
    "max_interim": _integer(0),
    "tls": _SPECIAL,
    "send_proxy_protocol": _choice(validate.PROXY_PROTOCOL_VERSIONS),
    "health": _SPECIAL,
    "discovery": _SPECIAL,
}
BACKEND_TLS_KEYS = {
    "verify": _boolean,
    "ca_file": _string(),
    "server_name": _string(validate.server_name),
}
DISCOVERY_KEYS = {
    "dns_srv": _string(_srv_name),
    "interval": _POSITIVE,
    "resolver": _string(_resolver),
    "etcd": _etcd_endpoints,
    "prefix": _string(_prefix),
}
ADMIN_KEYS = {
    "bind": _string(_listen),
    "token_file": _string(),
    "protect_reads": _boolean,
}
HOOKS_KEYS = {
    "module": _string(),
}
BACKEND_KEYS = {
    "url": _string(),
    "weight": _checked(validate.weight_problem),
}


def _health_keys():
    """One key per init field of HealthConfig, typed from its annotation; the
    ranges are HealthConfig.check's."""
    kinds = {float: _number(minimum=float("-inf")), int: _integer(minimum=-(1 << 62)),
             str: _string(), bool: _boolean}
    keys = {}
    for f in dataclasses.fields(HealthConfig):
        if f.init:
            tp = [a for a in (typing.get_args(f.type) or (f.type,)) if a is not type(None)][0]
            keys[f.name] = kinds[tp]
    return keys


HEALTH_KEYS = _health_keys()

# For "unknown key" messages: where a key belongs, for each section's keys.
_SECTIONS = {
    "global": ("a global setting (at the top of the file)", GLOBAL_KEYS),
    "listener": ("a listener setting ([listeners.NAME])", LISTENER_KEYS),
    "route": ("a route setting ([[listeners.NAME.routes]])", ROUTE_KEYS),
    "pool": ("a pool setting ([pools.NAME])", POOL_KEYS),
    "backend": ("a backend setting ({ url = ..., weight = ... })", BACKEND_KEYS),
    "admin": ("an admin listener setting ([admin])", ADMIN_KEYS),
    "hooks": ("a hooks setting ([hooks])", HOOKS_KEYS),
    "health": ("a health check setting ([pools.NAME.health])", HEALTH_KEYS),
    "discovery": ("a discovery setting (discovery = { ... } of a pool)", DISCOVERY_KEYS),
    "tls": ("a TLS setting of a listener ([listeners.NAME.tls])", TLS_KEYS),
    "certificate": ("a certificate setting ({ cert = ..., key = ... } in [listeners.NAME.tls] "
                    "certificates)", CERTIFICATE_KEYS),
    "backend tls": ("a TLS setting of a pool's https:// backends ([pools.NAME.tls])",
                    BACKEND_TLS_KEYS),
}


# ---------------------------------------------------------------- entry points

def load(path, *, resolve=True):
    """Read, parse and validate the configuration file ``path``.

    Returns a ``Config`` (``source`` is ``path`` as given); raises
    ``ConfigError`` whose ``errors`` are every problem found. ``resolve``:
    look up backend host names (``False`` skips it, e.g. for tests).
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(errors=[ConfigIssue(f"cannot read: {e.strerror or e}",
                                              file=name)]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(errors=[ConfigIssue("not UTF-8 text", file=name, line=line)]) \
            from None
    return loads(text, name, resolve=resolve, base=os.path.dirname(os.path.abspath(name)))


def loads(text, name="<config>", *, resolve=True, base=None):
    """``load`` for TOML text; ``name`` is the file name used in messages,
    ``base`` the directory of a relative ``[hooks] module`` file (None: the
    working directory)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(errors=[_syntax_issue(e, name, text)]) from None
    loader = _Loader(name, Locator(text), base)
    config = loader.config(data, resolve)
    if loader.errors:
        raise ConfigError(errors=loader.errors)
    return config


def _syntax_issue(exc, name, text):
    msg = str(exc)
    m = _SYNTAX.match(msg)
    if m:
        return ConfigIssue(f"invalid TOML: {m.group(1)}", file=name, line=int(m.group(2)),
                           column=int(m.group(3)))
    if msg.endswith(" (at end of document)"):
        lines = text.split("\n")
        return ConfigIssue(f"invalid TOML: {msg[:-len(' (at end of document)')]} at the end "
                           "of the file", file=name, line=len(lines),
                           column=len(lines[-1]) + 1)
    return ConfigIssue(f"invalid TOML: {msg}", file=name)


# ---------------------------------------------------------------- the loader

class _Loader:
    """One file's validation: every problem is collected, none stops it."""

    def __init__(self, name, locator, base=None):
        self.name = name
        self.loc = locator
        self.base = base        # where a relative hooks file is
        self.issues = []
        self.backends = []      # (path, BackendConfig) of every valid backend

    @property
    def errors(self):
        return sorted((i for i in self.issues if i.severity == "error"),
                      key=lambda i: i.line or 0)

    @property
    def warnings(self):
        return sorted((i for i in self.issues if i.severity == "warning"),
                      key=lambda i: i.line or 0)

    def error(self, path, message, severity="error"):
        self.issues.append(ConfigIssue(message, dotted(path) or None, self.name,
                                       self.loc.line(path), severity=severity))

    def warn(self, path, message):
        self.error(path, message, "warning")

    # -------------------------------------------------------- sections

    def _keys(self, table, path, keys, section):
        """The converted values of ``table``'s known, valid, non-special keys;
        an error for each unknown or invalid one."""
        out = {}
        for key, value in table.items():
            if key not in keys:
                self.error(path + (key,), self._unknown(key, section, path))
                continue
            conv = keys[key]
            if conv is _SPECIAL:
                continue
            try:
                out[key] = conv(value)
            except ConfigError as e:
                self.error(path + (key,), str(e))
        return out

    def _unknown(self, key, section, path):
        """``unknown key "retrys" (did you mean "retries"?)``, or where it belongs."""
        _, keys = _SECTIONS[section]
        norm = key.replace("-", "_").lower()
        msg = f"unknown key {show(key)}"
        if norm in keys and norm != key:
            return f"{msg} (did you mean {show(norm)}?)"
        for other, (where, other_keys) in _SECTIONS.items():
            if other != section and norm in other_keys and not (
                    other == "global" and norm in ("listeners", "pools")):
                if other == "health" and section == "pool":
                    where = f"a health check setting ([{dotted(path + ('health',))}])"
                return f"{msg}: {norm} is {where}"
        if section == "pool" and norm.startswith("health_") and norm[7:] in HEALTH_KEYS:
            return (f"{msg}: the flag --{key.replace('_', '-')} is "
                    f"{norm[7:]} in [{dotted(path + ('health',))}]")
        close = difflib.get_close_matches(norm, keys, n=1, cutoff=0.7)
        if close:
            return f"{msg} (did you mean {show(close[0])}?)"
        return f"{msg} (known: {', '.join(keys)})"

    def _table(self, value, path, what):
        """``value`` if it is a table, else None and an error."""
        if isinstance(value, dict):
            return value
        self.error(path, f"expected {what}, got {show(value)}")
        return None

    def _named_tables(self, data, key, what, example):
        """``data[key]``: a table of named tables (listeners, pools)."""
        path = (key,)
        if key not in data:
            self.error(path, f"no {key}: add at least one {example} table")
            return {}
        tables = self._table(data[key], path, f"a table of {key} ({example})")
        if tables is None:
            return {}
        if not tables:
            self.error(path, f"no {key}: add at least one {example} table")
        out = {}
        for name, value in tables.items():
            sub = self._table(value, (key, name),
                              f"a {what} table ({example.replace('NAME', name)})")
            if sub is None:
                continue
            if not _NAME.match(name):
                self.error((key, name), f"a {what} name is letters, digits, - and _; "
                                        f"got {show(name)}")
            out[name] = sub
        return out

    def config(self, data, resolve):
        g = self._keys(data, (), GLOBAL_KEYS, "global")
        pool_tables = self._named_tables(data, "pools", "pool", "[pools.NAME]")
        pools = {name: self._pool(name, t) for name, t in pool_tables.items()}
        listener_tables = self._named_tables(data, "listeners", "listener",
                                             "[listeners.NAME]")
        listeners = {name: self._listener(name, t, pools)
                     for name, t in listener_tables.items()}
        admin = self._admin(data.get("admin"))
        if admin is not None:
            g["admin"] = admin
            for name, li in listeners.items():
                if (li.host, li.port) == (admin.host, admin.port) and admin.port:
                    self.error(("admin", "bind"), f"{admin.bind} is already the address of "
                                                  f"listener {name}")
        self._check_addresses(listeners)
        hooks = self._hooks(data.get("hooks"))
        if hooks is not None:
            g["hooks"] = hooks
        used = {p for li in listeners.values() for p in li.pools_used()}
        for name in pools:
            if listeners and name not in used and (hooks is None or
                                                   "route" not in hooks.defined):
                self.warn(("pools", name), "not used by any listener")
        if resolve:
            self._resolve(g.get("allow_unresolved", False))
        return Config(listeners=listeners, pools=pools, source=self.name,
                      warnings=tuple(self.warnings),
                      _lines={dotted(p): n for p, n in self.loc.paths().items()}, **g)

    # -------------------------------------------------------- listeners and routes

    def _listener(self, name, table, pools):
        path = ("listeners", name)
        v = self._keys(table, path, LISTENER_KEYS, "listener")
        if "bind" in v:
            v["host"], v["port"] = v.pop("bind")
        if "tls" in table:
            tls = self._listener_tls(path + ("tls",), table["tls"])
            if tls is not None:
                v["tls"] = tls
        if v.get("tls") is not None and table.get("proxy_protocol") is True:
            self.error(path + ("proxy_protocol",), validate.PROXY_WITH_TLS)
        if "proxy_protocol_from" in table and table.get("proxy_protocol", False) is False:
            self.error(path + ("proxy_protocol_from",),
                       validate.PROXY_FROM_ALONE.format("proxy_protocol = true"))
        default = v.get("default_pool")
        if default is not None and default not in pools:
            self.error(path + ("default_pool",), self._no_pool(default, pools))
        routes = []
        if "routes" in table:
            raw = table["routes"]
            if not isinstance(raw, list):
                self.error(path + ("routes",), "expected routes as [[listeners."
                                               f"{name}.routes]] tables, got {show(raw)}")
                raw = []
            for i, route in enumerate(raw):
                r = self._route(path + ("routes", i), route, pools)
                if r is not None:
                    if routes and routes[-1][1].catch_all:
                        self.warn(path + ("routes", i), "never used: route "
                                  f"{routes[-1][0]} before it matches every request")
                    routes.append((i, r))
        if not routes and default is None and "default_pool" not in table:
            self.error(path, "no routes and no default_pool: every request would get 404")
        return ListenerConfig(name=name, routes=tuple(r for _, r in routes), **v)

    def _listener_tls(self, path, raw):
        """``[listeners.NAME.tls]``: certificates (read and checked now) and
        the handshake timeout; None (and errors) when it is not usable."""
        from fastlb.runtime import tls

        table = self._table(raw, path, "a TLS table ([listeners.NAME.tls] with certificates "
                                       '= [{ cert = "a.pem", key = "a.key" }])')
        if table is None:
            return None
        v = self._keys(table, path, TLS_KEYS, "tls")
        ok = len(v) == len(table) - ("certificates" in table)
        raw_certs = table.get("certificates")
        cpath = path + ("certificates",)
        if raw_certs is None:
            self.error(path, 'missing certificates (certificates = [{ cert = "a.pem", '
                             'key = "a.key" }])')
            return None
        if isinstance(raw_certs, dict):
            raw_certs = [raw_certs]
        if not isinstance(raw_certs, list) or not raw_certs:
            self.error(cpath, 'expected an array of certificates ([{ cert = "a.pem", '
                              f'key = "a.key" }}, ...]), got {show(raw_certs)}')
            return None
        certs = []
        seen = {}       # name -> index of the certificate that has it first
        for i, item in enumerate(raw_certs):
            ipath = cpath + (i,)
            item = self._table(item, ipath, 'a certificate ({ cert = "a.pem", key = "a.key" })')
            if item is None:
                ok = False
                continue
            c = self._keys(item, ipath, CERTIFICATE_KEYS, "certificate")
            missing = [k for k in ("cert", "key") if k not in item]
            for k in missing:
                self.error(ipath, f"missing {k} (the {'certificate' if k == 'cert' else 'key'}"
                                  " file, PEM)")
            if missing or len(c) != len(item):
                ok = False
                continue
            try:
                cert = tls.load_certificate(c["cert"], c["key"])
            except tls.CertificateProblem as e:
                self.error(ipath + (e.which,), str(e))
                ok = False
                continue
            soon = tls.expiring(cert)
            if soon:
                self.warn(ipath + ("cert",), soon)
            for name in cert.names:
                j = seen.setdefault(name, i)
                if j != i:
                    self.warn(ipath + ("cert",), f"{name} is a name of certificates[{j}] too: "
                                                 "that one is used for it")
            certs.append(cert)
        if not ok:
            return None
        return TLSConfig(certificates=tuple(certs), **v)

    def _route(self, path, table, pools):
        table = self._table(table, path, "a route table ([[listeners.NAME.routes]])")
        if table is None:
            return None
        v = self._keys(table, path, ROUTE_KEYS, "route")
        ok = len(v) == len(table) - ("headers" in table)
        if "pool" not in table:
            self.error(path, "missing pool (where the route sends requests)")
            ok = False
        elif "pool" in v and v["pool"] not in pools:
            self.error(path + ("pool",), self._no_pool(v["pool"], pools))
        if "path" in table and "path_prefix" in table:
            self.error(path + ("path",), "give path (exact) or path_prefix, not both")
            ok = False
        if v.get("strip_prefix") and "path_prefix" not in table:
            self.error(path + ("strip_prefix",), "strip_prefix needs a path_prefix")
            ok = False
        headers = {}
        if "headers" in table:
            raw = self._table(table["headers"], path + ("headers",),
                              'a table of header names and values ({ "X-Name" = "value" })')
            ok = ok and raw is not None
            for hname, hvalue in (raw or {}).items():
                problem = (validate.header_name_problem(hname)
                           or validate.header_value_problem(hvalue))
                if problem:
                    self.error(path + ("headers", hname), problem)
                    ok = False
                elif hname.lower() in headers:
                    self.error(path + ("headers", hname),
                               f"header {hname} is given twice (names are case-insensitive)")
                    ok = False
                else:
                    headers[hname.lower()] = hvalue.strip()
        if not ok:
            return None
        return RouteConfig(headers=headers, **v)

    def _no_pool(self, name, pools):
        return f"no pool named {show(name)} (pools: {', '.join(pools) or 'none'})"

    def _check_addresses(self, listeners):
        """Two listeners must not claim one address (nor a wildcard and an
        address of its family on the same port)."""
        seen = []
        for name, li in listeners.items():
            if li.port == 0:
                continue
            for other, oli in seen:
                if oli.port == li.port and _overlap(oli.host, li.host):
                    where = self.loc.line(("listeners", other, "bind"))
                    at = f" ({self.name}:{where})" if where else ""
                    if oli.host == li.host:
                        msg = f"{li.bind} is already the address of listeners.{other}{at}"
                    else:
                        msg = (f"{li.bind} overlaps listeners.{other}'s {oli.bind}{at}: "
                               "a wildcard address takes the port on every address")
                    self.error(("listeners", name, "bind"), msg)
                    break
            seen.append((name, li))

    # -------------------------------------------------------- pools and backends

    def _pool(self, name, table):
        path = ("pools", name)
        v = self._keys(table, path, POOL_KEYS, "pool")
        if (v.get("hash_key", "ip") != "ip" or v.get("hash_balance_factor")) \
                and v.get("algorithm", "round-robin") not in HASHED:
            key = "hash_key" if "hash_key" in v else "hash_balance_factor"
            self.warn(path + (key,), f"only used by {', '.join(sorted(HASHED))}; algorithm "
                                     f"{v.get('algorithm', 'round-robin')} ignores it")
        discovery = self._discovery(path, table.get("discovery"))
        backends = self._backends(path, table, discovery is not None or "discovery" in table)
        health = self._health(path, table.get("health"))
        tls = self._backend_tls(path, table.get("tls"))
        if "tls" in table and backends and discovery is None and not any(
                b.scheme == "https" for b in backends):
            self.warn(path + ("tls",), "only used by https:// backends; this pool has none")
        if health.send_proxy_protocol and "send_proxy_protocol" not in table:
            self.error(path + ("health", "send_proxy_protocol"),
                       validate.HEALTH_PROXY_ALONE.format("the pool's send_proxy_protocol"))
        return PoolConfig(name=name, backends=backends, health=health, discovery=discovery,
                          tls=tls, **v)

    def _backend_tls(self, pool_path, raw):
        """``[pools.NAME.tls]``: verify, ca_file (read and checked now), server_name."""
        from fastlb.runtime import tls

        if raw is None:
            return BackendTLSConfig()
        path = pool_path + ("tls",)
        table = self._table(raw, path, "a TLS table ([pools.NAME.tls])")
        if table is None:
            return BackendTLSConfig()
        v = self._keys(table, path, BACKEND_TLS_KEYS, "backend tls")
        ok = len(v) == len(table)
        if "ca_file" in v:
            if v.get("verify", True) is False:
                self.warn(path + ("ca_file",), "not used: verify = false checks no certificate")
            try:
                v["ca_pem"] = tls.load_ca(v["ca_file"])
            except tls.CertificateProblem as e:
                self.error(path + ("ca_file",), str(e))
                ok = False
        return BackendTLSConfig(**v) if ok else BackendTLSConfig()

    def _discovery(self, pool_path, raw):
        """``discovery = { dns_srv = ... }`` or ``{ etcd = [...], prefix = ... }``."""
        if raw is None:
            return None
        path = pool_path + ("discovery",)
        table = self._table(raw, path, 'a discovery table (discovery = { dns_srv = "..." } or '
                                       '{ etcd = ["http://..."], prefix = "..." })')
        if table is None:
            return None
        v = self._keys(table, path, DISCOVERY_KEYS, "discovery")
        ok = len(v) == len(table)
        if "dns_srv" in table and "etcd" in table:
            self.error(path, "give dns_srv or etcd, not both")
            return None
        if "dns_srv" in table:
            for key in ("prefix",):
                if key in table:
                    self.error(path + (key,), f"{key} is an etcd setting (with etcd = [...]); "
                                              "dns_srv takes interval and resolver")
                    ok = False
        elif "etcd" in table:
            for key in ("interval", "resolver"):
                if key in table:
                    self.error(path + (key,), f"{key} is a dns_srv setting; etcd is watched "
                                              "(changes apply at once) and takes prefix")
                    ok = False
            if "prefix" not in table:
                self.error(path, "missing prefix (the etcd key prefix of the backends, such "
                                 "as /services/app/)")
                ok = False
            elif "prefix" in v and not v["prefix"].endswith("/"):
                self.warn(path + ("prefix",), f"{show(v['prefix'])} does not end with /: "
                                              "it also matches keys of longer names "
                                              f"({v['prefix']}2/...)")
        else:
            self.error(path, "missing dns_srv or etcd (where the backends are found)")
            return None
        if not ok:
            return None
        return DiscoveryConfig(**v)

    def _backends(self, path, table, discovery=False):
        if "backends" not in table:
            if discovery:
                return ()       # discovery finds them
            self.error(path, "missing backends (a pool needs at least one)")
            return ()
        path += ("backends",)
        raw = table["backends"]
        if not isinstance(raw, list):
            self.error(path, 'expected an array of backends (["http://HOST:PORT", ...]), '
                             f"got {show(raw)}")
            return ()
        if not raw:
            if discovery:
                return ()
            self.error(path, "no backends: a pool needs at least one")
            return ()
        out = []
        seen = {}
        for i, item in enumerate(raw):
            b = self._backend(path + (i,), item)
            if b is None:
                continue
            first = seen.setdefault((b.host, b.port), i)
            if first != i:
                self.error(path + (i,), f"{b.address} is already backends[{first}] of "
                                        "this pool")
                continue
            out.append(b)
            self.backends.append((path + (i,), b))
        if out and len(out) == len(raw) and not any(b.weight for b in out):
            self.warn(path, "every backend has weight 0: the pool never chooses one")
        return tuple(out)

    def _backend(self, path, item):
        weight = 1
        if isinstance(item, dict):
            v = self._keys(item, path, BACKEND_KEYS, "backend")
            if "url" not in item:
                self.error(path, "missing url (http://HOST:PORT)")
                return None
            if len(v) != len(item):
                return None
            url = v["url"]
            weight = v.get("weight", 1)
            upath = path + ("url",)
        elif isinstance(item, str):
            url, upath = item, path
        else:
            self.error(path, 'expected a backend: "http://HOST:PORT" or '
                             f'{{ url = "http://HOST:PORT", weight = N }}, got {show(item)}')
            return None
        try:
            scheme, host, port = validate.backend_endpoint(url)
        except ConfigError as e:
            self.error(upath, f"{show(url)}: {e}")
            return None
        return BackendConfig(url=url, host=host, port=port, weight=weight, scheme=scheme)

    def _admin(self, raw):
        if raw is None:
            return None
        table = self._table(raw, ("admin",), "the admin table ([admin])")
        if table is None:
            return None
        v = self._keys(table, ("admin",), ADMIN_KEYS, "admin")
        if len(v) < len(table):
            return None
        if "bind" in v:
            v["host"], v["port"] = v.pop("bind")
        token = v.get("token_file")
        if token is not None:
            problem = _token_problem(token)
            if problem:
                self.error(("admin", "token_file"), problem)
                return None
        return AdminConfig(**v)

    def _hooks(self, raw):
        """``[hooks] module = "..."``: imported now, so that a module that
        cannot be, or defines no hook, is an error of this file."""
        from fastlb.hooks import configure

        if raw is None:
            return None
        table = self._table(raw, ("hooks",), 'the hooks table ([hooks] module = "myhooks")')
        if table is None:
            return None
        v = self._keys(table, ("hooks",), HOOKS_KEYS, "hooks")
        if len(v) < len(table):
            return None
        if "module" not in v:
            self.error(("hooks",), "missing module (a module name such as myhooks, or a "
                                   "file such as ./myhooks.py)")
            return None
        try:
            return configure(v["module"], self.base)
        except ConfigError as e:
            self.error(("hooks", "module"), str(e))
            return None

    def _health(self, pool_path, raw):
        path = pool_path + ("health",)
        if raw is None:
            return HealthConfig()
        table = self._table(raw, path, "a health check table ([pools.NAME.health])")
        if table is None:
            return HealthConfig()
        v = self._keys(table, path, HEALTH_KEYS, "health")
        if "eject_max" not in v and "eject_base" in v:
            # as the flags do: the longest ejection is never shorter than the first
            v["eject_max"] = max(HealthConfig.eject_max, v["eject_base"])
        problems = HealthConfig.check(v, name=str)
        for field, message in problems:
            self.error(path + (field,), message)
        if problems or len(v) < len(table):
            return HealthConfig()
        return HealthConfig(**v)

    def _resolve(self, allow):
        """Look up every backend host name once, all at once (IP addresses need none)."""
        where = {}
        for path, b in self.backends:
            if not validate.is_ip(b.host):
                where.setdefault((b.host, b.port), []).append((path, b))
        if not where:
            return
        with concurrent.futures.ThreadPoolExecutor(min(_RESOLVERS, len(where))) as ex:
            reasons = list(ex.map(lambda hp: validate.lookup_problem(*hp), where))
        for hp, reason in zip(where, reasons):
            if reason is None:
                continue
            for path, b in where[hp]:
                msg = f"host {show(b.host)} does not resolve ({reason})"
                if allow:
                    self.warn(path, f"{msg}; starting anyway (allow_unresolved = true): it "
                                    "is looked up again for every new connection")
                else:
                    self.error(path, f"{msg} (allow_unresolved = true starts anyway)")


def _overlap(a, b):
    """Whether binding ``a`` and ``b`` on one port conflict."""
    if a == b:
        return True
    wild = {"0.0.0.0": 4, "::": 6}
    fam = {a: (6 if ":" in a else 4), b: (6 if ":" in b else 4)}
    return (a in wild and wild[a] == fam[b]) or (b in wild and wild[b] == fam[a])
