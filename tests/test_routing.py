"""Routing: a listener's routes choose the pool, by host, path and headers.

The compiled lookup (fastlb.runtime.routing.Router) is checked against the
reference semantics (RouteConfig.matches) on many generated requests, then
end to end: real listeners, real backends, httpx and raw sockets.
"""
import itertools
import random

import httpx
import pytest

from fastlb import core
from fastlb.config import RouteConfig, loads
from fastlb.runtime.routing import Router, request_host
from helpers import HOST, Reader, raw_connect
from helpers import active_core, backend_loop, make_backend, make_config_lb  # noqa: F401


class _P:
    def __init__(self, name):
        self.name = name


def _reference(routes, host, path, headers):
    """The pool name of the first matching route (RouteConfig.matches), or None."""
    hdrs = {}
    for n, v in headers:
        hdrs.setdefault(n.lower(), v)
    for rc in routes:
        if rc.matches(host, path, hdrs):
            return rc.pool
    return None


HOSTS = ["api.example.com", "API.Example.COM:8080", "a.example.com", "a.b.example.com",
         "example.com", "other.org", "x.other.org", "127.0.0.1:80", "[::1]:80", "example.com.",
         "b.example.com"]
PATHS = ["/", "/v1", "/v1/", "/v1/users?x=1", "/v2/x", "/status", "/status?full=1", "/statusx",
         "/static/app.js"]
HEADER_SETS = [[], [("X-Canary", "1")], [("x-canary", "0")], [("X-Canary", "1"), ("X-Env", "eu")],
               [("X-Env", "eu")]]


def _route_sets():
    rng = random.Random(7)
    hosts = [None, "api.example.com", "*.example.com", "*.b.example.com", "other.org",
             "example.com", "::1", "127.0.0.1"]
    prefixes = [None, "/v1", "/v1/", "/static/"]
    exact = [None, "/status", "/"]
    headers = [{}, {"x-canary": "1"}, {"x-env": "eu", "x-canary": "1"}]
    for k in range(60):
        routes = []
        for i in range(rng.randint(1, 8)):
            routes.append(RouteConfig(pool=f"p{i}", host=rng.choice(hosts),
                                      path_prefix=rng.choice(prefixes), path=rng.choice(exact),
                                      headers=rng.choice(headers)))
        yield routes


def _parsed(host, path, headers):
    head = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n").encode("latin-1")
    return core.parse_request_head(head), head


@pytest.mark.usefixtures("active_core")
def test_router_gives_the_answers_of_the_reference():
    checked = 0
    for routes in _route_sets():
        router = Router([(rc, _P(rc.pool)) for rc in routes], default=_P("default"))
        for host, path, headers in itertools.product(HOSTS, PATHS, HEADER_SETS):
            req, head = _parsed(host, path, headers)
            want = _reference(routes, host, path.partition("?")[0], headers) or "default"
            got = router.route(req, head)
            assert got.pool.name == want, (routes, host, path, headers)
            checked += 1
    assert checked == 60 * len(HOSTS) * len(PATHS) * len(HEADER_SETS)


@pytest.mark.usefixtures("active_core")
def test_router_without_default_gives_none_and_caches_hosts():
    routes = [RouteConfig(pool="w", host="*.example.com")]
    router = Router([(rc, _P(rc.pool)) for rc in routes])
    req, head = _parsed("nope.org", "/", [])
    assert router.route(req, head) is None
    for i in range(3):
        req, head = _parsed(f"h{i}.example.com", "/", [])
        assert router.route(req, head).pool.name == "w"
    assert set(router._cache) == {b"nope.org", b"h0.example.com", b"h1.example.com",
                                  b"h2.example.com"}


def test_request_host_normalises_like_the_reference():
    assert request_host(b"API.example.com:80") == b"api.example.com"
    assert request_host(b"[::1]:8080") == b"::1"
    assert request_host(b"example.com.") == b"example.com"
    assert request_host(None) == b""


# ---------------------------------------------------------------- end to end

def _config(a, b, c, d):
    return f"""
[listeners.web]
bind = "127.0.0.1:0"
default_pool = "app"

[[listeners.web.routes]]
host = "api.example.com"
path_prefix = "/v1/"
pool = "api"
strip_prefix = true

[[listeners.web.routes]]
host = "*.example.com"
headers = {{ "X-Canary" = "1" }}
pool = "canary"

[[listeners.web.routes]]
path = "/status"
pool = "api"

[listeners.internal]
bind = "127.0.0.1:0"

[[listeners.internal.routes]]
path_prefix = "/only/"
pool = "canary"

[pools.app]
backends = ["http://{HOST}:{a.port}", "http://{HOST}:{b.port}"]

[pools.api]
backends = ["http://{HOST}:{c.port}"]

[pools.canary]
backends = ["http://{HOST}:{d.port}"]
"""


@pytest.fixture
def routed(make_backend, make_config_lb):
    a, b, c, d = (make_backend(n) for n in "ABCD")
    lb = make_config_lb(_config(a, b, c, d))
    return lb


@pytest.mark.usefixtures("active_core")
def test_requests_go_to_the_pool_of_their_route(routed):
    web = routed.url("web")
    cases = [
        ("api.example.com", "/v1/users?id=3", {}, "C", "/users?id=3"),    # stripped
        ("API.EXAMPLE.COM:8080", "/v1/", {}, "C", "/"),
        ("api.example.com", "/v2/x", {}, None, "/v2/x"),                   # default pool
        ("a.example.com", "/x", {"X-Canary": "1"}, "D", "/x"),
        ("a.b.example.com", "/x", {"X-Canary": "1"}, "D", "/x"),
        ("example.com", "/x", {"X-Canary": "1"}, None, "/x"),             # not a subdomain
        ("a.example.com", "/x", {"X-Canary": "2"}, None, "/x"),
        ("other.org", "/status", {}, "C", "/status"),
        ("other.org", "/status?x", {}, "C", "/status?x"),                 # the query is not the path
        ("other.org", "/statusx", {}, None, "/statusx"),
    ]
    with httpx.Client(timeout=5) as c:
        for host, path, headers, want, target in cases:
            r = c.get(web + path, headers={"Host": host, **headers})
            assert r.status_code == 200, (host, path)
            got = r.headers["x-backend"]
            assert (got == want) if want else got in ("A", "B"), (host, path, got)
            assert r.json()["target"] == target
            # the backend still gets the client's Host
            assert r.json()["headers"][0] == ["Host", host]


@pytest.mark.usefixtures("active_core")
def test_no_route_and_no_default_pool_is_404_and_others_are_served(routed):
    s = raw_connect(routed.port("internal"))
    s.sendall(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = Reader(s).read_response()
    assert resp.status == 404 and resp.body == b"404 Not Found\n"
    s.close()
    with httpx.Client(timeout=5) as c:
        r = c.get(routed.url("internal") + "/only/me")
        assert (r.status_code, r.headers["x-backend"]) == (200, "D")
        assert c.get(routed.url("web") + "/").status_code == 200


@pytest.mark.usefixtures("active_core")
@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_routing_reads_heads_fed_whole_or_byte_by_byte(routed, split):
    head = (b"GET /v1/a HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n")
    s = raw_connect(routed.port("web"))
    if split == "whole":
        s.sendall(head)
    else:
        for i in range(len(head)):
            s.send(head[i:i + 1])
    resp = Reader(s).read_response()
    assert resp.status == 200 and resp.get("x-backend") == "C"
    assert resp.json()["target"] == "/a"
    s.close()


@pytest.mark.usefixtures("active_core")
def test_absolute_form_routes_by_its_authority(routed):
    s = raw_connect(routed.port("web"))
    s.sendall(b"GET http://api.example.com/v1/z HTTP/1.1\r\nHost: other.org\r\n\r\n")
    resp = Reader(s).read_response()
    assert resp.status == 200 and resp.get("x-backend") == "C"
    assert resp.json()["target"] == "/z"
    s.close()


@pytest.mark.usefixtures("active_core")
def test_each_pool_hashes_on_its_own_key(make_backend, make_config_lb):
    """Two maglev pools behind one listener with different keys: each request
    is hashed on its own pool's key (the listener's first key is not it)."""
    bes = [make_backend(n) for n in "ABCDEF"]
    text = f"""
[listeners.web]
bind = "127.0.0.1:0"
default_pool = "bycookie"
[[listeners.web.routes]]
path_prefix = "/u/"
pool = "byuser"
[pools.bycookie]
algorithm = "maglev"
hash_key = "cookie:sid"
backends = [{", ".join(f'"http://{HOST}:{b.port}"' for b in bes[:3])}]
[pools.byuser]
algorithm = "maglev"
hash_key = "header:X-User"
backends = [{", ".join(f'"http://{HOST}:{b.port}"' for b in bes[3:])}]
"""
    lb = make_config_lb(text)
    with httpx.Client(timeout=5) as c:
        for user in ("u1", "u2", "u3", "u4"):
            # same X-User, changing cookie: always one backend of byuser
            seen = {c.get(lb.url("web") + "/u/x", headers={"X-User": user, "Cookie": f"sid={i}"}
                          ).headers["x-backend"] for i in range(6)}
            assert len(seen) == 1 and seen <= {"D", "E", "F"}, (user, seen)
        spread = set()
        for sid in range(12):
            seen = {c.get(lb.url("web") + "/", headers={"X-User": str(i), "Cookie": f"sid={sid}"}
                          ).headers["x-backend"] for i in range(4)}
            assert len(seen) == 1 and seen <= {"A", "B", "C"}, (sid, seen)
            spread |= seen
        assert len(spread) > 1      # the cookie is the key: different sids spread


@pytest.mark.usefixtures("active_core")
def test_a_listener_without_routes_has_no_router(make_backend, make_config_lb):
    """One pool and no routes: the request path reads the Front's pool, nothing else."""
    a = make_backend("A")
    lb = make_config_lb(f"""
[listeners.web]
bind = "127.0.0.1:0"
default_pool = "app"
[pools.app]
backends = ["http://{HOST}:{a.port}"]
""")
    front = lb.proxy.fronts["web"]
    assert front.router is None and front.pool is lb.proxy.pools["app"]
    with httpx.Client(timeout=5) as c:
        assert c.get(lb.url("web") + "/", headers={"Host": "any"}).headers["x-backend"] == "A"
