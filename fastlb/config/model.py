"""The configuration model: what fastlb is told to run, as frozen dataclasses.

A ``Config`` has global settings, listeners and pools. Both come from either
a configuration file (``fastlb.config.load``) or the flags of ``fastlb
serve`` (``fastlb.config.from_flags``: one listener and one pool, both named
``default``); a model built by either has been validated as a whole (every
reference resolves, every value is in range) and is never changed: reload
builds a new one.

::

    Config
      listeners: {name: ListenerConfig}      in file order
        host, port, default_pool, client-side timeouts and limits,
        upgrade and tunnel_timeout (tunnels), trusted_proxies (X-Forwarded-For),
        proxy_protocol and proxy_protocol_from (the PROXY protocol header in)
        tls: TLSConfig or None               TLS termination: certificates (chosen by SNI)
        request_id and request_id_header (None: the global settings')
        routes: (RouteConfig, ...)           first match wins, in file order
          host / path_prefix / path / headers -> pool (+ strip_prefix)
      pools: {name: PoolConfig}              in file order
        algorithm, hash_key, upstream timeouts, retries, send_proxy_protocol
        backends: (BackendConfig, ...)       url, scheme, host, port, weight (priority)
        tls: BackendTLSConfig                for its https:// backends: verify, CA, SNI name
        health: fastlb.health.HealthConfig
        discovery: DiscoveryConfig or None   DNS SRV or etcd: the backends found there
      access_log, via, log_level, drain_timeout, allow_unresolved, workers,
      request_id, request_id_header
      hooks: HooksConfig or None             a Python module of route/select/request_headers

Defaults are those of the flags (and of ``fastlb.server.Options``). The
dicts and tuples are not to be modified: the model is shared as it is.

Routing (``RouteConfig.matches``) is written here as the reference of what a
route means; the data path compiles the routes of a listener into its own
lookup structure at load time and must give the same answers.
"""
import dataclasses
from typing import Optional

from fastlb.errors import ConfigError
from fastlb.health import HealthConfig
from fastlb.validate import format_address

__all__ = ["Config", "ListenerConfig", "RouteConfig", "PoolConfig", "BackendConfig",
           "AdminConfig", "DiscoveryConfig", "TLSConfig", "CertificateConfig",
           "BackendTLSConfig", "HooksConfig", "DEFAULT_NAME"]

DEFAULT_NAME = "default"    # the listener and the pool that the flags describe


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """One backend of a pool: ``http://HOST[:PORT]`` (or ``https://``, spoken
    to in TLS as its pool's ``tls`` says) and its weight."""

    url: str            # as written in the file or flag
    host: str           # lower-cased name or IP address (no brackets)
    port: int
    weight: int = 1     # 0 to 10000; 0: never chosen
    # discovered backends only (DNS SRV priority): the pool uses its lowest
    # group of backends, a higher one only while no backend of the lower is
    # eligible (fastlb.selection.PriorityGate)
    priority: int = 0
    scheme: str = "http"    # "https": TLS to this backend

    @property
    def address(self):
        """``host:port`` (IPv6 in brackets): what identifies it in its pool."""
        return format_address(self.host, self.port)


@dataclasses.dataclass(frozen=True)
class RouteConfig:
    """Where requests that match go. Every condition given must hold; a route
    with no condition matches every request.

    * ``host``: the request's host (``Host`` header, or the authority of an
      absolute-form target) without its port, compared case-insensitively;
      ``*.example.com`` matches any name ending in ``.example.com`` (one label
      or more: ``a.example.com``, ``a.b.example.com``) but not
      ``example.com`` itself. Stored lower-cased.
    * ``path_prefix``: the path starts with this string (a plain string
      prefix: ``/v1`` matches ``/v1x`` too; end it with ``/`` to match whole
      segments). ``path``: the path is exactly this. The path is the target
      up to ``?``, as the client sent it (not decoded).
    * ``headers``: each named header (name case-insensitive, stored
      lower-cased) is present with exactly this value (case-sensitive,
      surrounding whitespace ignored; of repeated fields, the first).
    * ``strip_prefix`` (needs ``path_prefix``): the backend is sent the path
      without the prefix, always starting with ``/`` (``/v1/users`` under
      ``/v1/`` or ``/v1`` goes as ``/users``); the query is kept.
    """

    pool: str
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    path: Optional[str] = None
    headers: dict = dataclasses.field(default_factory=dict)
    strip_prefix: bool = False

    def matches(self, host, path, headers=None):
        """Reference semantics: does a request for ``host`` (as in its Host
        header, port allowed), ``path`` (no query) and ``headers`` (lower-cased
        name -> value) match? Not for the per-request path."""
        if self.host is not None:
            h = (host or "").strip().lower()
            if h.startswith("["):
                h = h[1:h.find("]")] if "]" in h else h
            elif h.count(":") == 1:
                h = h.partition(":")[0]
            h = h.rstrip(".")
            if self.host.startswith("*."):
                if not h.endswith(self.host[1:]) or len(h) <= len(self.host) - 1:
                    return False
            elif h != self.host:
                return False
        if self.path is not None and path != self.path:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        for name, value in self.headers.items():
            got = (headers or {}).get(name)
            if got is None or got.strip() != value:
                return False
        return True

    def forwarded_path(self, path):
        """The path sent to the backend for a matching request path."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.path_prefix):]
        return rest if rest.startswith("/") else "/" + rest

    @property
    def catch_all(self):
        """The route has no condition: it matches every request."""
        return (self.host is None and self.path_prefix is None and self.path is None
                and not self.headers)


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    """A certificate and its private key, read once when the configuration is
    loaded (``fastlb.runtime.tls.load_certificate``): the running process and
    its workers use these very bytes, whatever happens to the files later,
    until a reload reads them again."""

    cert: str                   # the certificate file (PEM, the chain after it), as given
    key: str                    # its private key file (PEM, unencrypted), as given
    names: tuple = ()           # DNS names it is for (SAN DNS names, else its CN), lower-cased;
    #                             "*.example.com": one label under example.com
    not_after: float = 0.0      # it expires then (Unix time)
    cert_pem: bytes = dataclasses.field(default=b"", repr=False)
    key_pem: bytes = dataclasses.field(default=b"", repr=False)


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """TLS termination on a listener (``[listeners.NAME.tls]``): the
    certificate of each handshake is chosen by the name the client asks for
    (SNI), exact names first, then wildcards; the first certificate is the
    default (no SNI, or a name none has)."""

    certificates: tuple = ()        # (CertificateConfig, ...), at least one
    handshake_timeout: float = 10.0  # a TLS handshake not done within this is closed


@dataclasses.dataclass(frozen=True)
class BackendTLSConfig:
    """How a pool speaks TLS to its ``https://`` backends (``[pools.NAME.tls]``)."""

    verify: bool = True             # check the backend's certificate and name
    ca_file: Optional[str] = None   # trust these CAs instead of the system's (PEM file)
    ca_pem: bytes = dataclasses.field(default=b"", repr=False)  # its contents, read at load
    server_name: Optional[str] = None  # SNI and the name checked; None: the backend's host


@dataclasses.dataclass(frozen=True)
class ListenerConfig:
    """An address clients connect to, with its client-side limits and routes.

    A request goes to the pool of the first route that matches it, else to
    ``default_pool``; with no match and no default pool it gets 404.
    """

    name: str
    host: str = "127.0.0.1"
    port: int = 8080
    default_pool: Optional[str] = None
    header_timeout: float = 10.0        # a whole request head within this, else 408
    keepalive_timeout: float = 75.0     # idle client keep-alive connection
    max_header_size: int = 65536        # bytes; larger head -> 431
    body_timeout: float = 60.0          # a request body is due this long after its head...
    body_min_rate: float = 500.0        # ... plus 1 s per this many bytes received (0: none)
    upgrade: bool = True                # Upgrade requests become tunnels (False: 501)
    tunnel_timeout: float = 3600.0      # a tunnel with no byte either way this long is closed
    trusted_proxies: tuple = ()         # CIDR strings: peers whose X-Forwarded-For is believed
    tls: Optional[TLSConfig] = None     # TLS termination; None: plain HTTP
    proxy_protocol: bool = False        # connections start with a PROXY protocol header...
    proxy_protocol_from: tuple = ()     # ... those from these CIDR networks (): from every peer
    request_id: Optional[bool] = None   # request ids on this listener (None: the global setting)
    request_id_header: Optional[str] = None  # their field's name (None: the global setting)
    backlog: int = 1024                 # listen() backlog
    routes: tuple = ()                  # (RouteConfig, ...): first match wins

    @property
    def bind(self):
        """``host:port`` (IPv6 in brackets)."""
        return format_address(self.host, self.port)

    def pools_used(self):
        """Names of the pools this listener sends requests to, in order, once each."""
        names = [r.pool for r in self.routes]
        if self.default_pool is not None:
            names.append(self.default_pool)
        return tuple(dict.fromkeys(names))

    def request_id_field(self, config):
        """The name of this listener's request-id field (its own setting, else
        ``config``'s), or None when its requests get no ids."""
        on = config.request_id if self.request_id is None else self.request_id
        if not on:
            return None
        return config.request_id_header if self.request_id_header is None \
            else self.request_id_header


@dataclasses.dataclass(frozen=True)
class DiscoveryConfig:
    """Where a pool's backends are found (``fastlb.balance.discovery``): DNS
    SRV records (``dns_srv``) or keys under an etcd prefix (``etcd``); one of
    the two. What is found replaces the pool's ``backends`` (then only the
    set it starts with)."""

    dns_srv: Optional[str] = None       # the SRV name, e.g. _http._tcp.app.example
    interval: float = 10.0              # dns_srv: seconds between lookups at most (TTLs
    #                                     shorter than this are followed)
    resolver: Optional[tuple] = None    # dns_srv: (ip, port) of the DNS server; None: the system's
    etcd: tuple = ()                    # etcd endpoints: ("http://127.0.0.1:2379", ...)
    prefix: Optional[str] = None        # etcd: one key per backend under this prefix

    @property
    def kind(self):
        return "dns_srv" if self.dns_srv is not None else "etcd"

    def describe(self):
        """``DNS SRV _http._tcp.app.example`` or ``etcd /services/app/``, for log lines."""
        return f"DNS SRV {self.dns_srv}" if self.dns_srv is not None else f"etcd {self.prefix}"


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Backends that serve alike, how one is chosen, and the upstream settings."""

    name: str
    backends: tuple = ()                # (BackendConfig, ...), at least one (none: with discovery)
    algorithm: str = "round-robin"      # one of fastlb.selection.ALGORITHMS
    hash_key: str = "ip"                # maglev: ip, path, header:NAME, cookie:NAME, query:NAME
    hash_balance_factor: float = 0.0    # maglev: bounded load (0 = off, else >= 1)
    connect_timeout: float = 5.0
    response_timeout: float = 60.0      # upstream silent this long -> 504
    retries: int = 2                    # more backends tried after a failure
    retry_timeout: float = 10.0         # no new try this long after the request arrived
    upstream_idle_timeout: float = 60.0  # idle pooled upstream connection
    upstream_max_idle: int = 64         # idle pooled connections per backend
    max_interim: int = 10               # 1xx responses relayed per request, at most
    tls: BackendTLSConfig = dataclasses.field(default_factory=BackendTLSConfig)  # https:// ones
    send_proxy_protocol: Optional[str] = None   # "v1" or "v2": a PROXY header starts every
    #                                     connection to a backend (each then serves one client)
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)
    discovery: Optional[DiscoveryConfig] = None  # backends found in DNS or etcd


@dataclasses.dataclass(frozen=True)
class AdminConfig:
    """The admin listener: ``/metrics``, ``/status`` and the admin API
    (``fastlb.observe.admin``)."""

    host: str = "127.0.0.1"
    port: int = 9901
    token_file: Optional[str] = None    # the API's bearer token; None: read-only API
    protect_reads: bool = False         # /metrics and /status need the token too

    @property
    def bind(self):
        return format_address(self.host, self.port)


@dataclasses.dataclass(frozen=True)
class HooksConfig:
    """The Python hooks module (``[hooks] module``, ``--hooks``; see
    ``fastlb.hooks``), imported and checked when the configuration was loaded.

    ``loaded`` is that module. It is not compared (a reload imports the
    module again: the data path always runs the new one) and not pickled: a
    worker gets the configuration without it and imports the module itself.
    """

    module: str                         # as written: a module name or a file path
    path: Optional[str] = None          # a file: its absolute path; None: a module name
    defined: tuple = ()                 # the hooks it defines, of route, select, request_headers
    loaded: object = dataclasses.field(default=None, compare=False, repr=False)

    def __str__(self):
        return self.module

    def __getstate__(self):
        state = dict(self.__dict__)
        state["loaded"] = None
        return state


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole configuration: global settings, listeners and pools (see the module)."""

    listeners: dict = dataclasses.field(default_factory=dict)   # name -> ListenerConfig
    pools: dict = dataclasses.field(default_factory=dict)       # name -> PoolConfig
    access_log: str = "off"             # "-", a path, or "off"
    access_log_format: str = "combined"  # a key of fastlb.observe.accesslog.FORMATS: combined, json
    via: bool = True                    # add Via: 1.1 fastlb to forwarded requests
    log_level: str = "info"             # debug, info, warning, error
    drain_timeout: float = 30.0         # SIGTERM/SIGINT: in-flight requests get this long
    allow_unresolved: bool = False      # a backend host that does not resolve: a warning
    workers: int = 1                    # processes serving traffic; 1: no master
    request_id: bool = False            # give requests an id (X-Request-Id): see README
    request_id_header: str = "X-Request-Id"  # the id's field
    admin: Optional[AdminConfig] = None  # the admin listener; None: off
    hooks: Optional[HooksConfig] = None  # Python hooks on the request path; None: none
    # where it came from: the file name as given (None: flags), and the
    # warnings found while loading (fastlb.errors.ConfigIssue)
    source: Optional[str] = dataclasses.field(default=None, compare=False)
    warnings: tuple = dataclasses.field(default=(), compare=False, repr=False)
    _lines: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    # The global settings, in the order of the README's table.
    GLOBAL = ("access_log", "access_log_format", "via", "log_level", "drain_timeout",
              "allow_unresolved", "workers", "request_id", "request_id_header")

    def where(self, path):
        """``FILE:LINE`` of a dotted path (``"listeners.web.bind"``), for
        messages about a setting after loading (e.g. "cannot listen"); the
        line of its table when the key itself is not in the file; None for
        a model built from flags."""
        if self.source is None:
            return None
        line = self._lines.get(path)
        while line is None and path:
            path = path.rpartition(".")[0] if "." in path else ""
            line = self._lines.get(path)
        return f"{self.source}:{line}" if line else self.source

    def counts(self):
        """``(listeners, pools, routes, backends)``."""
        return (len(self.listeners), len(self.pools),
                sum(len(li.routes) for li in self.listeners.values()),
                sum(len(p.backends) for p in self.pools.values()))

    def summary(self):
        """``2 listeners, 3 pools, 5 routes, 6 backends``."""
        words = ("listener", "pool", "route", "backend")
        return ", ".join(f"{n} {w}{'' if n == 1 else 's'}" for n, w in zip(self.counts(), words))
