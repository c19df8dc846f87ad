"""A listener's routes, compiled at load time.

Plain Python, also compiled by Cython with the C types of ``_routing.pxd``;
``fastlb.runtime.routing`` chooses which one runs (the switch of
``fastlb.proxy``).

``Router.route(req, head)`` gives the ``Route`` of the first route (in file
order) that a request matches, else the listener's default (or None: 404).
It gives the answers of ``fastlb.config.RouteConfig.matches``, the reference
of what a route means, in a lookup built once:

* the request's host (lower-cased, without port or trailing dot) is looked
  up in a dict of the exact hosts of the routes; else its suffixes at each
  dot, longest first, in a dict of the wildcard suffixes (``*.example.com``
  is ``.example.com``); else the routes without a host condition apply. Each
  of these keys holds the routes that can match such a host, merged in file
  order, so only path and header conditions are left to test;
* the routes found for a host are cached by the authority as sent (up to
  CACHE_SIZE of them), so a host seen before costs one dict lookup;
* a route with no path or header condition ends the search at once, and the
  path is taken from the head only when a route has a path condition;
* header conditions are read from the head only when a candidate route has
  one; the first field of that name is the one compared.

A listener without routes has no Router at all: its requests go straight to
its default pool.
"""

CACHE_SIZE = 4096


class Route:
    """What the data path reads of a matched route: the pool, and how many
    bytes of the target to strip (None: none)."""

    def __init__(self, pool, strip=None, config=None):
        self.pool = pool
        self.strip = strip
        self.config = config

    def __repr__(self):
        return f"<Route -> {self.pool.name if self.pool is not None else None}>"


class Entry:
    """One route as the lookup tests it."""

    def __init__(self, index, rc, route):
        self.index = index
        self.path = rc.path.encode("latin-1") if rc.path is not None else None
        self.prefix = rc.path_prefix.encode("latin-1") if rc.path_prefix is not None else None
        self.headers = tuple((n.encode("latin-1"), v.encode("latin-1"))
                             for n, v in rc.headers.items())
        self.route = route
        self.plain = self.path is None and self.prefix is None and not self.headers


def _merge(*lists):
    out = sorted({e.index: e for lst in lists for e in lst}.values(), key=lambda e: e.index)
    return tuple(out)


def request_host(authority):
    """The host of an authority (bytes or None) as routes compare it."""
    if not authority:
        return b""
    h = authority.strip().lower()
    if h.startswith(b"["):
        end = h.find(b"]")
        h = h[1:end] if end > 0 else h
    elif h.count(b":") == 1:
        h = h.partition(b":")[0]
    return h.rstrip(b".")


def _field_value(head, name):
    """The value of the first field named ``name`` (lower-case bytes) in a
    raw head, or None."""
    for line in head.split(b"\r\n")[1:]:
        n, sep, v = line.partition(b":")
        if sep and n.lower() == name:
            return v.strip(b" \t")
    return None


class Router:
    """The compiled routes of one listener (see the module docstring)."""

    def __init__(self, routes, default=None):
        """``routes``: ``(RouteConfig, Pool)`` pairs in file order;
        ``default``: the pool of requests that match none (None: 404)."""
        entries = []
        exact = {}          # host -> [entries]
        wild = {}           # ".suffix" -> [entries]
        anyhost = []
        for i, (rc, pool) in enumerate(routes):
            strip = len(rc.path_prefix.encode("latin-1")) if rc.strip_prefix else None
            e = Entry(i, rc, Route(pool, strip, rc))
            entries.append(e)
            if rc.host is None:
                anyhost.append(e)
            elif rc.host.startswith("*."):
                wild.setdefault(rc.host[1:].encode("latin-1"), []).append(e)
            else:
                exact.setdefault(rc.host.encode("latin-1"), []).append(e)
        self.count = len(entries)
        self.default = Route(default) if default is not None else None
        self._any = tuple(anyhost)
        # a wildcard suffix gets every wildcard that is a suffix of it
        self._wild = {}
        for suffix in wild:
            self._wild[suffix] = _merge(*(lst for s, lst in wild.items() if suffix.endswith(s)),
                                        anyhost)
        self._exact = {}
        for host, lst in exact.items():
            self._exact[host] = _merge(lst, self._wild_for(host) or anyhost, anyhost)
        self._cache = {}        # normalised host -> candidates
        self._seen = {}         # authority as sent -> candidates

    def _wild_for(self, host):
        """The merged wildcard list of the longest wildcard suffix of ``host``
        (a proper suffix, at a dot, with at least one byte before it), or None."""
        i = host.find(b".", 1)
        while i > 0:
            lst = self._wild.get(host[i:])
            if lst is not None:
                return lst
            i = host.find(b".", i + 1)
        return None

    def candidates(self, host):
        """The routes that can match requests for ``host``, in file order."""
        lst = self._exact.get(host)
        if lst is not None:
            return lst
        lst = self._cache.get(host)
        if lst is None:
            lst = self._wild_for(host) if self._wild else None
            if lst is None:
                lst = self._any
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[host] = lst
        return lst

    def route(self, req, head):
        """The Route of a parsed request (``RequestHead``; ``head``: its raw
        bytes, read only for header conditions), or the default, or None."""
        authority = req.host
        lst = self._seen.get(authority)
        if lst is None:
            lst = self.candidates(request_host(authority))
            if len(self._seen) >= CACHE_SIZE:
                self._seen.clear()
            self._seen[authority] = lst
        if lst:
            path = None
            fields = None
            for e in lst:
                if e.plain:
                    return e.route
                if e.path is not None or e.prefix is not None:
                    if path is None:
                        path = req.path
                        q = path.find(b"?")
                        if q >= 0:
                            path = path[:q]
                    if e.path is not None and path != e.path:
                        continue
                    if e.prefix is not None and not path.startswith(e.prefix):
                        continue
                if e.headers:
                    if fields is None:
                        fields = {}
                    ok = True
                    for name, value in e.headers:
                        if name in fields:
                            got = fields[name]
                        else:
                            got = fields[name] = _field_value(head, name)
                        if got != value:
                            ok = False
                            break
                    if not ok:
                        continue
                return e.route
        return self.default
