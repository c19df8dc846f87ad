"""The configuration model, the TOML loader and its messages, flags as shorthand,
``fastlb check-config`` and ``fastlb serve --config``."""
import os
import re
import signal
import subprocess
import textwrap

import httpx
import pytest

from fastlb import cli
from fastlb.config import (BackendConfig, Config, ListenerConfig, PoolConfig, RouteConfig,
                           apply_flags, from_flags, load, loads)
from fastlb.config.flags import FLAGS
from fastlb.config.locate import Locator, dotted
from fastlb.errors import ConfigError, ConfigIssue
from fastlb.health import HealthConfig
from fastlb.runtime import build
from helpers import (  # noqa: F401  (fixtures are used by name)
    HOST,
    REPO,
    FastlbProcess,
    active_core,
    backend_loop,
    make_backend,
    run_fastlb,
)

pytestmark = [pytest.mark.timeout(60)]

EXAMPLE = os.path.join(REPO, "examples", "fastlb.toml")
# Host name lookups never leave the machine: with RES_OPTIONS=attempts:0 the C
# resolver sends no query (names in /etc/hosts such as localhost still resolve).
LOCAL_DNS = dict(os.environ, RES_OPTIONS="attempts:0")

MINIMAL = """\
[listeners.web]
default_pool = "app"
[pools.app]
backends = ["http://127.0.0.1:9001"]
"""


def errors_of(text, name="fastlb.toml"):
    """The lines of every error ``loads`` reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        loads(textwrap.dedent(text), name, resolve=False)
    assert str(info.value) == "\n".join(str(e) for e in info.value.errors)
    return [str(e) for e in info.value.errors]


def serve_args(*argv):
    return cli.build_parser().parse_args(["serve", *argv])


# ---------------------------------------------------------------- good files

def test_example_loads_to_the_expected_model():
    c = load(EXAMPLE)
    api = RouteConfig(pool="api", host="api.example.com", path_prefix="/v1/",
                      strip_prefix=True)
    canary = RouteConfig(pool="canary", host="*.example.com", headers={"x-canary": "1"})
    status = RouteConfig(pool="api", path="/status")
    expected = Config(
        access_log="-", access_log_format="json", via=True, log_level="info", drain_timeout=30.0,
        allow_unresolved=False,
        listeners={
            "web": ListenerConfig(
                name="web", host="127.0.0.1", port=8080, default_pool="app",
                header_timeout=10.0, keepalive_timeout=75.0, max_header_size=65536,
                body_timeout=60.0, body_min_rate=500.0, upgrade=True, tunnel_timeout=3600.0,
                trusted_proxies=("10.0.0.0/8",), routes=(api, canary, status)),
            "internal": ListenerConfig(
                name="internal", host="127.0.0.1", port=8081, default_pool="api",
                header_timeout=5.0, max_header_size=16384),
        },
        pools={
            "app": PoolConfig(
                name="app", algorithm="weighted-round-robin",
                backends=(BackendConfig("http://127.0.0.1:9001", "127.0.0.1", 9001, 1),
                          BackendConfig("http://127.0.0.1:9002", "127.0.0.1", 9002, 1)),
                connect_timeout=5.0, response_timeout=60.0, retries=2, retry_timeout=10.0,
                upstream_idle_timeout=60.0, upstream_max_idle=64, max_interim=10,
                health=HealthConfig(path="/health", interval=2.0, timeout=1.0, rise=2, fall=3,
                                    expect="200-399", eject_after=3, eject_base=5.0,
                                    eject_max=300.0, eject_5xx=False, slow_start=10.0,
                                    max_ejected_percent=50.0)),
            "api": PoolConfig(
                name="api", algorithm="maglev", hash_key="header:X-User",
                hash_balance_factor=1.25, retries=1,
                backends=(BackendConfig("http://127.0.0.1:9101", "127.0.0.1", 9101, 2),
                          BackendConfig("http://127.0.0.1:9102", "127.0.0.1", 9102, 1)),
                health=HealthConfig(path="/healthz", host="api.internal")),
            "canary": PoolConfig(
                name="canary", retries=0,
                backends=(BackendConfig("http://127.0.0.1:9201", "127.0.0.1", 9201, 1),)),
        },
    )
    assert c == expected
    assert list(c.listeners) == ["web", "internal"]      # file order
    assert list(c.pools) == ["app", "api", "canary"]
    assert c.warnings == ()
    assert c.source == EXAMPLE
    assert c.summary() == "2 listeners, 3 pools, 3 routes, 5 backends"
    # the model keeps the places of its keys
    assert c.where("pools.api.backends") == f"{EXAMPLE}:91"
    assert c.where("listeners.web.routes[1].pool") == f"{EXAMPLE}:43"
    assert c.where("listeners.web.trusted_proxies") == f"{EXAMPLE}:32"
    assert c.where("listeners.internal.keepalive_timeout") == f"{EXAMPLE}:50"   # its table


def test_minimal_file_takes_every_default():
    c = loads(MINIMAL, "m.toml")
    assert c == Config(
        listeners={"web": ListenerConfig(name="web", default_pool="app")},
        pools={"app": PoolConfig(name="app", backends=(
            BackendConfig("http://127.0.0.1:9001", "127.0.0.1", 9001),))})


def test_values_are_normalised():
    c = loads("""\
        [listeners.web]
        bind = "[::1]:0"
        [[listeners.web.routes]]
        host = "API.Example.COM."
        headers = { "X-Tenant" = " blue " }
        pool = "app"
        [[listeners.web.routes]]
        host = "*.Example.com"
        pool = "app"
        [pools.app]
        backends = ["HTTP://LocalHost:9001/", "http://[::1]", "http://127.0.0.1:9003"]
        connect_timeout = 2        # an integer: the model holds a float
        """.replace("        ", ""), "n.toml", resolve=False)
    li = c.listeners["web"]
    assert (li.host, li.port, li.bind) == ("::1", 0, "[::1]:0")
    assert li.routes[0].host == "api.example.com"
    assert li.routes[0].headers == {"x-tenant": "blue"}
    assert li.routes[1].host == "*.example.com"
    assert [(b.host, b.port, b.address) for b in c.pools["app"].backends] == [
        ("localhost", 9001, "localhost:9001"), ("::1", 80, "[::1]:80"),
        ("127.0.0.1", 9003, "127.0.0.1:9003")]
    assert type(c.pools["app"].connect_timeout) is float
    assert c.pools["app"].connect_timeout == 2.0


def test_health_eject_max_follows_eject_base_as_the_flag_does():
    c = loads(MINIMAL + "[pools.app.health]\neject_base = 600\n", resolve=False)
    assert c.pools["app"].health.eject_max == 600.0
    assert from_flags(serve_args("--eject-base", "600")).pools["default"].health == \
        c.pools["app"].health


def test_warnings_do_not_stop_loading():
    c = loads("""\
[listeners.web]
default_pool = "app"
[[listeners.web.routes]]
pool = "app"
[[listeners.web.routes]]
path = "/x"
pool = "app"
[pools.app]
backends = [{ url = "http://127.0.0.1:9001", weight = 0 }]
hash_key = "path"
[pools.spare]
backends = ["http://127.0.0.1:9002"]
""", "w.toml", resolve=False)
    assert [str(w) for w in c.warnings] == [
        "w.toml:5: listeners.web.routes[1]: warning: never used: route 0 before it matches "
        "every request",
        "w.toml:9: pools.app.backends: warning: every backend has weight 0: the pool never "
        "chooses one",
        "w.toml:10: pools.app.hash_key: warning: only used by maglev; algorithm round-robin "
        "ignores it",
        "w.toml:11: pools.spare: warning: not used by any listener",
    ]


# ---------------------------------------------------------------- bad files

@pytest.mark.parametrize("text, expected", [
    # unknown keys, with a hint
    ('acess_log = "-"\n' + MINIMAL,
     ['fastlb.toml:1: acess_log: unknown key "acess_log" (did you mean "access_log"?)']),
    (MINIMAL + "retrys = 2\n",
     ['fastlb.toml:5: pools.app.retrys: unknown key "retrys" (did you mean "retries"?)']),
    (MINIMAL + "connect-timeout = 2\n",
     ['fastlb.toml:5: pools.app.connect-timeout: unknown key "connect-timeout" '
      '(did you mean "connect_timeout"?)']),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\nretries = 1'),
     ['fastlb.toml:3: listeners.web.retries: unknown key "retries": retries is a pool '
      'setting ([pools.NAME])']),
    (MINIMAL + "interval = 2\n",
     ['fastlb.toml:5: pools.app.interval: unknown key "interval": interval is a health '
      'check setting ([pools.app.health])']),
    (MINIMAL + "health_path = \"/h\"\n",
     ['fastlb.toml:5: pools.app.health_path: unknown key "health_path": the flag '
      '--health-path is path in [pools.app.health]']),
    (MINIMAL + "[pools.app.health]\npath = \"/h\"\nintervall = 2\n",
     ['fastlb.toml:7: pools.app.health.intervall: unknown key "intervall" '
      '(did you mean "interval"?)']),
    (MINIMAL + "zzz = 1\n",
     ['fastlb.toml:5: pools.app.zzz: unknown key "zzz" (known: algorithm, hash_key, '
      'hash_balance_factor, backends, connect_timeout, response_timeout, retries, '
      'retry_timeout, upstream_idle_timeout, upstream_max_idle, max_interim, tls, '
      'send_proxy_protocol, health, discovery)']),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = [{ url = "http://127.0.0.1:9001", wieght = 2 }]'),
     ['fastlb.toml:4: pools.app.backends[0].wieght: unknown key "wieght" '
      '(did you mean "weight"?)']),
    # wrong types
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\nbind = 8080'),
     ['fastlb.toml:3: listeners.web.bind: expected a string, got 8080']),
    (MINIMAL + 'retries = "2"\n',
     ['fastlb.toml:5: pools.app.retries: expected an integer, got "2"']),
    (MINIMAL + 'retries = 2.0\n',
     ['fastlb.toml:5: pools.app.retries: expected an integer, got 2.0']),
    ('via = "no"\n' + MINIMAL,
     ['fastlb.toml:1: via: expected true or false, got "no"']),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = "http://127.0.0.1:9001"'),
     ['fastlb.toml:4: pools.app.backends: expected an array of backends '
      '(["http://HOST:PORT", ...]), got "http://127.0.0.1:9001"']),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]', 'backends = [9001]'),
     ['fastlb.toml:4: pools.app.backends[0]: expected a backend: "http://HOST:PORT" or '
      '{ url = "http://HOST:PORT", weight = N }, got 9001']),
    (MINIMAL + "[pools.app.health]\ninterval = \"2s\"\n",
     ['fastlb.toml:6: pools.app.health.interval: expected a number, got "2s"']),
    (MINIMAL + "[pools.app.health]\neject_5xx = 1\n",
     ['fastlb.toml:6: pools.app.health.eject_5xx: expected true or false, got 1']),
    ("listeners = 3\n[pools.app]\nbackends = [\"http://127.0.0.1:1\"]\n",
     ["fastlb.toml:1: listeners: expected a table of listeners ([listeners.NAME]), got 3"]),
    ("[listeners]\nbind = \"127.0.0.1:80\"\n" + MINIMAL.split("\n", 2)[2],
     ['fastlb.toml:2: listeners.bind: expected a listener table ([listeners.bind]), '
      'got "127.0.0.1:80"']),
    (MINIMAL.replace('default_pool = "app"', '[listeners.web.routes]\npool = "app"'),
     ['fastlb.toml:1: listeners.web: no routes and no default_pool: every request would '
      'get 404',
      'fastlb.toml:2: listeners.web.routes: expected routes as [[listeners.web.routes]] '
      'tables, got a table']),
    # out of range
    (MINIMAL + "retries = -1\nconnect_timeout = 0\nupstream_max_idle = 0\n",
     ["fastlb.toml:5: pools.app.retries: must be at least 0, got -1",
      "fastlb.toml:6: pools.app.connect_timeout: must be greater than 0, got 0",
      "fastlb.toml:7: pools.app.upstream_max_idle: must be at least 1, got 0"]),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\nmax_header_size = 0\n'
                     'body_timeout = -1\nbacklog = 0\nkeepalive_timeout = 0'),
     ["fastlb.toml:3: listeners.web.max_header_size: must be at least 1, got 0",
      "fastlb.toml:4: listeners.web.body_timeout: must be at least 0, got -1",
      "fastlb.toml:5: listeners.web.backlog: must be at least 1, got 0",
      "fastlb.toml:6: listeners.web.keepalive_timeout: must be greater than 0, got 0"]),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\ntunnel_timeout = 0\n'
                     'upgrade = "no"\ntrusted_proxies = ["10.0.0.0/8", "10.0.0.1/8"]'),
     ["fastlb.toml:3: listeners.web.tunnel_timeout: must be greater than 0, got 0",
      'fastlb.toml:4: listeners.web.upgrade: expected true or false, got "no"',
      'fastlb.toml:5: listeners.web.trusted_proxies: "10.0.0.1/8" has host bits set (the '
      'network is "10.0.0.0/8")']),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\n'
                     'trusted_proxies = "10.0.0.0/8"'),
     ['fastlb.toml:3: listeners.web.trusted_proxies: expected an array of networks '
      '(["10.0.0.0/8", ...]), got "10.0.0.0/8"']),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\n'
                     'trusted_proxies = ["localhost", 10]'),
     ['fastlb.toml:3: listeners.web.trusted_proxies: "localhost" is not an IP network (such '
      'as "10.0.0.0/8" or "127.0.0.1")']),
    (MINIMAL + "response_timeout = inf\n",
     ["fastlb.toml:5: pools.app.response_timeout: expected a finite number, got inf"]),
    (MINIMAL + "hash_balance_factor = 0.5\nalgorithm = \"maglev\"\n",
     ["fastlb.toml:5: pools.app.hash_balance_factor: must be 0 (off) or at least 1, "
      "got 0.5"]),
    (MINIMAL + 'algorithm = "fastest"\n',
     ['fastlb.toml:5: pools.app.algorithm: expected one of round-robin, '
      'weighted-round-robin, least-conn, p2c, random, maglev, got "fastest"']),
    (MINIMAL + 'hash_key = "header:"\n',
     ["fastlb.toml:5: pools.app.hash_key: expected ip, path, header:NAME, cookie:NAME or "
      "query:NAME"]),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = [{ url = "http://127.0.0.1:9001", weight = 10001 }]'),
     ["fastlb.toml:4: pools.app.backends[0].weight: must be from 0 to 10000, got 10001"]),
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\nbind = "1.2.3.4:99999"'),
     ["fastlb.toml:3: listeners.web.bind: invalid port in '1.2.3.4:99999'; expected "
      "HOST:PORT such as 127.0.0.1:8080 or [::1]:8080"]),
    ('log_level = "loud"\ndrain_timeout = -1\n' + MINIMAL,
     ['fastlb.toml:1: log_level: expected one of debug, info, warning, error, got "loud"',
      "fastlb.toml:2: drain_timeout: must be at least 0, got -1"]),
    (MINIMAL + "[pools.app.health]\ninterval = 1\ntimeout = 2\nrise = 0\n"
               "eject_base = 10\neject_max = 5\nexpect = \"200-\"\npath = \"health\"\n",
     ["fastlb.toml:7: pools.app.health.timeout: must not exceed interval (1), got 2",
      "fastlb.toml:8: pools.app.health.rise: must be at least 1, got 0",
      "fastlb.toml:10: pools.app.health.eject_max: must be at least eject_base (10), got 5",
      'fastlb.toml:11: pools.app.health.expect: "200-": 200- is not a status code, class '
      '(2xx) or range (200-399)',
      'fastlb.toml:12: pools.app.health.path: expected an absolute path such as /healthz '
      '(visible ASCII, no spaces), got "health"']),
    # backends
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = ["ws://127.0.0.1:9001", "http://127.0.0.1:9001/x"]'),
     ['fastlb.toml:4: pools.app.backends[0]: "ws://127.0.0.1:9001": only http:// and '
      'https:// backends are supported',
      'fastlb.toml:4: pools.app.backends[1]: "http://127.0.0.1:9001/x": a backend is host '
      'and port only, no path']),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = ["127.0.0.1:9001", "http://127.0.0.1:0"]'),
     ['fastlb.toml:4: pools.app.backends[0]: "127.0.0.1:9001": no scheme: expected '
      'http://HOST[:PORT] or https://HOST[:PORT]',
      'fastlb.toml:4: pools.app.backends[1]: "http://127.0.0.1:0": port must be from 1 to '
      '65535']),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]', "backends = []"),
     ["fastlb.toml:4: pools.app.backends: no backends: a pool needs at least one"]),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]', 'algorithm = "p2c"'),
     ["fastlb.toml:3: pools.app: missing backends (a pool needs at least one)"]),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]',
                     'backends = [\n  "http://127.0.0.1:9001",\n  "http://localhost:9002",\n'
                     '  { url = "HTTP://127.0.0.1:9001", weight = 3 },\n]'),
     ["fastlb.toml:7: pools.app.backends[2]: 127.0.0.1:9001 is already backends[0] of "
      "this pool"]),
    (MINIMAL.replace('backends = ["http://127.0.0.1:9001"]', "backends = [{ weight = 2 }]"),
     ["fastlb.toml:4: pools.app.backends[0]: missing url (http://HOST:PORT)"]),
    # references
    (MINIMAL.replace('default_pool = "app"', 'default_pool = "ap"'),
     ['fastlb.toml:2: listeners.web.default_pool: no pool named "ap" (pools: app)']),
    ("""\
[listeners.web]
default_pool = "app"
[[listeners.web.routes]]
path_prefix = "/v1/"
pool = "api"
[[listeners.web.routes]]
host = "api.example.com"
pool = "apii"
[pools.app]
backends = ["http://127.0.0.1:9001"]
[pools.api]
backends = ["http://127.0.0.1:9002"]
""", ['fastlb.toml:8: listeners.web.routes[1].pool: no pool named "apii" (pools: app, api)']),
    ("[listeners.web]\nbind = \"127.0.0.1:1\"\n" + MINIMAL.split("\n", 2)[2],
     ["fastlb.toml:1: listeners.web: no routes and no default_pool: every request would "
      "get 404"]),
    ("[pools.app]\nbackends = [\"http://127.0.0.1:1\"]\n",
     ["fastlb.toml: listeners: no listeners: add at least one [listeners.NAME] table"]),
    ("[listeners.web]\ndefault_pool = \"app\"\n",
     ["fastlb.toml: pools: no pools: add at least one [pools.NAME] table",
      'fastlb.toml:2: listeners.web.default_pool: no pool named "app" (pools: none)']),
    # routes
    (MINIMAL + """\
[[listeners.web.routes]]
path = "/a"
path_prefix = "/a/"
pool = "app"
[[listeners.web.routes]]
strip_prefix = true
pool = "app"
[[listeners.web.routes]]
host = "api.example.com:443"
headers = { "Bad Name" = "x", "X-Ok" = "a\\nb" }
[[listeners.web.routes]]
host = "exa mple.com"
path = "v1"
pool = "app"
""", ["fastlb.toml:6: listeners.web.routes[0].path: give path (exact) or path_prefix, "
      "not both",
      "fastlb.toml:10: listeners.web.routes[1].strip_prefix: strip_prefix needs a "
      "path_prefix",
      "fastlb.toml:12: listeners.web.routes[2]: missing pool (where the route sends "
      "requests)",
      'fastlb.toml:13: listeners.web.routes[2].host: "api.example.com:443": a route host has '
      "no port (the port of the request's Host header is ignored when routing)",
      'fastlb.toml:14: listeners.web.routes[2].headers."Bad Name": "Bad Name" is not a '
      "header name (letters, digits and !#$%&'*+-.^_`|~)",
      'fastlb.toml:14: listeners.web.routes[2].headers.X-Ok: "a\\nb": a header value has no '
      "control characters (CR, LF, NUL)",
      'fastlb.toml:16: listeners.web.routes[3].host: "exa mple.com" is not a host name; '
      "expected a name such as api.example.com or a wildcard such as *.example.com",
      'fastlb.toml:17: listeners.web.routes[3].path: expected a path starting with / '
      '(visible ASCII, no spaces), got "v1"']),
    # names
    ('[listeners."my web"]\ndefault_pool = "app"\n' + MINIMAL.split("\n", 2)[2],
     ['fastlb.toml:1: listeners."my web": a listener name is letters, digits, - and _; '
      'got "my web"']),
], ids=["typo-global", "typo-pool", "flag-spelling", "listener-key-in-pool-place",
        "health-key-in-pool", "health-flag-in-pool", "typo-health", "no-close-match",
        "typo-backend", "bind-int", "retries-string", "retries-float", "via-string",
        "backends-string", "backend-int", "health-string", "eject5xx-int",
        "listeners-not-table", "listener-not-table", "routes-table", "ranges",
        "listener-ranges", "tunnel-and-trust", "trusted-not-array", "trusted-name", "inf",
        "balance-factor", "algorithm", "hash-key", "weight", "bind-port", "globals",
        "health-ranges", "backend-urls", "backend-scheme-port", "empty-pool", "missing-backends",
        "duplicate-backend", "backend-no-url", "default-pool-missing", "route-pool-missing",
        "nowhere-to-go", "no-listeners", "no-pools", "routes", "names"])
def test_bad_file_errors(text, expected):
    assert errors_of(text) == expected


def test_every_error_at_once():
    text = """\
acess_log = "-"
[listeners.web]
bind = "127.0.0.1:8080"
default_pool = "app"
header_timeout = 0
[[listeners.web.routes]]
host = "api.example.com"
pool = "api"
[[listeners.web.routes]]
path_prefix = "/v1/"
pool = "apii"
[listeners.admin]
bind = "127.0.0.1:8080"
default_pool = "app"
[listeners.all]
bind = ":8080"
default_pool = "app"
[pools.app]
backends = ["http://127.0.0.1:9001", "http://127.0.0.1:9001"]
retries = -2
[pools.api]
backends = []
[pools.api.health]
rise = 0
"""
    assert errors_of(text, "many.toml") == [
        'many.toml:1: acess_log: unknown key "acess_log" (did you mean "access_log"?)',
        "many.toml:5: listeners.web.header_timeout: must be greater than 0, got 0",
        'many.toml:11: listeners.web.routes[1].pool: no pool named "apii" (pools: app, api)',
        "many.toml:13: listeners.admin.bind: 127.0.0.1:8080 is already the address of "
        "listeners.web (many.toml:3)",
        "many.toml:16: listeners.all.bind: 0.0.0.0:8080 overlaps listeners.web's "
        "127.0.0.1:8080 (many.toml:3): a wildcard address takes the port on every address",
        "many.toml:19: pools.app.backends[1]: 127.0.0.1:9001 is already backends[0] of "
        "this pool",
        "many.toml:20: pools.app.retries: must be at least 0, got -2",
        "many.toml:22: pools.api.backends: no backends: a pool needs at least one",
        "many.toml:24: pools.api.health.rise: must be at least 1, got 0",
    ]


def test_listeners_on_other_addresses_do_not_clash():
    text = "".join(f'[listeners.l{i}]\nbind = "{b}"\ndefault_pool = "app"\n' for i, b in
                   enumerate(["127.0.0.1:8080", "127.0.0.2:8080", "127.0.0.1:8081",
                              "[::]:8080", "127.0.0.1:0", "127.0.0.1:0"]))
    c = loads(text + MINIMAL.split("\n", 2)[2], resolve=False)
    assert len(c.listeners) == 6


@pytest.mark.parametrize("text, expected", [
    ("a = [1,\nb = 2\n", "fastlb.toml:2:1: invalid TOML: Invalid value"),
    ("[listeners.web]\nbind = \"x\"\nbind = \"y\"\n",
     "fastlb.toml:3:11: invalid TOML: Cannot overwrite a value"),
    ("[pools.app\nbackends = []\n",
     "fastlb.toml:1:11: invalid TOML: Expected ']' at the end of a table declaration"),
    ('x = "abc', "fastlb.toml:1:9: invalid TOML: Unterminated string at the end of the file"),
], ids=["bad-value", "duplicate-key", "unclosed-header", "unterminated"])
def test_syntax_errors_are_reported_where_tomllib_says(text, expected):
    assert errors_of(text) == [expected]


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert [str(e) for e in info.value.errors] == [
        f"{missing}: cannot read: No such file or directory"]
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# ok\nx = \"caf\xe9\"\n")
    with pytest.raises(ConfigError) as info:
        load(latin)
    assert [str(e) for e in info.value.errors] == [f"{latin}:2: not UTF-8 text"]


# ---------------------------------------------------------------- the locator

def test_locator_lines():
    text = """\
# comment [not.a.table] "x = 1"
top = 1
"quoted.key" = 'v'
dotted.a.b = \"\"\"
multi "line" \\\"\"\"
string\"\"\"
[tbl]   # [[fake]]
k = [
  1, # ]
  { x = 1, 'y' = [2,
      3] },
]
lit = '''
'''
[[arr]]
n = 0
[[arr.sub]]
m = 0
[[arr.sub]]
m = 1
[[arr]]
n = 1
[[arr.sub]]
m = 2
[arr.sub.deep]
z = 1
[ "sp ace" . 'x' ]
after = true
"""
    loc = Locator(text)
    want = {
        ("top",): 2, ("quoted.key",): 3, ("dotted",): 4, ("dotted", "a", "b"): 4,
        ("tbl",): 7, ("tbl", "k"): 8, ("tbl", "k", 0): 9, ("tbl", "k", 1): 10,
        ("tbl", "k", 1, "x"): 10, ("tbl", "k", 1, "y"): 10, ("tbl", "k", 1, "y", 1): 11,
        ("tbl", "lit"): 13,
        ("arr",): 15, ("arr", 0): 15, ("arr", 0, "n"): 16, ("arr", 0, "sub", 0): 17,
        ("arr", 0, "sub", 1, "m"): 20, ("arr", 1): 21, ("arr", 1, "n"): 22,
        ("arr", 1, "sub", 0): 23, ("arr", 1, "sub", 0, "m"): 24,
        ("arr", 1, "sub", 0, "deep", "z"): 26, ("sp ace", "x", "after"): 28,
    }
    assert {p: loc.exact(p) for p in want} == want
    # a key that is not there falls back to its table
    assert loc.line(("arr", 1, "sub", 0, "missing")) == 23
    assert loc.line(("nothing",)) is None
    assert dotted(("listeners", "web", "routes", 1, "pool")) == "listeners.web.routes[1].pool"
    assert dotted(("a", "b.c", 0)) == 'a."b.c"[0]'


def test_locator_never_fails_on_what_it_does_not_know():
    loc = Locator("a = 1\n\x00garbage [[[\n")      # not TOML: tomllib would refuse it
    assert loc.exact(("a",)) == 1


# ---------------------------------------------------------------- routes

def test_route_reference_semantics():
    r = RouteConfig(pool="p", host="*.example.com", path_prefix="/v1/", strip_prefix=True,
                    headers={"x-env": "blue"})
    h = {"x-env": "blue"}
    assert r.matches("a.example.com", "/v1/users", h)
    assert r.matches("A.B.Example.COM:8443", "/v1/", h)
    assert not r.matches("example.com", "/v1/users", h)
    assert not r.matches("aexample.com", "/v1/users", h)
    assert not r.matches("a.example.com", "/v2/users", h)
    assert not r.matches("a.example.com", "/v1/users", {"x-env": "Blue"})
    assert not r.matches("a.example.com", "/v1/users", {})
    assert r.forwarded_path("/v1/users") == "/users"
    assert r.forwarded_path("/v1/") == "/"
    exact = RouteConfig(pool="p", host="api.example.com", path="/status")
    assert exact.matches("API.example.com", "/status")
    assert exact.matches("[::1]", "/status") is False
    assert not exact.matches("api.example.com", "/status/")
    assert RouteConfig(pool="p", host="::1").matches("[::1]:80", "/")
    assert RouteConfig(pool="p").catch_all and not exact.catch_all
    assert RouteConfig(pool="p", path_prefix="/v1", strip_prefix=True).forwarded_path(
        "/v1/users") == "/users"


# ---------------------------------------------------------------- flags

def test_every_serve_flag_has_a_place_in_the_model():
    serve = cli.build_parser().subcommands["serve"]
    dests = {a.dest for a in serve._actions if a.option_strings and a.dest != "help"}
    process = {"config", "pid_file", "demo_backends"}   # the process, not the configuration
    process |= {"admin", "admin_token_file"}    # Config.admin, set by cli._with_admin
    assert dests - {f.dest for f in FLAGS} == process
    assert {f.dest for f in FLAGS if f.dest in dests} == dests - process


def test_flag_defaults_are_the_model_defaults():
    c = from_flags(serve_args())
    assert c == Config(listeners={"default": ListenerConfig(name="default",
                                                            default_pool="default")},
                       pools={"default": PoolConfig(name="default")})


FLAG_SET = [
    "--listen", "127.0.0.1:9000", "--backend", "http://127.0.0.1:9001",
    "--backend", "http://127.0.0.1:9002,weight=3", "--algorithm", "maglev",
    "--hash-key", "cookie:sid", "--hash-balance-factor", "1.5",
    "--connect-timeout", "1.5", "--response-timeout", "20", "--header-timeout", "4",
    "--keepalive-timeout", "30", "--upstream-idle-timeout", "15", "--upstream-max-idle", "8",
    "--max-header-size", "8192", "--retries", "1", "--retry-timeout", "3",
    "--max-interim", "2", "--body-timeout", "9", "--body-min-rate", "100",
    "--drain-timeout", "7", "--health-path", "/hz", "--health-interval", "3",
    "--health-timeout", "1", "--health-rise", "4", "--health-fall", "5",
    "--health-expect", "2xx", "--health-host", "h.internal", "--slow-start", "6",
    "--eject-after", "2", "--eject-base", "4", "--eject-max", "40", "--eject-5xx",
    "--max-ejected-percent", "50", "--access-log", "-", "--no-via", "--log-level", "debug",
    "--allow-unresolved", "--access-log-format", "json", "--no-upgrade", "--tunnel-timeout", "120",
    "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "127.0.0.1",
    "--proxy-protocol", "--proxy-protocol-from", "10.0.0.0/8", "--proxy-protocol-from", "::1",
    "--send-proxy-protocol", "v2", "--health-send-proxy-protocol",
]
FLAG_SET_FILE = """\
access_log = "-"
access_log_format = "json"
via = false
log_level = "debug"
drain_timeout = 7
allow_unresolved = true
[listeners.default]
bind = "127.0.0.1:9000"
default_pool = "default"
header_timeout = 4
keepalive_timeout = 30
max_header_size = 8192
body_timeout = 9
body_min_rate = 100
upgrade = false
tunnel_timeout = 120
trusted_proxies = ["10.0.0.0/8", "127.0.0.1/32"]
proxy_protocol = true
proxy_protocol_from = ["10.0.0.0/8", "::1/128"]
[pools.default]
backends = ["http://127.0.0.1:9001", { url = "http://127.0.0.1:9002", weight = 3 }]
algorithm = "maglev"
hash_key = "cookie:sid"
hash_balance_factor = 1.5
connect_timeout = 1.5
response_timeout = 20
upstream_idle_timeout = 15
upstream_max_idle = 8
retries = 1
retry_timeout = 3
max_interim = 2
send_proxy_protocol = "v2"
[pools.default.health]
path = "/hz"
interval = 3
timeout = 1
rise = 4
fall = 5
expect = "2xx"
host = "h.internal"
slow_start = 6
eject_after = 2
eject_base = 4
eject_max = 40
eject_5xx = true
max_ejected_percent = 50
send_proxy_protocol = true
"""


@pytest.mark.parametrize("argv, text", [
    (["--backend", "http://127.0.0.1:9001"],
     '[listeners.default]\ndefault_pool = "default"\n'
     '[pools.default]\nbackends = ["http://127.0.0.1:9001"]\n'),
    (FLAG_SET, FLAG_SET_FILE),
], ids=["defaults", "every-flag"])
def test_flags_build_the_model_of_the_equivalent_file(argv, text):
    args = serve_args(*argv)
    from_file = loads(text, "eq.toml", resolve=False)
    assert from_flags(args) == from_file
    # and the model runs as serve always ran those flags
    specs = [cli.parse_backend_spec(b) for b in args.backend]
    as_run = build.as_config(cli.options_from_args(
        args, [s[0] for s in specs], [s[1] for s in specs]))
    assert (as_run.listeners, as_run.pools) == (from_file.listeners, from_file.pools)


def test_trusted_networks_are_normalised_once_each():
    c = loads(MINIMAL.replace('default_pool = "app"', 'default_pool = "app"\n'
                              'trusted_proxies = ["127.0.0.1", "::1", "10.0.0.0/8", '
                              '"127.0.0.1/32"]'), resolve=False)
    assert c.listeners["web"].trusted_proxies == ("127.0.0.1/32", "::1/128", "10.0.0.0/8")


def test_bad_trusted_proxy_flag_is_a_usage_error():
    r = run_fastlb("serve", "--backend", "http://127.0.0.1:9", "--trusted-proxy", "10.0.0.0/33")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        'fastlb: error: --trusted-proxy: "10.0.0.0/33" is not an IP network (such as '
        '"10.0.0.0/8" or "127.0.0.1")')
    with pytest.raises(ConfigError) as info:
        from_flags(serve_args("--backend", "http://127.0.0.1:9", "--trusted-proxy", "x"))
    assert [str(e) for e in info.value.errors] == [
        '--trusted-proxy: "x" is not an IP network (such as "10.0.0.0/8" or "127.0.0.1")']


def test_from_flags_reports_every_bad_flag():
    with pytest.raises(ConfigError) as info:
        from_flags(serve_args("--listen", "x:y", "--backend", "ftp://h", "--hash-key", "foo",
                              "--hash-balance-factor", "0.5", "--health-path", "nope"))
    assert [str(e) for e in info.value.errors] == [
        "--listen: invalid port in 'x:y'",
        "--backend ftp://h: only http:// and https:// backends are supported",
        "--hash-key 'foo': expected ip, path, header:NAME, cookie:NAME or query:NAME",
        "--hash-balance-factor: must be 0 (off) or at least 1, got 0.5",
        '--health-path: expected an absolute path such as /healthz (visible ASCII, no '
        'spaces), got "nope"',
    ]


def test_global_flags_override_the_file_and_say_so():
    c = loads('access_log = "off"\n' + MINIMAL, "f.toml", resolve=False)
    argv = ["--config", "f.toml", "--access-log", "-", "--no-via", "--log-level", "info"]
    given = cli.given_flags(cli.build_parser(), ["serve", *argv], "serve")
    assert given == {"config", "access_log", "via", "log_level"}
    merged, overrides = apply_flags(c, serve_args(*argv), given)
    assert (merged.access_log, merged.via, merged.log_level) == ("-", False, "info")
    assert merged.listeners == c.listeners and merged.pools == c.pools
    assert [str(o) for o in overrides] == [
        '--access-log - overrides access_log = "off" (f.toml:1)',
        "--no-via overrides f.toml's default via = true",
        "--log-level info overrides f.toml's default log_level = \"info\"",
    ]
    # a flag left out (even at a non-default value in the file) changes nothing
    assert apply_flags(c, serve_args("--config", "f.toml"), {"config"}) == (c, [])


def test_listener_and_pool_flags_cannot_be_combined_with_a_file():
    c = loads(MINIMAL, "f.toml", resolve=False)
    argv = ["--config", "f.toml", "--backend", "http://127.0.0.1:1", "--retries", "0",
            "--listen", ":1", "--health-path", "/h"]
    given = cli.given_flags(cli.build_parser(), ["serve", *argv], "serve")
    with pytest.raises(ConfigError) as info:
        apply_flags(c, serve_args(*argv), given)
    assert [str(e) for e in info.value.errors] == [
        "--listen: cannot be combined with --config: it is bind in the file's "
        "[listeners.NAME] tables (f.toml)",
        "--backend: cannot be combined with --config: it is backends in the file's "
        "[pools.NAME] tables (f.toml)",
        "--retries: cannot be combined with --config: it is retries in the file's "
        "[pools.NAME] tables (f.toml)",
        "--health-path: cannot be combined with --config: it is path in the file's "
        "[pools.NAME.health] tables (f.toml)",
    ]


def test_given_flags_sees_flags_typed_at_their_default_value():
    parser = cli.build_parser()
    assert cli.given_flags(parser, ["serve", "--retries", "2", "--access-log", "off",
                                    "--drain", "30"],    # an abbreviation, as argparse takes
                           "serve") == {"retries", "access_log", "drain_timeout"}
    assert cli.given_flags(parser, ["serve"], "serve") == set()


def test_issue_format():
    assert str(ConfigIssue("m", "a.b", "f.toml", 3)) == "f.toml:3: a.b: m"
    assert str(ConfigIssue("m", None, "f.toml", 3, 7)) == "f.toml:3:7: m"
    assert str(ConfigIssue("m", "--x")) == "--x: m"
    assert str(ConfigIssue("m", "a", "f", None, severity="warning")) == "f: a: warning: m"
    assert ConfigError("plain").errors == [ConfigIssue("plain")]


# ---------------------------------------------------------------- the command line

BAD_FILE = """\
[listeners.web]
bind = "127.0.0.1:8080"
default_pool = "app"
[[listeners.web.routes]]
path_prefix = "/v1/"
pool = "apii"
[pools.app]
backends = ["http://127.0.0.1:9001", "http://nonexistent.invalid:9002"]
retries = -1
"""


def test_check_config_accepts_the_example():
    p = run_fastlb("check-config", "examples/fastlb.toml", env=LOCAL_DNS)
    assert (p.returncode, p.stdout, p.stderr) == (
        0, "examples/fastlb.toml: OK (2 listeners, 3 pools, 3 routes, 5 backends)\n", "")


def test_check_config_prints_every_error(tmp_path):
    path = tmp_path / "fastlb.toml"
    path.write_text(BAD_FILE)
    p = run_fastlb("check-config", str(path), env=LOCAL_DNS)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr == ""
    lines = p.stdout.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == \
        f'{path}:6: listeners.web.routes[0].pool: no pool named "apii" (pools: app)'
    # the reason for a failed lookup is the resolver's
    assert re.fullmatch(
        re.escape(f'{path}:8: pools.app.backends[1]: host "nonexistent.invalid" does not '
                  'resolve (') + r"[^()]+" + re.escape(") (allow_unresolved = true starts "
                                                       "anyway)"), lines[1]), lines
    assert lines[2] == f"{path}:9: pools.app.retries: must be at least 0, got -1"


def test_check_config_allow_unresolved_is_a_warning(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("allow_unresolved = true\n" + MINIMAL.replace(
        '"http://127.0.0.1:9001"', '"http://127.0.0.1:9001", "http://nonexistent.invalid"'))
    p = run_fastlb("check-config", str(path), env=LOCAL_DNS)
    assert p.returncode == 0, (p.stdout, p.stderr)
    warning, ok = p.stdout.splitlines()
    assert re.fullmatch(re.escape(f'{path}:5: pools.app.backends[1]: warning: host '
                                  '"nonexistent.invalid" does not resolve (') + r"[^()]+"
                        + re.escape("); starting anyway (allow_unresolved = true): it is "
                                    "looked up again for every new connection"), warning)
    assert ok == f"{path}: OK (1 listener, 1 pool, 0 routes, 2 backends)"


def test_check_config_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "syn.toml"
    path.write_text("[pools.app]\nbackends = [\n")
    p = run_fastlb("check-config", str(path))
    assert (p.returncode, p.stdout) == (
        1, f"{path}:3:1: invalid TOML: Invalid value at the end of the file\n")
    p = run_fastlb("check-config", str(tmp_path / "none.toml"))
    assert (p.returncode, p.stdout) == (
        1, f"{tmp_path / 'none.toml'}: cannot read: No such file or directory\n")
    p = run_fastlb("check-config")
    assert p.returncode == 2 and "FILE" in p.stderr


def test_serve_refuses_an_invalid_file(tmp_path):
    path = tmp_path / "fastlb.toml"
    path.write_text(BAD_FILE.replace("nonexistent.invalid", "127.0.0.1"))
    p = run_fastlb("serve", "--config", str(path), timeout=15)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        f'fastlb: error: {path}:6: listeners.web.routes[0].pool: no pool named "apii" '
        "(pools: app)",
        f"fastlb: error: {path}:9: pools.app.retries: must be at least 0, got -1"]


def test_serve_config_with_a_pool_flag_is_an_error(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text(MINIMAL)
    p = run_fastlb("serve", "--config", str(path), "--backend", "http://127.0.0.1:1",
                   timeout=15)
    assert (p.returncode, p.stderr) == (
        2, f"fastlb: error: --backend: cannot be combined with --config: it is backends in "
           f"the file's [pools.NAME] tables ({path})\n")


@pytest.mark.usefixtures("active_core")
def test_serve_config_runs_the_file_with_global_overrides(tmp_path, make_backend):
    a, b = make_backend("A"), make_backend("B")
    path = tmp_path / "lb.toml"
    path.write_text(f"""\
access_log = "off"
via = false
[listeners.front]
bind = "127.0.0.1:0"
default_pool = "two"
[pools.two]
algorithm = "weighted-round-robin"
backends = [{{ url = "http://{HOST}:{a.port}", weight = 3 }}, "http://{HOST}:{b.port}"]
""")
    lb = FastlbProcess(None, "--config", str(path), "--access-log", "-",
                       stdout=subprocess.PIPE)
    try:
        with httpx.Client(timeout=5) as c:
            seen = []
            for i in range(8):
                r = c.get(f"{lb.url}/{i}")
                assert r.status_code == 200
                seen.append(r.headers["x-backend"])
                assert "via" not in {n.lower() for n, _ in r.json()["headers"]}  # the file's
        assert seen == ["A", "A", "B", "A"] * 2     # the weights of the file
        lb.proc.send_signal(signal.SIGTERM)
        assert lb.proc.wait(10) == 0
        log = lb.proc.stdout.read().decode()
    finally:
        lb.kill()
    assert len([ln for ln in log.splitlines() if '"GET /' in ln]) == 8   # the flag's
    startup = lb.startup.decode()
    assert f'fastlb: --access-log - overrides access_log = "off" ({path}:1)' in \
        startup.splitlines(), startup


def test_readme_shows_the_example_and_documents_every_key():
    from fastlb.config.load import (BACKEND_KEYS, BACKEND_TLS_KEYS, CERTIFICATE_KEYS,
                                    GLOBAL_KEYS, HEALTH_KEYS, LISTENER_KEYS, POOL_KEYS,
                                    ROUTE_KEYS, TLS_KEYS)

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Configuration\n"):readme.index("## Balancing\n")]
    with open(EXAMPLE) as f:
        assert "```toml\n" + f.read() + "```\n" in section
    schema = section[section.index("### Schema"):section.index("### Errors")]
    for keys in (GLOBAL_KEYS, LISTENER_KEYS, ROUTE_KEYS, POOL_KEYS, BACKEND_KEYS, HEALTH_KEYS,
                 TLS_KEYS, CERTIFICATE_KEYS, BACKEND_TLS_KEYS):
        for key in keys:
            if key not in ("listeners", "pools", "routes", "health", "url", "weight"):
                assert f"`{key}`" in schema, key
