"""Micro benchmarks of the per-request core, the pure and the compiled twin side by side.

Run: ``python -m pytest bench/test_bench_core.py --benchmark-only --benchmark-group-by=func``.
Each benchmarked call loops N times, so per-operation cost = time / N.
"""
from fastlb.errors import BODY_LENGTH, BODY_NONE, KEY_COOKIE, REQ_KEEP_ALIVE

N_SELECT = 1000
N_HEAD = 100
N_SCAN = 100


def test_round_robin_select(benchmark, core):
    """Benchmark 1000 calls to RoundRobin.select over 4 backends."""
    rr = core.RoundRobin([1, 1, 1, 1])
    select = rr.select

    def run():
        for _ in range(N_SELECT):
            select()

    benchmark(run)
    assert {rr.select() for _ in range(4)} == {0, 1, 2, 3}


def test_parse_write_request_head(benchmark, core, request_head):
    """Benchmark 100 calls to parse_request_head + write_request_head on a 9-header browser request."""
    parse = core.parse_request_head
    write = core.write_request_head

    def run():
        for _ in range(N_HEAD):
            write(parse(request_head), b"10.1.2.3", b"http", b"fastlb", b"127.0.0.1:8000")

    benchmark(run)
    r = parse(request_head)
    out = write(r, b"10.1.2.3", b"http", b"fastlb", b"127.0.0.1:8000")
    assert r.flags & REQ_KEEP_ALIVE and r.framing == BODY_NONE and r.length == 0
    assert b"X-Forwarded-For: 10.1.2.3\r\n" in out and b"Connection" not in out


def test_parse_request_head_cookie_key(benchmark, core, request_head):
    """Benchmark 100 calls to parse_request_head taking a cookie as the hash key."""
    parse = core.parse_request_head

    def run():
        for _ in range(N_HEAD):
            parse(request_head, KEY_COOKIE, b"sessionid")

    benchmark(run)
    assert parse(request_head, KEY_COOKIE, b"sessionid").key == b"8f3a2c1e9b7d4f6a"


def test_rewrite_response_head(benchmark, core, response_head):
    """Benchmark 100 calls to rewrite_response_head on a 5-header 200 response."""
    rewrite = core.rewrite_response_head

    def run():
        for _ in range(N_HEAD):
            rewrite(response_head, REQ_KEEP_ALIVE)

    benchmark(run)
    out, status, flags, framing, length = rewrite(response_head, REQ_KEEP_ALIVE)
    assert status == 200 and framing == BODY_LENGTH and length == 1234


def test_chunked_scan(benchmark, core, chunked_body):
    """Benchmark 100 calls to ChunkedScanner.scan (a fresh scanner each) on a 3-chunk body."""
    Scanner = core.ChunkedScanner

    def run():
        for _ in range(N_SCAN):
            Scanner().scan(chunked_body)

    benchmark(run)
    assert Scanner().scan(chunked_body) == len(chunked_body)


# ---------------------------------------------------------------- balancing algorithms
#
# One benchmark per algorithm: 1000 picks per benchmarked call, each a
# select() and the release() that ends the request (the data path's cost per
# request), over 4 backends of weights 1, 1, 2, 3 (Maglev: 10 backends,
# table 65537, a different 16-byte key per pick).

BALANCER_WEIGHTS = [1, 1, 2, 3]
MAGLEV_NAMES = [b"10.0.0.%d:8080" % i for i in range(10)]
MAGLEV_KEYS = [b"session-%08d" % i for i in range(N_SELECT)]


def _bench_picks(benchmark, balancer, keyed=False):
    select = balancer.select
    release = balancer.release
    if keyed:
        keys = MAGLEV_KEYS

        def run():
            for k in keys:
                release(select(k))
    else:
        rng = range(N_SELECT)

        def run():
            for _ in rng:
                release(select())

    benchmark(run)
    assert all(balancer.in_flight(i) == 0 for i in range(balancer.n))
    got = select(MAGLEV_KEYS[0]) if keyed else select()
    assert 0 <= got < balancer.n


def test_algo_round_robin(benchmark, core):
    """1000 x RoundRobin select + release, 4 backends."""
    _bench_picks(benchmark, core.RoundRobin(BALANCER_WEIGHTS))


def test_algo_weighted_round_robin(benchmark, core):
    """1000 x WeightedRoundRobin (smooth) select + release, 4 backends."""
    _bench_picks(benchmark, core.WeightedRoundRobin(BALANCER_WEIGHTS))


def test_algo_least_conn(benchmark, core):
    """1000 x LeastConn select + release, 4 backends."""
    _bench_picks(benchmark, core.LeastConn(BALANCER_WEIGHTS))


def test_algo_p2c(benchmark, core):
    """1000 x P2C select + release, 4 backends."""
    _bench_picks(benchmark, core.P2C(BALANCER_WEIGHTS, seed=1))


def test_algo_random(benchmark, core):
    """1000 x weighted Random select + release, 4 backends."""
    _bench_picks(benchmark, core.Random(BALANCER_WEIGHTS, seed=1))


def test_algo_maglev(benchmark, core):
    """1000 x Maglev select(key) + release, 10 backends, table 65537, 16-byte keys."""
    _bench_picks(benchmark, core.Maglev([1] * 10, MAGLEV_NAMES), keyed=True)


def test_algo_maglev_bounded(benchmark, core):
    """As test_algo_maglev with balance_factor=1.25 (bounded load)."""
    _bench_picks(benchmark, core.Maglev([1] * 10, MAGLEV_NAMES, balance_factor=1.25), keyed=True)


# ---------------------------------------------------------------- picks as the data path makes them
#
# The same algorithms and backends, 1000 picks per benchmarked call, but the
# loop is ``pick_many(sel, 1000, key)``: in the compiled core a C loop calling
# the cpdef Selector.select/release through the vtable (how the compiled data
# path calls them), in the pure core a plain Python loop. Maglev: one fixed
# 16-byte key.

MAGLEV_KEY = MAGLEV_KEYS[0]


def _bench_pick_many(benchmark, core, balancer, key=b""):
    pick_many = core.pick_many
    total = benchmark(pick_many, balancer, N_SELECT, key)
    assert all(balancer.in_flight(i) == 0 for i in range(balancer.n))
    assert 0 <= total <= N_SELECT * (balancer.n - 1)


def test_pick_round_robin(benchmark, core):
    """pick_many(RoundRobin, 1000), 4 backends."""
    rr = core.RoundRobin(BALANCER_WEIGHTS)
    _bench_pick_many(benchmark, core, rr)
    assert core.pick_many(rr, 4) == 0 + 1 + 2 + 3


def test_pick_weighted_round_robin(benchmark, core):
    """pick_many(WeightedRoundRobin, 1000), 4 backends."""
    _bench_pick_many(benchmark, core, core.WeightedRoundRobin(BALANCER_WEIGHTS))


def test_pick_least_conn(benchmark, core):
    """pick_many(LeastConn, 1000), 4 backends."""
    _bench_pick_many(benchmark, core, core.LeastConn(BALANCER_WEIGHTS))


def test_pick_p2c(benchmark, core):
    """pick_many(P2C, 1000), 4 backends."""
    _bench_pick_many(benchmark, core, core.P2C(BALANCER_WEIGHTS, seed=1))


def test_pick_random(benchmark, core):
    """pick_many(Random, 1000), 4 backends."""
    _bench_pick_many(benchmark, core, core.Random(BALANCER_WEIGHTS, seed=1))


def test_pick_maglev(benchmark, core):
    """pick_many(Maglev, 1000, key), 10 backends, table 65537, one 16-byte key."""
    _bench_pick_many(benchmark, core, core.Maglev([1] * 10, MAGLEV_NAMES), MAGLEV_KEY)


def test_pick_maglev_bounded(benchmark, core):
    """As test_pick_maglev with balance_factor=1.25 (bounded load)."""
    _bench_pick_many(benchmark, core, core.Maglev([1] * 10, MAGLEV_NAMES, balance_factor=1.25),
                     MAGLEV_KEY)


# ---------------------------------------------------------------- retries: select_excluding
#
# The pick of a retry: select_excluding({1}) (backend 1 failed this request)
# and its release, 1000 per benchmarked call, same algorithms and backends as
# above. First as Python calls, then as pick_many(sel, 1000, key, {1}), the C
# loop calling the cpdef Selector.select_excluding/release as the compiled
# data path does. Compare with test_algo_* / test_pick_* for select.

EXCLUDE = {1}


def _bench_retry_picks(benchmark, balancer, keyed=False):
    select_excluding = balancer.select_excluding
    release = balancer.release
    ex = EXCLUDE
    if keyed:
        keys = MAGLEV_KEYS

        def run():
            for k in keys:
                release(select_excluding(ex, k))
    else:
        rng = range(N_SELECT)

        def run():
            for _ in rng:
                release(select_excluding(ex))

    benchmark(run)
    assert all(balancer.in_flight(i) == 0 for i in range(balancer.n))
    got = select_excluding(ex, MAGLEV_KEYS[0]) if keyed else select_excluding(ex)
    assert 0 <= got < balancer.n and got not in ex


def test_retry_round_robin(benchmark, core):
    """1000 x RoundRobin select_excluding({1}) + release, 4 backends."""
    _bench_retry_picks(benchmark, core.RoundRobin(BALANCER_WEIGHTS))


def test_retry_weighted_round_robin(benchmark, core):
    """1000 x WeightedRoundRobin select_excluding({1}) + release, 4 backends."""
    _bench_retry_picks(benchmark, core.WeightedRoundRobin(BALANCER_WEIGHTS))


def test_retry_least_conn(benchmark, core):
    """1000 x LeastConn select_excluding({1}) + release, 4 backends."""
    _bench_retry_picks(benchmark, core.LeastConn(BALANCER_WEIGHTS))


def test_retry_p2c(benchmark, core):
    """1000 x P2C select_excluding({1}) + release, 4 backends."""
    _bench_retry_picks(benchmark, core.P2C(BALANCER_WEIGHTS, seed=1))


def test_retry_random(benchmark, core):
    """1000 x weighted Random select_excluding({1}) + release, 4 backends."""
    _bench_retry_picks(benchmark, core.Random(BALANCER_WEIGHTS, seed=1))


def test_retry_maglev(benchmark, core):
    """1000 x Maglev select_excluding({1}, key) + release, 10 backends, 16-byte keys."""
    _bench_retry_picks(benchmark, core.Maglev([1] * 10, MAGLEV_NAMES), keyed=True)


def _bench_pick_many_excluding(benchmark, core, balancer, key=b""):
    pick_many = core.pick_many
    total = benchmark(pick_many, balancer, N_SELECT, key, EXCLUDE)
    assert all(balancer.in_flight(i) == 0 for i in range(balancer.n))
    assert 0 <= total <= N_SELECT * (balancer.n - 1)


def test_pick_excluding_round_robin(benchmark, core):
    """pick_many(RoundRobin, 1000, exclude={1}), 4 backends."""
    rr = core.RoundRobin(BALANCER_WEIGHTS)
    _bench_pick_many_excluding(benchmark, core, rr)
    assert core.pick_many(rr, 3, b"", EXCLUDE) == 0 + 2 + 3


def test_pick_excluding_weighted_round_robin(benchmark, core):
    """pick_many(WeightedRoundRobin, 1000, exclude={1}), 4 backends."""
    _bench_pick_many_excluding(benchmark, core, core.WeightedRoundRobin(BALANCER_WEIGHTS))


def test_pick_excluding_least_conn(benchmark, core):
    """pick_many(LeastConn, 1000, exclude={1}), 4 backends."""
    _bench_pick_many_excluding(benchmark, core, core.LeastConn(BALANCER_WEIGHTS))


def test_pick_excluding_p2c(benchmark, core):
    """pick_many(P2C, 1000, exclude={1}), 4 backends."""
    _bench_pick_many_excluding(benchmark, core, core.P2C(BALANCER_WEIGHTS, seed=1))


def test_pick_excluding_random(benchmark, core):
    """pick_many(Random, 1000, exclude={1}), 4 backends."""
    _bench_pick_many_excluding(benchmark, core, core.Random(BALANCER_WEIGHTS, seed=1))


def test_pick_excluding_maglev(benchmark, core):
    """pick_many(Maglev, 1000, key, exclude={1}), 10 backends, table 65537, one 16-byte key."""
    _bench_pick_many_excluding(benchmark, core, core.Maglev([1] * 10, MAGLEV_NAMES), MAGLEV_KEY)


def test_hash_key_cookie(benchmark, core, request_head):
    """Benchmark 100 calls to hash_key(head, "cookie", b"sessionid") on the browser request."""
    hash_key = core.hash_key

    def run():
        for _ in range(N_HEAD):
            hash_key(request_head, "cookie", b"sessionid")

    benchmark(run)
    assert hash_key(request_head, "cookie", b"sessionid") == b"8f3a2c1e9b7d4f6a"
