"""From a configuration to the objects the data path reads, and reload as a diff.

``plan(proxy, config)`` builds what a configuration needs without touching
the running proxy: a ``Pool`` per pool (reusing the ``Backend`` objects of
backends it keeps: same pool name, same address) and the settings of each
listener's ``Front``. ``place(proxy, plan)`` gives them their rows in the
counter table (``proxy.layout.assign``; ``TableFull`` when they do not fit,
and then nothing has changed). ``apply(proxy, plan)`` then swaps them in
(placing them first if that was not done), in one go and without awaiting,
so no request sees half of each:

* a kept backend keeps its object (pooled connections, counters: the same
  row of the table) and its health state (carried into the new pool's
  checker); an added one starts on a row of zeros;
* a removed backend is retired: it takes no new request (its pool is gone
  from every route), finishes those in flight, pools nothing, and the
  ticker closes its idle connections once the last one is over; it counts
  them in a row of its own (its row in the table may go to a new backend);
* a kept listener's Front is updated in place, so the next request on an
  open connection uses the new routes; a removed one drains (the caller
  closes its listening socket); an added one is created (the caller starts
  its listener). A listener's row goes by its name: one whose ``bind``
  moved keeps its counters;
* TLS: the contexts of a listener's certificates (``fastlb.runtime.tls``)
  are made by ``plan`` (the same ones again when its TLS settings did not
  change) and swapped into its ``ServerTLS`` by ``apply``; a pool's https://
  backends share one client context, kept while the pool's ``tls`` does not
  change. A backend kept at the same address but spoken to otherwise (http
  and https, other TLS settings) is *replaced*: a new Backend on the same
  row of counters and with its health state, so that no pooled connection
  of the old kind is used again; the old object finishes its requests as a
  retired one;
* the Python hooks (``fastlb.hooks.Hooks``, ``proxy.hooks``) are made again
  over the new pools, with the module the configuration was loaded with
  (a worker, whose configuration came without it, imports it here).

The first build is a plan against an empty proxy.
"""
import array
import dataclasses
import logging

from fastlb.config.model import (DEFAULT_NAME, BackendConfig, BackendTLSConfig, Config,
                                 ListenerConfig, PoolConfig)
from fastlb.errors import KEY_KINDS
from fastlb.health import HealthConfig
from fastlb.proxy import Backend, Front, Pool
from fastlb.runtime import tls
from fastlb.runtime.routing import Router
from fastlb.selection import HASHED, BalancerSet, PriorityGate, make_balancer
from fastlb.validate import format_address
from fastlb.wire.forwarded import TrustedProxies
from fastlb.wire.proxyproto import VERSIONS as PROXY_VERSIONS

log = logging.getLogger("fastlb")


def as_config(opts):
    """A ``Config`` for ``opts``: itself, or the one listener and one pool
    (both ``default``) that a ``fastlb.server.Options`` describes."""
    if isinstance(opts, Config):
        return opts
    n = len(opts.backends)
    weights = tuple(opts.weights) if opts.weights else (1,) * n
    schemes = tuple(opts.schemes) if opts.schemes else ("http",) * n
    backends = tuple(BackendConfig(url=f"{s}://{format_address(h, p)}", host=h, port=p,
                                   weight=w, scheme=s)
                     for (h, p), w, s in zip(opts.backends, weights, schemes))
    pool = PoolConfig(
        name=DEFAULT_NAME, backends=backends, algorithm=opts.algorithm, hash_key=opts.hash_key,
        hash_balance_factor=opts.hash_balance_factor, connect_timeout=opts.connect_timeout,
        response_timeout=opts.response_timeout, retries=opts.retries,
        retry_timeout=opts.retry_timeout, upstream_idle_timeout=opts.upstream_idle_timeout,
        upstream_max_idle=opts.upstream_max_idle, max_interim=opts.max_interim,
        send_proxy_protocol=opts.send_proxy_protocol,
        health=opts.health if opts.health is not None else HealthConfig(),
        tls=opts.backend_tls if opts.backend_tls is not None else BackendTLSConfig())
    listener = ListenerConfig(
        name=DEFAULT_NAME, host=opts.listen_host, port=opts.listen_port,
        default_pool=DEFAULT_NAME, header_timeout=opts.header_timeout,
        keepalive_timeout=opts.keepalive_timeout, max_header_size=opts.max_header_size,
        body_timeout=opts.body_timeout, body_min_rate=opts.body_min_rate,
        upgrade=opts.upgrade, tunnel_timeout=opts.tunnel_timeout,
        trusted_proxies=opts.trusted_proxies, proxy_protocol=opts.proxy_protocol,
        proxy_protocol_from=opts.proxy_protocol_from, tls=opts.tls, backlog=opts.backlog)
    return Config(listeners={DEFAULT_NAME: listener}, pools={DEFAULT_NAME: pool},
                  access_log=opts.access_log, access_log_format=opts.access_log_format,
                  via=opts.via, drain_timeout=opts.drain_timeout, workers=opts.workers,
                  request_id=opts.request_id, request_id_header=opts.request_id_header)


class Plan:
    """What ``apply`` swaps in (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        self.pools = {}             # name -> new Pool
        self.assign = []            # (Backend, pool, index, max_idle) to set at apply
        self.inherit = {}           # pool name -> (old Pool, [(new idx, old idx)])
        self.retire = []            # Backends no pool keeps
        self.replaced = []          # Backends a pool keeps but speaks to otherwise (TLS):
        #                             a new object takes over their row
        self.certificates = {}      # listener name -> fastlb.runtime.tls.Certificates
        self.retire_pools = []      # old Pools replaced
        self.flush_idle = []        # kept Backends whose idle connections must close
        self.fronts_add = []        # ListenerConfig of listeners to create
        self.fronts_keep = []       # (Front, ListenerConfig) updated in place
        self.fronts_remove = []     # Fronts to drain
        self.changes = []           # words for the log line
        self.rows = None            # (backend rows, listener rows) once placed
        self.hooks = None           # fastlb.hooks.Hooks over the new pools, or None

    def summary(self):
        return "; ".join(self.changes) if self.changes else "nothing changed"


def _settings(pc):
    """A pool's settings besides its backends (to say what a reload changed)."""
    return dataclasses.replace(pc, backends=())


def _key_spec(pc):
    """``(hash_kind, hash_what, hash_name)`` of a pool's algorithm and key."""
    if pc.algorithm not in HASHED:
        return 0, 0, b""
    kind, _, name = pc.hash_key.partition(":")
    return (1 if kind == "ip" else 2), KEY_KINDS.get(kind, 0), name.encode("latin-1")


def _client_context(pc, old):
    """The TLS context of a pool's https:// backends (None: it has none): the
    old pool's when its TLS settings are the same (its backends and their
    pooled connections are kept), else a new one."""
    if not any(bc.scheme == "https" for bc in pc.backends):
        return None
    if old is not None and old.tls_context is not None and old.config.tls == pc.tls:
        return old.tls_context
    return tls.client_context(pc.tls)


def _plan_pool(plan, pc, old):
    pool = Pool(pc.name)
    pool.config = pc
    pool.tls_context = ctx = _client_context(pc, old)
    # with the PROXY protocol to the backends, a connection carries the
    # header of the client it was made for: it is that client's alone, and
    # none goes to the shared pool (ClientProtocol.kept holds it between
    # that client's requests)
    pool.send_proxy = PROXY_VERSIONS.get(pc.send_proxy_protocol, 0)
    max_idle = 0 if pool.send_proxy else pc.upstream_max_idle
    changed_pp = old is not None and old.config.send_proxy_protocol != pc.send_proxy_protocol
    old_by_addr = {b.address: b for b in old.backends} if old is not None else {}
    old_index = {b.address: i for i, b in enumerate(old.backends)} if old is not None else {}
    pairs = []
    added = 0
    changed = 0
    for i, bc in enumerate(pc.backends):
        want, name = (ctx, pc.tls.server_name or bc.host) if bc.scheme == "https" \
            else (None, None)
        b = old_by_addr.pop(bc.address, None)
        if b is not None and (b.tls is not want or b.server_name != name):
            # the same backend, spoken to otherwise (http <-> https, other TLS
            # settings): a new object, so its pooled connections go with the
            # old one; its health state and its row of counters carry over
            plan.replaced.append(b)
            pairs.append((i, old_index[bc.address]))
            b = Backend(i, bc.host, bc.port, max_idle, want, name)
            changed += 1
        elif b is None:
            b = Backend(i, bc.host, bc.port, max_idle, want, name)
            added += 1
        else:
            pairs.append((i, old_index[bc.address]))
            if changed_pp:
                # its pooled connections were opened with the old header (or none)
                plan.flush_idle.append(b)
        plan.assign.append((b, pool, i, max_idle))
        pool.backends.append(b)
    plan.retire.extend(old_by_addr.values())
    if old is not None:
        plan.inherit[pc.name] = (old, pairs)
        plan.retire_pools.append(old)
        words = []
        if added or old_by_addr:
            words.append(f"backends +{added} -{len(old_by_addr)}")
        if changed:
            words.append(f"TLS of {changed} backend{'s' if changed > 1 else ''} changed")
        if _settings(old.config) != _settings(pc):
            words.append("settings changed")
        elif not words and old.config != pc:
            words.append("backends reordered or reweighted")
        if words:
            plan.changes.append(f"pool {pc.name}: {', '.join(words)}")
    n = len(pool.backends)
    pool.weights = [bc.weight for bc in pc.backends] or [1] * n
    names = [b.authority for b in pool.backends]
    # a pool with no backend yet (its discovery has found none): selectors
    # over one slot of weight 0, never chosen, so every request gets 503
    sel_weights, sel_names = (pool.weights, names) if n else ([0], [b"-"])
    algo_opts = {}
    if pc.algorithm in HASHED:
        algo_opts["balance_factor"] = pc.hash_balance_factor
    pool.balancer = make_balancer(pc.algorithm, sel_weights, sel_names, **algo_opts)
    pool.balancers = pool.balancer
    pool.hash_kind, pool.hash_what, pool.hash_name = _key_spec(pc)
    if pc.algorithm in HASHED:
        pool.fallback = make_balancer("weighted-round-robin", sel_weights, sel_names)
        pool.balancers = BalancerSet(pool.balancer, pool.fallback)
    priorities = [bc.priority for bc in pc.backends]
    if len(set(priorities)) > 1:
        # DNS SRV priorities: the health checker steers through the gate
        pool.balancers = PriorityGate(pool.balancers, priorities, pool.weights)
    pool.connect_timeout = pc.connect_timeout
    pool.response_timeout = pc.response_timeout
    pool.max_tries = 1 + pc.retries
    pool.retry_timeout = pc.retry_timeout
    pool.max_interim = pc.max_interim
    pool.idle_timeout = pc.upstream_idle_timeout
    return pool


def plan(proxy, config):
    """A Plan that makes ``proxy`` run ``config`` (nothing is changed yet)."""
    p = Plan(config)
    for name, pc in config.pools.items():
        p.pools[name] = _plan_pool(p, pc, proxy.pools.get(name))
    for name, old in proxy.pools.items():
        if name not in config.pools:
            p.retire.extend(old.backends)
            p.retire_pools.append(old)
            p.changes.append(f"pool {name} removed ({len(old.backends)} backends)")
    added = [n for n in config.pools if n not in proxy.pools]
    if added and proxy.pools:
        p.changes.append("pools added: " + ", ".join(added))
    for name, lc in config.listeners.items():
        front = proxy.fronts.get(name)
        if lc.tls is not None:
            # the certificates' contexts, made now: apply only swaps them in
            same = front is not None and front.tls is not None and front.tls.config == lc.tls
            p.certificates[name] = front.tls.certificates if same \
                else tls.Certificates(lc.tls)
        if front is None:
            p.fronts_add.append(lc)
            if proxy.fronts:
                p.changes.append(f"listener {name} added on {lc.bind}")
        elif (front.config.host, front.config.port) != (lc.host, lc.port):
            p.fronts_remove.append(front)
            p.fronts_add.append(lc)
            p.changes.append(f"listener {name} moved from {front.config.bind} to {lc.bind}")
        else:
            p.fronts_keep.append((front, lc))
            if front.config.routes != lc.routes:
                p.changes.append(f"listener {name}: routes {len(front.config.routes)} -> "
                                 f"{len(lc.routes)}")
            elif dataclasses.replace(front.config, tls=None) != dataclasses.replace(lc, tls=None):
                p.changes.append(f"listener {name}: settings changed")
            if front.config.tls != lc.tls:
                p.changes.append(f"listener {name}: " + (
                    "TLS off" if lc.tls is None else "TLS on" if front.config.tls is None
                    else "certificates reloaded"))
    old = proxy.config
    if old is not None and (old.access_log, old.access_log_format) != (
            config.access_log, config.access_log_format):
        p.changes.append("access_log kept as it was (it changes at a restart)")
    if old is not None:
        for key in ("via", "log_level", "drain_timeout", "request_id", "request_id_header"):
            if getattr(old, key) != getattr(config, key):
                p.changes.append(f"{key} {getattr(old, key)!r} -> {getattr(config, key)!r}")
    for name, front in proxy.fronts.items():
        if name not in config.listeners:
            p.fronts_remove.append(front)
            p.changes.append(f"listener {name} on {front.config.bind} removed")
    _plan_hooks(p, proxy, config.hooks)
    return p


def _plan_hooks(p, proxy, hc):
    running = proxy.hooks
    if hc is None:
        if running is not None:
            p.changes.append("hooks removed")
        return
    from fastlb import hooks

    module = hooks.load_module(hc)
    p.hooks = hooks.Hooks(module, p.pools, hc.module)
    if proxy.config is None or module is (running.module if running is not None else None):
        return
    what = f"hooks {hc.module} ({', '.join(hc.defined)})"
    p.changes.append(f"{what} imported again" if running is not None else f"{what} added")


def _set_front(front, lc, pools, config, draining=False, certificates=None):
    front.config = lc
    if lc.tls is None:
        front.tls = None
    elif certificates is not None:
        if front.tls is None:
            front.tls = tls.ServerTLS(certificates)
        else:
            front.tls.use(certificates)     # new handshakes get them; open connections keep theirs
    front.proto = b"https" if front.tls is not None else b"http"
    front.header_timeout = lc.header_timeout
    front.keepalive_timeout = lc.keepalive_timeout
    front.max_header_size = lc.max_header_size
    front.body_timeout = lc.body_timeout if lc.body_timeout > 0 else 1e300
    front.body_rate_inv = 1.0 / lc.body_min_rate if lc.body_min_rate > 0 else 0.0
    front.upgrade = lc.upgrade
    front.tunnel_timeout = lc.tunnel_timeout
    rid_name = lc.request_id_field(config)
    front.request_id = rid_name.encode("ascii") if rid_name is not None else None
    # decided per connection when it opens: a change applies to new connections
    if front.trusted is None or front.trusted.networks != lc.trusted_proxies:
        front.trusted = TrustedProxies(lc.trusted_proxies) if lc.trusted_proxies else None
    front.proxy_protocol = lc.proxy_protocol
    if front.pp_from is None or front.pp_from.networks != lc.proxy_protocol_from:
        # None: every peer sends the header
        front.pp_from = (TrustedProxies(lc.proxy_protocol_from) if lc.proxy_protocol_from
                         else None)
    default = pools.get(lc.default_pool) if lc.default_pool is not None else None
    front.pool = default
    routes = [(rc, pools[rc.pool]) for rc in lc.routes if not draining or rc.pool in pools]
    front.router = Router(routes, default) if routes or draining else None
    # the key parse_request_head extracts: the default pool's, else the
    # first routed pool's that hashes on one (another pool's re-parses)
    front.hash_what, front.hash_name = 0, b""
    for name in ((lc.default_pool,) if lc.default_pool else ()) + tuple(r.pool for r in lc.routes):
        pool = pools.get(name)
        if pool is not None and pool.hash_kind == 2:
            front.hash_what, front.hash_name = pool.hash_what, pool.hash_name
            break


def set_health(proxy, pool, config, inherit=None):
    """Give ``pool`` a (not yet started) health checker for ``config``,
    carrying the state of kept backends from ``inherit`` = (old Pool, pairs)."""
    from fastlb.health import HealthChecker

    # every pool has a checker, checks or not: it also holds the admin's
    # state (drain, maintenance, weights) and what the status page shows
    pool.health = None
    pool.eject_5xx = config.eject_5xx and (config.active or config.passive)
    shared = proxy.shared
    if shared is not None and getattr(shared, "health", None) is not None:
        # a worker: its master checks and decides, for every worker at once
        pool.health = shared.health(proxy, pool, config)
        return
    if config.slow_start and pool.config is not None and pool.config.algorithm == "round-robin":
        log.warning("pool %s: slow start has no effect with round-robin, which ignores "
                    "weights; use weighted-round-robin", pool.name)
    backends = pool.backends

    def on_trial(idx):
        # a backend back on trial: report its next success to the checker
        b = backends[idx]
        if b.fail_streak == 0:
            b.fail_streak = 1

    named = len(proxy.config.pools) > 1 if proxy.config is not None else False
    pool.health = HealthChecker(backends, pool.balancers, config, proxy.loop,
                                weights=pool.weights, on_trial=on_trial,
                                pool=pool.name if named else None,
                                proxy_protocol=pool.send_proxy or None)
    if inherit is not None:
        old, pairs = inherit
        if old.health is not None and pairs:
            pool.health.inherit(old.health, pairs)


def place(proxy, p):
    """Rows in the counter table for the plan's backends and listeners.
    Raises ``fastlb.runtime.shm.TableFull`` when they do not fit; then
    nothing has changed. Once placed, the plan is to be applied (the layout
    has moved on to it)."""
    if p.rows is None:
        p.rows = proxy.layout.assign(p.config)


def _counters(obj, view, row):
    obj.ctr = view
    obj.row = row


def _own_counters(obj):
    """``obj`` (a Backend or Front leaving the table) counts on in a copy of
    its row: what is still in flight ends there (gauges go back to 0), and
    its row in the table is free for another."""
    if obj.row >= 0:
        _counters(obj, array.array("Q", list(obj.ctr)), -1)


def apply(proxy, p):
    """Swap the plan in (synchronous: no request runs in between). Returns
    ``(fronts added, fronts removed)``: the caller starts and stops their
    listeners."""
    place(proxy, p)
    rows_b, rows_l = p.rows
    tables, slot = proxy.tables, proxy.slot
    proxy.config = p.config
    for b, pool, index, max_idle in p.assign:
        b.index = index
        b.pool = pool
        b.max_idle = max_idle
        b.retired = False
        row = rows_b[(pool.name, b.address)]
        if row != b.row:
            _counters(b, tables.backend_counters(slot, row), row)
    for b in p.flush_idle:
        b.close_idle()
    for b in p.retire:
        b.retired = True
        b.max_idle = 0      # nothing goes back to its pool
        _own_counters(b)
        if b not in proxy.retired:
            proxy.retired.append(b)
    for b in p.replaced:
        # its requests in flight finish on it, counted in the row it shares
        # with the object that replaced it; its connections are not pooled
        b.retired = True
        b.max_idle = 0
        b.close_idle()
        if b not in proxy.retired:
            proxy.retired.append(b)
    for pool in p.pools.values():
        set_health(proxy, pool, pool.config.health, p.inherit.get(pool.name))
    for pool in p.retire_pools:
        pool.retired = True
    old_pools = p.retire_pools
    proxy.pools = p.pools
    proxy.hooks = p.hooks
    _move_in_flight(proxy, p.pools)
    added = []
    for front, lc in p.fronts_keep:
        _set_front(front, lc, p.pools, p.config, certificates=p.certificates.get(front.name))
        row = rows_l[front.name]
        if row != front.row:
            _counters(front, tables.listener_counters(slot, row), row)
    for front in p.fronts_remove:
        if proxy.fronts.get(front.name) is front:
            del proxy.fronts[front.name]
        # its last requests go to the pools of the same names now (a pool
        # that is gone: its routes are left out), never to a removed backend
        _set_front(front, front.config, p.pools, p.config, draining=True)
        if front.name not in rows_l:
            _own_counters(front)    # else it moved: the new Front has its row too
        proxy.drain_front(front)
    for lc in p.fronts_add:
        front = Front(lc.name)
        _set_front(front, lc, p.pools, p.config, certificates=p.certificates.get(lc.name))
        row = rows_l[lc.name]
        _counters(front, tables.listener_counters(slot, row), row)
        proxy.fronts[lc.name] = front
        added.append(front)
    # keep the listeners' order of the file
    proxy.fronts = {name: proxy.fronts[name] for name in p.config.listeners}
    publish(proxy)
    if old_pools:
        proxy.stop_health(old_pools)
    return added, list(p.fronts_remove)


def _move_in_flight(proxy, pools):
    """Requests in flight on a kept backend of a replaced pool move to the
    pool that replaced it: they count in its selector (least-conn, bounded
    load see them), and their retries go by it. Others stay where they are."""
    for c in list(proxy.clients):
        old = c.pool
        if old is None or not old.retired:
            continue
        new = pools.get(old.name)
        if new is None:
            continue
        b = c.backend
        if b is None or b.pool is not new or b.retired:
            continue        # its backend is gone: it finishes where it is
        if c.holding:
            sel = new.balancer if c.held_by is old.balancer else new.fallback
            if sel is None:
                continue
            c.held_by.release(c.bidx)
            sel.acquire(b.index)
            c.held_by = sel
        c.move_to(new)


def publish(proxy):
    """Refresh what the proxy keeps from its pools and fronts."""
    pools = proxy.pools
    first = pools.get(DEFAULT_NAME) or next(iter(pools.values()), None)
    proxy.backends = first.backends if first is not None else []
    proxy.balancer = first.balancer if first is not None else None
    proxy.fallback = first.fallback if first is not None else None
    proxy.balancers = first.balancers if first is not None else None
    proxy.weights = first.weights if first is not None else []
    proxy.health = first.health if first is not None else None
    proxy.front = next(iter(proxy.fronts.values()), None)
    proxy.listener = proxy.front.listener if proxy.front is not None else None
    proxy.n_backends = sum(len(pl.backends) for pl in pools.values())
    proxy.response_timeout = max((pl.response_timeout for pl in pools.values()), default=60.0)
    proxy.via = b"fastlb" if proxy.config.via else None
    ticks = [0.25]
    for f in proxy.fronts.values():
        ticks += [f.header_timeout / 4, f.keepalive_timeout / 4, f.tunnel_timeout / 4]
    for pl in pools.values():
        ticks += [pl.response_timeout / 4, pl.idle_timeout / 4]
    proxy.tick = min(ticks)
