"""Discovery: a pool's backends from DNS SRV records or an etcd prefix, and the
configuration from etcd. Real parts only: ``fastlb serve`` as a process, a
real etcd and a real dnsmasq (``tests/discovery_parts.py``), real backends
and real client connections.
"""
import json
import random
import threading
import time
from collections import Counter

import pytest

from discovery_parts import (  # noqa: F401  (fixtures are used by name)
    LogWatch, etcd, make_dnsmasq, make_gate, needs_dnsmasq, needs_etcd, srv_records)
from helpers import (  # noqa: F401
    HOST, FastlbProcess, Reader, active_core, backend_loop, free_dead_port, make_backend,
    ok_response, raw_connect, run_fastlb, wait_for)
from fastlb.config import loads
from fastlb.config.model import BackendConfig, DiscoveryConfig

pytestmark = pytest.mark.usefixtures("active_core")

SRV = "_http._tcp.app.test"


# ---------------------------------------------------------------- helpers

def named(be, req):
    return ok_response(be.name.encode())


def answers(port, n=20, reconnect=False):
    """Who answered each of ``n`` requests on one keep-alive connection
    (a backend's name, or ``status NNN``). ``reconnect``: a connection closed
    while idle (by a worker of a previous generation as it drains: one it
    had just accepted is idle too) is opened again and the request sent
    again, a few times at most, as HTTP clients do for an idempotent request."""
    out = Counter()
    req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    s = raw_connect(port, timeout=10)
    again = 5 if reconnect else 0
    try:
        r = Reader(s, 10)
        done = 0
        while done < n:
            try:
                s.sendall(req)
                resp = r.read_response()
            except (EOFError, ConnectionError):
                if not again or r.buf:
                    raise
                again -= 1
                s.close()
                s = raw_connect(port, timeout=10)
                r = Reader(s, 10)
                continue
            done += 1
            out[resp.body.decode() if resp.status == 200 else f"status {resp.status}"] += 1
            if resp.get("connection") == "close":
                break
    finally:
        s.close()
    return out


def serves(port, names, n=20, reconnect=False):
    """Every one of ``n`` requests is answered by one of ``names``, and each
    of ``names`` answers some."""
    got = answers(port, n, reconnect=reconnect)
    return set(got) == set(names)


def config_text(pool, algorithm="round-robin", extra=""):
    return (f'[listeners.web]\nbind = "127.0.0.1:0"\ndefault_pool = "app"\n\n'
            f'[pools.app]\nalgorithm = "{algorithm}"\n{pool}\n{extra}\n')


def start_lb(tmp_path, text, *args, name="fastlb.toml"):
    path = tmp_path / name
    path.write_text(text)
    lb = FastlbProcess(None, "--config", str(path), *args)
    return lb, LogWatch(lb)


def put_backend(etcd, prefix, be, **extra):
    return etcd.put(f"{prefix}{be.name}", json.dumps({"url": f"http://{HOST}:{be.port}",
                                                      **extra}))


@pytest.fixture
def lbs():
    made = []
    yield made
    for lb in made:
        lb.terminate()


# ---------------------------------------------------------------- configuration

def test_discovery_in_the_configuration_file(tmp_path):
    text = config_text('discovery = { dns_srv = "_http._tcp.app.example", interval = 5, '
                       'resolver = "127.0.0.1:5353" }', extra=(
                           '[pools.kv]\ndiscovery = { etcd = ["http://127.0.0.1:2379", '
                           '"http://127.0.0.2"], prefix = "/services/kv/" }\n'
                           'backends = ["http://127.0.0.1:9001"]\n'
                           '[[listeners.web.routes]]\npath_prefix = "/kv/"\npool = "kv"\n'))
    config = loads(text, "f.toml")
    assert config.pools["app"].discovery == DiscoveryConfig(
        dns_srv="_http._tcp.app.example", interval=5.0, resolver=("127.0.0.1", 5353))
    assert config.pools["app"].backends == ()
    assert config.pools["kv"].discovery == DiscoveryConfig(
        etcd=("http://127.0.0.1:2379", "http://127.0.0.2"), prefix="/services/kv/")
    assert [b.address for b in config.pools["kv"].backends] == ["127.0.0.1:9001"]
    path = tmp_path / "f.toml"
    path.write_text(text)
    r = run_fastlb("check-config", str(path))
    assert (r.returncode, r.stdout) == (0, f"{path}: OK (1 listener, 2 pools, 1 route, "
                                           "1 backend)\n")
    # the resolver's port is 53 when left out; IPv6 in brackets
    for given, want in (("10.0.0.2", ("10.0.0.2", 53)), ("[::1]:5353", ("::1", 5353))):
        c = loads(config_text(f'discovery = {{ dns_srv = "a.example", resolver = "{given}" }}'))
        assert c.pools["app"].discovery.resolver == want


@pytest.mark.parametrize("discovery,messages", [
    ('{ dns_srv = "_http._tcp.a.example", etcd = ["http://127.0.0.1:2379"] }',
     ["f.toml:7: pools.app.discovery: give dns_srv or etcd, not both"]),
    ('{ interval = 3 }',
     ["f.toml:7: pools.app.discovery: missing dns_srv or etcd (where the backends are found)"]),
    ('{ etcd = ["http://127.0.0.1:2379"] }',
     ["f.toml:7: pools.app.discovery: missing prefix (the etcd key prefix of the backends, "
      "such as /services/app/)"]),
    ('{ etcd = ["https://127.0.0.1:2379"], prefix = "/a/", interval = 2 }',
     ['f.toml:7: pools.app.discovery.etcd: "https://127.0.0.1:2379": only http:// endpoints '
      "are supported (etcd's JSON gateway in plain HTTP)",
      "f.toml:7: pools.app.discovery.interval: interval is a dns_srv setting; etcd is "
      "watched (changes apply at once) and takes prefix"]),
    ('{ dns_srv = "bad name", resolver = "dns.example", intervall = 1 }',
     ['f.toml:7: pools.app.discovery.dns_srv: expected a DNS name such as '
      '_http._tcp.app.example, got "bad name"',
      'f.toml:7: pools.app.discovery.resolver: the resolver is an IP address (with a port: '
      '127.0.0.1:5353, [::1]:53), got "dns.example"',
      'f.toml:7: pools.app.discovery.intervall: unknown key "intervall" (did you mean '
      '"interval"?)']),
    ('"_http._tcp.a.example"',
     ['f.toml:7: pools.app.discovery: expected a discovery table (discovery = { dns_srv = '
      '"..." } or { etcd = ["http://..."], prefix = "..." }), got "_http._tcp.a.example"']),
])
def test_discovery_errors_are_reported(discovery, messages):
    from fastlb.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        loads(config_text(f"discovery = {discovery}"), "f.toml")
    assert [str(i) for i in e.value.errors] == messages


def test_a_pool_without_backends_needs_discovery():
    from fastlb.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        loads(config_text(""), "f.toml")
    assert [str(i) for i in e.value.errors] == [
        "f.toml:5: pools.app: missing backends (a pool needs at least one)"]


# ---------------------------------------------------------------- every node agrees

def _pool_of(backends, algorithm="maglev"):
    """The pool a fresh process builds for ``backends``, in the order given."""
    import asyncio

    from fastlb.proxy import Proxy
    from fastlb.runtime import build

    text = config_text('backends = ["http://127.0.0.1:1"]', algorithm,
                       extra='hash_key = "header:X-Key"')
    config = loads(text, "t.toml", resolve=False)
    pc = config.pools["app"]
    config = build.dataclasses.replace(config, pools={"app": build.dataclasses.replace(
        pc, backends=tuple(backends))})
    async def build_one():
        proxy = Proxy(config, asyncio.get_running_loop())
        pool = proxy.pools["app"]
        proxy.close()
        await proxy.wait_closed()
        return pool

    return asyncio.run(build_one())


def test_nodes_that_find_the_same_set_in_any_order_route_every_key_alike():
    """What DNS or etcd return, in whatever order, is given to the pool in
    one order: pools built from two orders have the same backends at the
    same places, choose the same backend for 10,000 keys, and the same
    sequence for requests without a key (the weighted round robin fallback)."""
    from fastlb.balance.discovery import backend, canonical

    found = [backend(f"10.0.{i // 250}.{i % 250 + 1}", 8000 + i % 3, weight=1 + i % 4)
             for i in range(40)]
    a, b = found[:], found[:]
    random.Random(1).shuffle(a)
    random.Random(2).shuffle(b)
    assert a != b
    pa, pb = _pool_of(canonical(a)), _pool_of(canonical(b))
    assert [x.address for x in pa.backends] == [x.address for x in pb.backends]
    keys = [b"user-%d" % i for i in range(10000)]
    picks_a = [pa.backends[pa.balancer.select(k)].address for k in keys]
    picks_b = [pb.backends[pb.balancer.select(k)].address for k in keys]
    assert picks_a == picks_b
    assert len(set(picks_a)) == 40
    seq_a = [pa.backends[pa.fallback.select()].address for _ in range(200)]
    seq_b = [pb.backends[pb.fallback.select()].address for _ in range(200)]
    assert seq_a == seq_b
    # one backend per address: the same address twice keeps the lowest
    # priority, then the highest weight
    dup = canonical([backend("10.0.0.1", 80, weight=1, priority=2),
                     backend("10.0.0.1", 80, weight=5, priority=1),
                     backend("10.0.0.1", 80, weight=9, priority=1)])
    assert dup == (BackendConfig("http://10.0.0.1:80", "10.0.0.1", 80, 9, 1),)


def test_priority_gate_uses_the_lowest_group_with_a_live_backend():
    from fastlb.selection import PriorityGate, make_balancer

    for algorithm in ("round-robin", "weighted-round-robin", "least-conn", "p2c", "random",
                      "maglev"):
        names = [b"a:1", b"b:1", b"c:1", b"d:1"]
        weights = [1, 1, 1, 0]
        sel = make_balancer(algorithm, weights, names)
        gate = PriorityGate(sel, [10, 10, 20, 5], weights)

        def chosen():
            out = set()
            for i in range(200):
                idx = sel.select(b"k%d" % i) if algorithm == "maglev" else sel.select()
                if idx >= 0:
                    out.add(idx)
                    sel.release(idx)
            return out

        # d (priority 5) has weight 0: its group has no live backend
        assert chosen() == {0, 1}, algorithm
        gate.set_eligible(0, False)
        assert chosen() == {1}, algorithm
        gate.set_eligible(1, False)
        assert chosen() == {2}, algorithm
        assert not gate.is_eligible(1) and gate.is_eligible(2)
        gate.set_eligible(1, True)
        assert chosen() == {1}, algorithm
        gate.set_weight(3, 1)       # d is live now: the lowest group
        assert chosen() == {3}, algorithm
        gate.set_eligible(3, False)
        gate.set_eligible(1, False)
        gate.set_eligible(2, False)
        assert chosen() == set(), algorithm


# ---------------------------------------------------------------- DNS SRV

@needs_dnsmasq
def test_srv_weights_priorities_and_changed_records(tmp_path, make_backend, make_dnsmasq,
                                                    lbs):
    """SRV weights are the pool's weights within the lowest priority; a
    higher priority is not used while the lowest has an eligible backend;
    records changed in DNS (dnsmasq restarted) are followed within the TTL
    (1 s here), though the interval is 60 s."""
    a, b, c, d = (make_backend(n, handler=named) for n in "ABCD")
    dns = make_dnsmasq(srv_records(SRV, [(HOST, a.port, 10, 1), (HOST, b.port, 10, 3),
                                         (HOST, c.port, 20, 5)]), ttl=1)
    lb, log = start_lb(tmp_path, config_text(
        f'discovery = {{ dns_srv = "{SRV}", interval = 60, resolver = "{dns.resolver}" }}',
        "weighted-round-robin"))
    lbs.append(lb)
    assert answers(lb.port, 400) == {"A": 100, "B": 300}
    dns.restart(srv_records(SRV, [(HOST, a.port, 10, 1), (HOST, d.port, 10, 1),
                                  (HOST, c.port, 20, 5)]))
    assert wait_for(lambda: serves(lb.port, "AD", 20), 10)
    assert answers(lb.port, 400) == {"A": 200, "D": 200}
    assert log.wait("backends +1 -1")


@needs_dnsmasq
def test_srv_higher_priority_serves_while_the_lowest_is_down(tmp_path, make_backend,
                                                             make_dnsmasq, lbs):
    """With active checks, when every backend of priority 10 is DOWN, the
    priority 20 group serves; once one is UP again, it serves alone again."""
    sick = threading.Event()

    def primary(be, req):
        if sick.is_set():
            return ok_response(b"sick").replace(b"200 OK", b"503 Service Unavailable")
        return named(be, req)

    a = make_backend("A", handler=primary)
    b = make_backend("B", handler=primary)
    c = make_backend("C", handler=named)
    dns = make_dnsmasq(srv_records(SRV, [(HOST, a.port, 10, 1), (HOST, b.port, 10, 1),
                                         (HOST, c.port, 20, 1)]), ttl=60)
    lb, log = start_lb(tmp_path, config_text(
        f'discovery = {{ dns_srv = "{SRV}", resolver = "{dns.resolver}" }}',
        extra="[pools.app.health]\npath = \"/health\"\ninterval = 0.1\nrise = 1\nfall = 1\n"
              "eject_after = 0\n"))
    lbs.append(lb)
    assert answers(lb.port, 20) == {"A": 10, "B": 10}
    sick.set()
    assert wait_for(lambda: answers(lb.port, 20) == {"C": 20}, 10)
    sick.clear()
    assert wait_for(lambda: answers(lb.port, 20) == {"A": 10, "B": 10}, 10)


@needs_dnsmasq
def test_srv_failure_keeps_the_last_set(tmp_path, make_backend, make_dnsmasq, lbs):
    """The DNS server gone (lookups time out) and then an answer with no
    records (NXDOMAIN): the pool keeps its backends and serves; the next
    good answer is applied."""
    a, b, c = (make_backend(n, handler=named) for n in "ABC")
    dns = make_dnsmasq(srv_records(SRV, [(HOST, a.port, 1, 1), (HOST, b.port, 1, 1)]), ttl=1)
    lb, log = start_lb(tmp_path, config_text(
        f'discovery = {{ dns_srv = "{SRV}", interval = 1, resolver = "{dns.resolver}" }}'))
    lbs.append(lb)
    assert answers(lb.port, 20) == {"A": 10, "B": 10}
    dns.stop()
    assert log.wait("DNS lookup failed", 10)
    end = time.monotonic() + 2
    while time.monotonic() < end:
        assert answers(lb.port, 10) == {"A": 5, "B": 5}
    # an answer, but no records: not applied either
    dns.restart([f"host-record=other.app.test,{HOST}"])
    assert log.wait("answers again", 10)
    assert log.wait("lists no backend: keeping its 2 backends", 10)
    assert answers(lb.port, 20) == {"A": 10, "B": 10}
    assert log.text().count("DNS lookup failed") == 1    # once per episode
    dns.restart(srv_records(SRV, [(HOST, a.port, 1, 1), (HOST, c.port, 1, 1)]))
    assert wait_for(lambda: answers(lb.port, 20) == {"A": 10, "C": 10}, 10)


@needs_dnsmasq
def test_srv_interval_is_the_ceiling_of_the_ttl(tmp_path, make_backend, make_dnsmasq, lbs):
    """Records with an hour's TTL are looked up again after ``interval`` (1 s)."""
    a, b = (make_backend(n, handler=named) for n in "AB")
    dns = make_dnsmasq(srv_records(SRV, [(HOST, a.port, 1, 1)]), ttl=3600)
    lb, log = start_lb(tmp_path, config_text(
        f'discovery = {{ dns_srv = "{SRV}", interval = 1, resolver = "{dns.resolver}" }}'))
    lbs.append(lb)
    assert answers(lb.port, 10) == {"A": 10}
    dns.restart(srv_records(SRV, [(HOST, b.port, 1, 1)]))
    assert wait_for(lambda: answers(lb.port, 10) == {"B": 10}, 10)


@needs_dnsmasq
def test_srv_pool_starts_before_its_backends_are_found(tmp_path, make_backend, make_dnsmasq,
                                                       lbs):
    """A pool with discovery and no backends in the file, whose name has no
    records yet, answers 503 (with Retry-After) until they are there."""
    a = make_backend("A", handler=named)
    dns = make_dnsmasq([f"host-record=other.app.test,{HOST}"], ttl=1)
    lb, log = start_lb(tmp_path, config_text(
        f'discovery = {{ dns_srv = "{SRV}", interval = 1, resolver = "{dns.resolver}" }}'))
    lbs.append(lb)
    assert "has found no backend yet" in log.text()
    assert answers(lb.port, 3) == {"status 503": 1}      # and the connection closes
    dns.restart(srv_records(SRV, [(HOST, a.port, 1, 1)]))
    assert wait_for(lambda: answers(lb.port, 5) == {"A": 5}, 10)


# ---------------------------------------------------------------- etcd

PREFIX = "/services/app/"


def etcd_pool(endpoint, prefix=PREFIX):
    return f'discovery = {{ etcd = ["{endpoint}"], prefix = "{prefix}" }}'


@needs_etcd
def test_etcd_backends_added_and_removed_under_load(tmp_path, etcd, make_backend,
                                                    backend_loop, lbs):
    """Backends added and removed in etcd while clients keep sending: not
    one request fails, traffic follows the changes, and a request in flight
    on a removed backend finishes there."""
    slow = {}       # backend name -> its connection holding a /slow request

    def on_head(conn, req):
        if req.target == "/slow":
            slow[conn.be.name] = conn

    def handler(be, req):
        if req.target == "/slow":
            from helpers import HANG
            return HANG
        return named(be, req)

    a, b, c = (make_backend(n, handler=handler, on_head=on_head) for n in "ABC")
    put_backend(etcd, PREFIX, a)
    put_backend(etcd, PREFIX, b)
    lb, log = start_lb(tmp_path, config_text(etcd_pool(etcd.url)))
    lbs.append(lb)
    assert answers(lb.port, 20) == {"A": 10, "B": 10}

    import httpx

    stop = threading.Event()
    results = []

    def load():
        got = Counter()
        with httpx.Client(base_url=lb.url, timeout=10) as client:
            for _ in range(20000):
                if stop.is_set():
                    break
                r = client.get("/")
                got[r.text if r.status_code == 200 else f"status {r.status_code}"] += 1
        results.append(got)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        put_backend(etcd, PREFIX, c)
        assert wait_for(lambda: serves(lb.port, "ABC", 30), 5)
        # a request in flight on the backend about to go
        slow_result = []
        t_slow = threading.Thread(target=lambda: slow_result.append(
            httpx.get(lb.url + "/slow", timeout=20)))
        t_slow.start()
        assert wait_for(lambda: len(slow) == 1, 5)
        (gone,) = slow
        etcd.delete(PREFIX + gone)
        rest = "".join(sorted(set("ABC") - {gone}))
        assert wait_for(lambda: serves(lb.port, rest, 30), 5)
        assert log.wait(f"backends +0 -1")
        time.sleep(0.3)         # the load goes on without it
        conn = slow[gone]
        backend_loop.call_soon(conn.transport.write, ok_response(b"slow " + gone.encode()))
        t_slow.join(10)
        assert slow_result and slow_result[0].status_code == 200
        assert slow_result[0].text == f"slow {gone}"
        put_backend(etcd, PREFIX, {"A": a, "B": b, "C": c}[gone])
        assert wait_for(lambda: serves(lb.port, "ABC", 30), 5)
        etcd.delete(PREFIX + rest[0])
        assert wait_for(lambda: serves(lb.port, "".join(sorted(set("ABC") - {rest[0]})),
                                       30), 5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    total = sum(results, Counter())
    assert [k for k in total if not k.isalpha()] == [], total      # not one failure
    assert set(total) == set("ABC") and sum(total.values()) > 300, total


@needs_etcd
def test_etcd_disconnects_restarts_and_compaction(tmp_path, etcd, make_backend, make_gate,
                                                  lbs):
    """The watch through a gate that a test can cut: a change made while
    fastlb is away is seen when the watch resumes (from the next revision,
    without reading everything again); etcd stopped: serving goes on, and
    after its restart the watch resumes and sees the changes made meanwhile
    and after; a resume from a revision compacted away reads everything
    again."""
    a, b, c, d, e = (make_backend(n, handler=named) for n in "ABCDE")
    gate = make_gate(etcd.port)
    put_backend(etcd, PREFIX, a)
    lb, log = start_lb(tmp_path, config_text(etcd_pool(gate.url)))
    lbs.append(lb)
    assert answers(lb.port, 10) == {"A": 10}

    # away: a change made meanwhile is seen on the resume
    gate.block()
    rev_b = put_backend(etcd, PREFIX, b)
    assert log.wait("etcd: ", 5)
    assert answers(lb.port, 10) == {"A": 10}
    gate.unblock()
    assert wait_for(lambda: serves(lb.port, "AB", 10), 10)
    assert log.wait(f"watching again from revision {rev_b}", 5)

    # etcd stopped: fastlb serves what it has
    etcd.stop()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert answers(lb.port, 10) == {"A": 5, "B": 5}
    gate.block()
    etcd.start()
    rev_c = put_backend(etcd, PREFIX, c)    # while fastlb is still away
    gate.unblock()
    assert wait_for(lambda: serves(lb.port, "ABC", 30), 10)
    assert log.wait(f"watching again from revision {rev_c}", 5)
    put_backend(etcd, PREFIX, d)            # right after it is back
    assert wait_for(lambda: serves(lb.port, "ABCD", 40), 5)
    assert "reading it all again" not in log.text()

    # a compaction while away: everything is read again
    gate.block()
    etcd.delete(PREFIX + "A")
    rev = put_backend(etcd, PREFIX, e)
    etcd.compact(rev)
    gate.unblock()
    assert wait_for(lambda: serves(lb.port, "BCDE", 40), 10)
    assert log.wait("was compacted", 5) and log.wait("reading it all again", 5)


@needs_etcd
def test_etcd_invalid_values_are_left_out(tmp_path, etcd, make_backend, lbs):
    a, b = (make_backend(n, handler=named) for n in "AB")
    put_backend(etcd, PREFIX, a, weight=3)
    etcd.put(PREFIX + "bad", "not a url")
    etcd.put(PREFIX + "weight", json.dumps({"url": f"http://{HOST}:{b.port}", "weight": -1}))
    lb, log = start_lb(tmp_path, config_text(etcd_pool(etcd.url)))
    lbs.append(lb)
    assert answers(lb.port, 10) == {"A": 10}
    assert a.connections == 1       # pooled, reused
    text = log.text()
    assert f"etcd key {PREFIX}bad: 'not a url': no scheme" in text
    assert f"etcd key {PREFIX}weight: weight: must be at least 0, got -1: left out" in text
    put_backend(etcd, PREFIX, b)
    assert wait_for(lambda: serves(lb.port, "AB", 8), 5)
    # A is the same backend to the new pool: its pooled connection goes on
    assert a.connections == 1
    # every key deleted: not applied, the last set stays
    etcd.delete(PREFIX, prefix=True)
    assert log.wait("lists no backend: keeping its 2 backends", 5)
    assert answers(lb.port, 10) == {"A": 5, "B": 5}


CONFIG_KEY = "/fastlb/config.toml"


@needs_etcd
def test_configuration_from_etcd(tmp_path, etcd, make_backend, lbs):
    """``--config etcd://HOST:PORT/KEY``: each valid new value is applied as a
    reload; an invalid one is logged and ignored; pools of the new value get
    their discovery started."""
    a, b, c = (make_backend(n, handler=named) for n in "ABC")
    url = f"etcd://{HOST}:{etcd.port}{CONFIG_KEY}"

    def static(be):
        return config_text(f'backends = ["http://{HOST}:{be.port}"]')

    etcd.put(CONFIG_KEY, static(a))
    r = run_fastlb("check-config", url)
    assert (r.returncode, r.stdout) == (0, f"{url}: OK (1 listener, 1 pool, 0 routes, "
                                           "1 backend)\n")
    lb = FastlbProcess(None, "--config", url)
    lbs.append(lb)
    log = LogWatch(lb)
    assert answers(lb.port, 5) == {"A": 5}
    rev = etcd.put(CONFIG_KEY, static(b).replace('algorithm = "round-robin"',
                                                 'algorithm = "fastest"'))
    assert log.wait(f"configuration in {url} (revision {rev}) refused, the running "
                    "configuration is unchanged", 5)
    assert (f'{url}:6: pools.app.algorithm: expected one of round-robin, '
            'weighted-round-robin, least-conn, p2c, random, maglev, got "fastest"') in log.text()
    assert answers(lb.port, 5) == {"A": 5}
    etcd.put(CONFIG_KEY, static(b))
    assert wait_for(lambda: answers(lb.port, 5) == {"B": 5}, 5)
    assert log.wait("reloaded from the configuration in", 5)
    # now its pool's backends come from etcd too
    put_backend(etcd, PREFIX, c)
    etcd.put(CONFIG_KEY, config_text(etcd_pool(etcd.url)))
    assert wait_for(lambda: answers(lb.port, 5) == {"C": 5}, 5)
    r = run_fastlb("check-config", f"etcd://{HOST}:{free_dead_port()}{CONFIG_KEY}")
    assert r.returncode == 1 and "cannot read the configuration from etcd://" in r.stdout


@needs_etcd
def test_etcd_discovery_with_workers_runs_in_the_master(tmp_path, etcd, make_backend,
                                                        make_gate, lbs):
    """``--workers 2``: one watch (the master's), and each change is a new
    generation of workers."""
    a, b = (make_backend(n, handler=named) for n in "AB")
    gate = make_gate(etcd.port)
    put_backend(etcd, PREFIX, a)
    lb, log = start_lb(tmp_path, config_text(etcd_pool(gate.url)), "--workers", "2")
    lbs.append(lb)
    assert answers(lb.port, 10) == {"A": 10}
    # one long-lived connection to etcd: the master's watch (a worker's would be more)
    assert fewest_connections(gate) == 1
    put_backend(etcd, PREFIX, b)
    assert wait_for(lambda: serves(lb.port, "AB", 10, reconnect=True), 15)
    assert log.wait("generation 2 serves")
    etcd.delete(PREFIX + "A")
    assert wait_for(lambda: answers(lb.port, 10, reconnect=True) == {"B": 10}, 15)
    assert log.wait("generation 3 serves")
    assert fewest_connections(gate) == 1


def fewest_connections(gate, looks=10):
    """The fewest connections open through ``gate`` over a few looks (a
    probe beside a watch is short-lived)."""
    out = []
    for _ in range(looks):
        out.append(gate.open_connections())
        time.sleep(0.05)
    return min(out)
