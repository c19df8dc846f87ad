"""The flags of ``fastlb serve`` as a ``Config``: the shorthand for one listener and one pool.

``from_flags(args)`` builds the model the flags describe: global settings,
one listener and one pool, both named ``default`` (``DEFAULT_NAME``), the
listener sending every request to the pool. It equals the model of the
equivalent file::

    access_log = ...                 # --access-log, --no-via, --log-level, ...
    [listeners.default]
    bind = "127.0.0.1:8080"          # --listen, --header-timeout, ...
    default_pool = "default"
    [pools.default]
    backends = [...]                 # --backend, --algorithm, --retries, ...
    [pools.default.health]           # --health-path, --eject-after, ...

``apply_flags(config, args, given)`` is for ``serve --config FILE`` plus
flags: the global flags given explicitly override the file's settings (the
returned ``Override`` list says which, for the log); a listener, pool or
health flag is an error naming the flag and where the file sets it, since
it would be ambiguous which listener or pool it meant.

``FLAGS`` is the map from every flag to its place in the model.
"""
import dataclasses

from fastlb import validate
from fastlb.config.model import (DEFAULT_NAME, BackendConfig, BackendTLSConfig, Config,
                                 ListenerConfig, PoolConfig, TLSConfig)
from fastlb.errors import ConfigError, ConfigIssue
from fastlb.health import FLAGS as HEALTH_FLAGS
from fastlb.health import HealthConfig

__all__ = ["from_flags", "apply_flags", "Override", "FLAGS", "GLOBAL", "LISTENER", "POOL",
           "HEALTH", "tls_from_flags", "backend_tls_from_flags"]

GLOBAL, LISTENER, POOL, HEALTH = "global", "listener", "pool", "health"


@dataclasses.dataclass(frozen=True)
class Flag:
    dest: str       # argparse's name for it
    flag: str       # as typed
    place: str      # GLOBAL, LISTENER, POOL or HEALTH
    key: str        # the key in its section of the file (HEALTH: [pools.NAME.health])


FLAGS = tuple(Flag(*f) for f in (
    ("access_log", "--access-log", GLOBAL, "access_log"),
    ("access_log_format", "--access-log-format", GLOBAL, "access_log_format"),
    ("via", "--no-via", GLOBAL, "via"),
    ("log_level", "--log-level", GLOBAL, "log_level"),
    ("drain_timeout", "--drain-timeout", GLOBAL, "drain_timeout"),
    ("allow_unresolved", "--allow-unresolved", GLOBAL, "allow_unresolved"),
    ("workers", "--workers", GLOBAL, "workers"),
    ("hooks", "--hooks", GLOBAL, "hooks"),
    ("request_id", "--request-id", GLOBAL, "request_id"),
    ("request_id_header", "--request-id-header", GLOBAL, "request_id_header"),
    ("listen", "--listen", LISTENER, "bind"),
    ("header_timeout", "--header-timeout", LISTENER, "header_timeout"),
    ("keepalive_timeout", "--keepalive-timeout", LISTENER, "keepalive_timeout"),
    ("max_header_size", "--max-header-size", LISTENER, "max_header_size"),
    ("body_timeout", "--body-timeout", LISTENER, "body_timeout"),
    ("body_min_rate", "--body-min-rate", LISTENER, "body_min_rate"),
    ("upgrade", "--no-upgrade", LISTENER, "upgrade"),
    ("tunnel_timeout", "--tunnel-timeout", LISTENER, "tunnel_timeout"),
    ("trusted_proxies", "--trusted-proxy", LISTENER, "trusted_proxies"),
    ("tls_cert", "--tls-cert", LISTENER, "tls.certificates[].cert"),
    ("tls_key", "--tls-key", LISTENER, "tls.certificates[].key"),
    ("tls_handshake_timeout", "--tls-handshake-timeout", LISTENER, "tls.handshake_timeout"),
    ("proxy_protocol", "--proxy-protocol", LISTENER, "proxy_protocol"),
    ("proxy_protocol_from", "--proxy-protocol-from", LISTENER, "proxy_protocol_from"),
    ("backend", "--backend", POOL, "backends"),
    ("algorithm", "--algorithm", POOL, "algorithm"),
    ("hash_key", "--hash-key", POOL, "hash_key"),
    ("hash_balance_factor", "--hash-balance-factor", POOL, "hash_balance_factor"),
    ("connect_timeout", "--connect-timeout", POOL, "connect_timeout"),
    ("response_timeout", "--response-timeout", POOL, "response_timeout"),
    ("retries", "--retries", POOL, "retries"),
    ("retry_timeout", "--retry-timeout", POOL, "retry_timeout"),
    ("upstream_idle_timeout", "--upstream-idle-timeout", POOL, "upstream_idle_timeout"),
    ("upstream_max_idle", "--upstream-max-idle", POOL, "upstream_max_idle"),
    ("max_interim", "--max-interim", POOL, "max_interim"),
    ("backend_ca_file", "--backend-ca-file", POOL, "tls.ca_file"),
    ("backend_server_name", "--backend-server-name", POOL, "tls.server_name"),
    ("backend_verify", "--backend-no-verify", POOL, "tls.verify"),
    ("send_proxy_protocol", "--send-proxy-protocol", POOL, "send_proxy_protocol"),
)) + tuple(Flag(flag[2:].replace("-", "_"), flag, HEALTH, field)
           for field, flag in HEALTH_FLAGS.items())

_BY_DEST = {f.dest: f for f in FLAGS}
_SECTION = {LISTENER: "[listeners.NAME]", POOL: "[pools.NAME]",
            HEALTH: "[pools.NAME.health]"}


@dataclasses.dataclass(frozen=True)
class Override:
    """A flag given with ``--config`` that replaces a global setting of the file."""

    flag: str
    key: str
    value: object       # the flag's
    replaced: object    # the file's (or the default, when the file does not set it)
    source: str         # the file name
    line: object = None  # of the key in the file; None: the file leaves it at its default

    def __str__(self):
        given = "" if isinstance(self.value, bool) else f" {self.value}"
        flag = self.flag
        if self.value is False and not flag.startswith("--no-"):
            flag = "--no-" + flag[2:]       # --request-id given as --no-request-id
        was = f"{self.key} = {validate.show(self.replaced)}"
        if self.line is None:
            return f"{flag}{given} overrides {self.source}'s default {was}"
        return f"{flag}{given} overrides {was} ({self.source}:{self.line})"


def _present(args):
    """The flags this parser has (a flag added elsewhere later is simply absent here)."""
    return [f for f in FLAGS if hasattr(args, f.dest)]


def _global_value(f, value, errors):
    if f.key == "access_log":
        problem = validate.access_log_problem(value)
        if problem:
            errors.append(ConfigIssue(problem, path=f.flag))
    elif f.key == "hooks" and value is not None:
        # imported now, as the file's [hooks] is (a file relative to the working directory)
        from fastlb.hooks import configure

        try:
            return configure(value)
        except ConfigError as e:
            errors.append(ConfigIssue(str(e), path=f.flag))
            return None
    elif f.key == "request_id_header":
        try:
            validate.request_id_header(value)
        except ConfigError as e:
            errors.append(ConfigIssue(str(e), path=f.flag))
    return value


def tls_from_flags(args):
    """The ``TLSConfig`` of ``--tls-cert`` / ``--tls-key`` (pairs, in order)
    and ``--tls-handshake-timeout``, the certificates read and checked; None
    without ``--tls-cert``. Raises ``ConfigError`` naming the flag."""
    import logging

    from fastlb.runtime import tls

    certs = list(getattr(args, "tls_cert", None) or ())
    keys = list(getattr(args, "tls_key", None) or ())
    if not certs and not keys:
        return None
    if len(certs) != len(keys):
        raise ConfigError(errors=[ConfigIssue(
            f"{len(certs)} --tls-cert and {len(keys)} --tls-key: give each certificate its "
            "key (--tls-cert FILE --tls-key FILE, repeated for more)",
            path="--tls-cert" if len(certs) < len(keys) else "--tls-key")])
    out = []
    errors = []
    for cert, key in zip(certs, keys):
        try:
            c = tls.load_certificate(cert, key)
        except tls.CertificateProblem as e:
            errors.append(ConfigIssue(str(e), path=f"--tls-{e.which}"))
            continue
        soon = tls.expiring(c)
        if soon:
            logging.getLogger("fastlb").warning("warning: --tls-cert: %s", soon)
        out.append(c)
    if errors:
        raise ConfigError(errors=errors)
    return TLSConfig(certificates=tuple(out),
                     handshake_timeout=getattr(args, "tls_handshake_timeout", 10.0))


def backend_tls_from_flags(args):
    """The ``BackendTLSConfig`` of ``--backend-ca-file``,
    ``--backend-server-name`` and ``--backend-no-verify``."""
    from fastlb.runtime import tls

    v = {}
    ca = getattr(args, "backend_ca_file", None)
    name = getattr(args, "backend_server_name", None)
    if not getattr(args, "backend_verify", True):
        v["verify"] = False
    if name is not None:
        try:
            v["server_name"] = validate.server_name(name)
        except ConfigError as e:
            raise ConfigError(errors=[ConfigIssue(str(e), path="--backend-server-name")]) \
                from None
    if ca is not None:
        try:
            v["ca_pem"] = tls.load_ca(ca)
        except tls.CertificateProblem as e:
            raise ConfigError(errors=[ConfigIssue(str(e), path="--backend-ca-file")]) from None
        v["ca_file"] = ca
    return BackendTLSConfig(**v)


def from_flags(args):
    """The ``Config`` of the flags in ``args`` (argparse's namespace of ``serve``).

    Raises ``ConfigError`` listing every bad value, each named by its flag.
    """
    from fastlb.cli import backend_scheme, parse_backend_spec, parse_hash_key, parse_listen

    errors = []

    def attempt(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except ConfigError as e:
            errors.extend(e.errors)
            return None

    values = {GLOBAL: {}, LISTENER: {}, POOL: {}, HEALTH: {}}
    for f in _present(args):
        values[f.place][f.key] = getattr(args, f.dest)
    g = {k: _global_value(_BY_DEST[k], v, errors) for k, v in values[GLOBAL].items()}

    li = values[LISTENER]
    p = values[POOL]
    for d in (li, p):
        for k in [k for k in d if k.startswith("tls.")]:
            del d[k]    # read by tls_from_flags / backend_tls_from_flags
    tls = attempt(tls_from_flags, args)
    if tls is not None:
        li["tls"] = tls
    backend_tls = attempt(backend_tls_from_flags, args)
    if backend_tls is not None:
        p["tls"] = backend_tls
    bind = attempt(parse_listen, li.pop("bind", "127.0.0.1:8080"))
    if bind is not None:
        li["host"], li["port"] = bind
    for key, flag in (("trusted_proxies", "--trusted-proxy"),
                      ("proxy_protocol_from", "--proxy-protocol-from")):
        if key in li:
            try:
                li[key] = validate.trusted_networks(tuple(li[key] or ()))
            except ConfigError as e:
                errors.append(ConfigIssue(str(e), path=flag))
                li[key] = ()
    if li.get("tls") is not None and li.get("proxy_protocol"):
        errors.append(ConfigIssue(validate.PROXY_WITH_TLS, path="--proxy-protocol"))
    if li.get("proxy_protocol_from") and not li.get("proxy_protocol"):
        errors.append(ConfigIssue(validate.PROXY_FROM_ALONE.format("--proxy-protocol"),
                                  path="--proxy-protocol-from"))
    listener = ListenerConfig(name=DEFAULT_NAME, default_pool=DEFAULT_NAME, **li)

    backends = []
    for spec in p.pop("backends", None) or ():
        parsed = attempt(parse_backend_spec, spec)
        if parsed is not None:
            (host, port), weight = parsed
            backends.append(BackendConfig(url=spec.partition(",")[0], host=host, port=port,
                                          weight=weight, scheme=backend_scheme(spec)))
    if "hash_key" in p:
        p["hash_key"] = attempt(parse_hash_key, p["hash_key"]) or "ip"
    factor = p.get("hash_balance_factor")
    if factor is not None:
        problem = validate.hash_balance_factor_problem(factor)
        if problem:
            errors.append(ConfigIssue(problem, path="--hash-balance-factor"))
    h = values[HEALTH]
    if "eject_max" in h and "eject_base" in h:
        h["eject_max"] = max(h["eject_max"], h["eject_base"])   # as serve always did
    health = attempt(HealthConfig, **h) or HealthConfig()
    if health.send_proxy_protocol and p.get("send_proxy_protocol") is None:
        errors.append(ConfigIssue(validate.HEALTH_PROXY_ALONE.format("--send-proxy-protocol"),
                                  path="--health-send-proxy-protocol"))
    pool = PoolConfig(name=DEFAULT_NAME, backends=tuple(backends), health=health, **p)
    if errors:
        raise ConfigError(errors=errors)
    return Config(listeners={DEFAULT_NAME: listener}, pools={DEFAULT_NAME: pool}, **g)


def apply_flags(config, args, given):
    """``config`` (from a file) with the global flags in ``given`` (the dests
    of the flags typed on the command line) applied.

    Returns ``(config, overrides)``. Raises ``ConfigError`` naming every
    given flag that cannot be combined with a file (all but the global ones).
    """
    errors = []
    changes = {}
    overrides = []
    source = config.source or "the configuration file"
    for f in _present(args):
        if f.dest not in given:
            continue
        if f.place != GLOBAL:
            section = _SECTION[f.place]
            errors.append(ConfigIssue(
                f"cannot be combined with --config: it is {f.key} in the file's {section} "
                f"tables ({source})", path=f.flag))
            continue
        value = _global_value(f, getattr(args, f.dest), errors)
        changes[f.key] = value
        line = config._lines.get(f.key)
        overrides.append(Override(f.flag, f.key, value, getattr(config, f.key), source, line))
    if errors:
        raise ConfigError(errors=errors)
    return dataclasses.replace(config, **changes), overrides
