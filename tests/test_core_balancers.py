"""The selectors (and hash_key, the registry), on both cores (the ``core`` fixture).

Maglev has its own file, test_core_maglev.py.
"""
import collections
import itertools

import pytest

from fastlb import errors, selection


def picks(rr, k):
    return [rr.select() for _ in range(k)]


def test_order(core):
    rr = core.RoundRobin([1, 1, 1])
    assert rr.n == 3
    assert picks(rr, 7) == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("seed,first", [(0, 0), (1, 1), (5, 2), (-1, 2), (3 * 10**20 + 1, 1)])
def test_seed_offset(core, seed, first):
    rr = core.RoundRobin([1, 1, 1], seed=seed)
    assert picks(rr, 4) == [first, (first + 1) % 3, (first + 2) % 3, first]


def test_key_ignored(core):
    rr = core.RoundRobin([1, 1])
    assert [rr.select(b"k"), rr.select(key=b"other")] == [0, 1]


def test_ineligible_skipped(core):
    rr = core.RoundRobin([1, 1, 1, 1])
    rr.set_eligible(1, False)
    assert not rr.is_eligible(1) and rr.is_eligible(0)
    assert picks(rr, 6) == [0, 2, 3, 0, 2, 3]
    rr.set_eligible(1, True)
    assert rr.is_eligible(1) is True
    assert picks(rr, 4) == [0, 1, 2, 3]


def test_none_eligible(core):
    rr = core.RoundRobin([1, 1])
    rr.set_eligible(0, 0)
    rr.set_eligible(1, [])
    assert rr.select() == -1
    assert rr.select() == -1
    rr.set_eligible(1, 1)
    assert rr.select() == 1


def test_weight_zero_never_picked(core):
    rr = core.RoundRobin([0, 2, 0, 1.5])
    assert picks(rr, 6) == [1, 3, 1, 3, 1, 3]
    assert rr.is_eligible(0)
    rr.set_eligible(1, False)
    rr.set_eligible(3, False)
    assert rr.select() == -1
    assert core.RoundRobin([0, 0]).select() == -1


def test_single_backend(core):
    rr = core.RoundRobin([1])
    assert picks(rr, 3) == [0, 0, 0]


def test_release_does_not_change_rotation(core):
    rr = core.RoundRobin([1, 1])
    rr.select()
    rr.release(0)
    assert rr.select() == 1


def test_empty(core):
    with pytest.raises(ValueError):
        core.RoundRobin([])


@pytest.mark.parametrize("idx", [-1, 3, 10**30, -(10**30)])
def test_index_errors(core, idx):
    rr = core.RoundRobin([1, 1, 1])
    with pytest.raises(IndexError, match="backend index out of range"):
        rr.set_eligible(idx, True)
    with pytest.raises(IndexError, match="backend index out of range"):
        rr.is_eligible(idx)


def test_large_pool(core):
    n = 1000
    rr = core.RoundRobin([1] * n, seed=7)
    for i in range(0, n, 2):
        rr.set_eligible(i, False)
    got = picks(rr, n)
    assert got[:3] == [7, 9, 11]
    assert sorted(set(got)) == list(range(1, n, 2))


# ---------------------------------------------------------------- common surface

NON_HASHED = ["RoundRobin", "WeightedRoundRobin", "LeastConn", "P2C", "Random"]
ALL = NON_HASHED + ["Maglev"]


def make(core, cls, weights, seed=0):
    if cls == "Maglev":
        names = [b"10.0.0.%d:80" % i for i in range(len(weights))]
        return core.Maglev(weights, names, seed, table_size=251)
    return getattr(core, cls)(weights, seed)


def sel(b, cls, i=0):
    return b.select(b"key-%d" % i) if cls == "Maglev" else b.select()


@pytest.mark.parametrize("cls", ALL)
def test_in_flight_counting(core, cls):
    b = make(core, cls, [1, 2, 3])
    got = [sel(b, cls, i) for i in range(30)]
    assert all(0 <= g < 3 for g in got)
    counts = collections.Counter(got)
    assert [b.in_flight(i) for i in range(3)] == [counts[i] for i in range(3)]
    for g in got:
        b.release(g)
    assert [b.in_flight(i) for i in range(3)] == [0, 0, 0]
    b.release(0)  # never below 0
    assert b.in_flight(0) == 0


@pytest.mark.parametrize("cls", ALL)
def test_acquire_counts_like_a_select(core, cls):
    """acquire (a request moved here by a reload) counts as a selected one:
    least-conn then avoids that backend, and release undoes it."""
    b = make(core, cls, [1, 1, 1])
    b.acquire(1)
    b.acquire(1)
    assert [b.in_flight(i) for i in range(3)] == [0, 2, 0]
    if cls == "LeastConn":
        assert {b.select() for _ in range(2)} == {0, 2}
        b.release(0)
        b.release(2)
    b.release(1)
    b.release(1)
    assert [b.in_flight(i) for i in range(3)] == [0, 0, 0]
    with pytest.raises(IndexError):
        b.acquire(3)


@pytest.mark.parametrize("cls", ALL)
def test_surface_errors(core, cls):
    b = make(core, cls, [1, 1, 1])
    assert b.n == 3
    for idx in (-1, 3, 10**30):
        for fn, args in ((b.release, ()), (b.in_flight, ()), (b.is_eligible, ()),
                         (b.set_eligible, (True,)), (b.set_weight, (1,))):
            with pytest.raises(IndexError, match="backend index out of range"):
                fn(idx, *args)
    with pytest.raises(ValueError, match="weight must be between 0 and 1000000, got -1"):
        b.set_weight(0, -1)
    with pytest.raises(ValueError, match="got 1000001"):
        b.set_weight(0, 1000001)
    with pytest.raises(TypeError, match="weight must be an integer, got 1.5"):
        b.set_weight(0, 1.5)
    with pytest.raises(ValueError, match="at least one backend"):
        make(core, cls, [])


@pytest.mark.parametrize("cls", [c for c in ALL if c != "RoundRobin"])
def test_constructor_weights_checked(core, cls):
    with pytest.raises(TypeError, match="weight must be an integer"):
        make(core, cls, [1, 1.5])
    with pytest.raises(ValueError, match="weight must be between"):
        make(core, cls, [1, -2])


@pytest.mark.parametrize("cls", ALL)
def test_eligibility_and_zero_weight(core, cls):
    b = make(core, cls, [1, 0, 1, 1])
    for i in range(40):
        assert sel(b, cls, i) in (0, 2, 3)
    b.set_eligible(2, False)
    assert not b.is_eligible(2) and b.is_eligible(1)
    for i in range(40):
        assert sel(b, cls, i) in (0, 3)
    b.set_weight(1, 5)
    b.set_eligible(0, False)
    b.set_eligible(3, False)
    assert {sel(b, cls, i) for i in range(40)} == {1}
    b.set_weight(1, 0)
    assert sel(b, cls) == -1
    b.set_eligible(2, True)
    assert {sel(b, cls, i) for i in range(40)} == {2}


@pytest.mark.parametrize("cls", ALL)
def test_all_zero(core, cls):
    b = make(core, cls, [0, 0])
    assert sel(b, cls) == -1
    b.set_weight(1, 3)
    assert sel(b, cls) == 1


@pytest.mark.parametrize("cls", NON_HASHED)
def test_key_ignored(core, cls):
    a, b = make(core, cls, [1, 2, 3], seed=4), make(core, cls, [1, 2, 3], seed=4)
    assert [a.select() for _ in range(20)] == [b.select(b"k%d" % i) for i in range(20)]


# ---------------------------------------------------------------- round robin

def test_rr_set_weight(core):
    rr = core.RoundRobin([1, 1, 1])
    rr.set_weight(1, 0)
    assert picks(rr, 4) == [0, 2, 0, 2]
    rr.set_weight(1, 7)
    assert picks(rr, 3) == [0, 1, 2]


# ---------------------------------------------------------------- smooth WRR

def test_wrr_nginx_sequence(core):
    w = core.WeightedRoundRobin([5, 1, 1])
    assert picks(w, 14) == [0, 0, 1, 0, 2, 0, 0] * 2


def test_wrr_shares(core):
    w = core.WeightedRoundRobin([3, 2, 1, 0])
    got = picks(w, 600)
    c = collections.Counter(got)
    assert (c[0], c[1], c[2], c[3]) == (300, 200, 100, 0)
    # smooth: the heaviest backend never gets more than 2 picks in a row here
    assert max(len(list(g)) for _, g in itertools.groupby(got)) <= 2


def test_wrr_seed_rotates_ties(core):
    assert picks(core.WeightedRoundRobin([1, 1, 1], seed=0), 6) == [0, 1, 2, 0, 1, 2]
    assert picks(core.WeightedRoundRobin([1, 1, 1], seed=1), 6) == [1, 2, 0, 1, 2, 0]
    assert picks(core.WeightedRoundRobin([1, 1, 1], seed=-1), 3) == [2, 0, 1]


def test_wrr_set_weight_resets(core):
    w = core.WeightedRoundRobin([5, 1, 1])
    picks(w, 3)
    w.set_weight(0, 1)
    w.set_weight(2, 5)
    assert picks(w, 7) == [2, 2, 0, 2, 1, 2, 2]


def test_wrr_ineligible(core):
    w = core.WeightedRoundRobin([5, 1, 1])
    w.set_eligible(0, False)
    assert picks(w, 4) == [1, 2, 1, 2]


# ---------------------------------------------------------------- least-conn

def test_least_conn_prefers_idle(core):
    lc = core.LeastConn([1, 1, 1, 1])
    assert picks(lc, 4) == [0, 1, 2, 3]          # ties: rotation
    for _ in range(3):
        lc.release(2)                            # 2 finished (and never goes below 0)
    assert lc.in_flight(2) == 0
    assert lc.select() == 2                      # the idle one
    assert lc.select() == 3                      # all at 1: rotation resumes after 2


def test_least_conn_rotation_and_skew(core):
    lc = core.LeastConn([1, 1, 1])
    assert picks(lc, 6) == [0, 1, 2, 0, 1, 2]
    lc = core.LeastConn([1, 1, 1])
    for _ in range(10):
        assert lc.select() != -1
    # skew: 1 and 2 finish everything, 0 keeps its requests
    while lc.in_flight(1):
        lc.release(1)
    while lc.in_flight(2):
        lc.release(2)
    got = picks(lc, 6)
    assert 0 not in got and collections.Counter(got) == {1: 3, 2: 3}


def test_least_conn_weighted(core):
    lc = core.LeastConn([3, 1])
    got = picks(lc, 40)
    assert collections.Counter(got) == {0: 30, 1: 10}
    assert [lc.in_flight(0), lc.in_flight(1)] == [30, 10]


def test_least_conn_seed(core):
    assert picks(core.LeastConn([1, 1, 1], seed=2), 3) == [2, 0, 1]


# ---------------------------------------------------------------- p2c

def test_p2c_prefers_idle(core):
    p = core.P2C([1] * 4, seed=3)
    for _ in range(200):
        p.select()
    while p.in_flight(3):
        p.release(3)
    # 3 is idle; every draw that includes it picks it, until it catches up
    got = picks(p, 20)
    assert got.count(3) >= 8
    assert p.in_flight(3) <= max(p.in_flight(i) for i in range(3))


def test_p2c_balances(core):
    p = core.P2C([1] * 5, seed=11)
    picks(p, 1000)
    loads = [p.in_flight(i) for i in range(5)]
    assert sum(loads) == 1000 and max(loads) - min(loads) <= 2


def test_p2c_weighted(core):
    p = core.P2C([4, 1], seed=5)
    picks(p, 500)
    assert abs(p.in_flight(0) - 400) <= 2


def test_p2c_distinct_and_single(core):
    p = core.P2C([1, 1, 1], seed=1)
    p.set_eligible(0, False)
    p.set_eligible(2, False)
    assert picks(p, 3) == [1, 1, 1]
    # two live backends: the two candidates are always both, so each pair of picks
    # covers both (the first of a pair is a tie, broken at random)
    p = core.P2C([1, 1], seed=9)
    got = picks(p, 40)
    assert all(sorted(got[i:i + 2]) == [0, 1] for i in range(0, 40, 2))
    assert len(set(got[0::2])) == 2


def test_p2c_seed_reproducible(core):
    a, b = core.P2C([1] * 8, seed=42), core.P2C([1] * 8, seed=42)
    assert picks(a, 50) == picks(b, 50)


# ---------------------------------------------------------------- random

def test_random_golden(core):
    # pins splitmix64 and the draw: any change shows up here (and in the parity test)
    r = core.Random([1, 1, 1, 1, 1, 1, 1, 1], seed=1)
    assert picks(r, 12) == [1, 7, 6, 3, 1, 0, 5, 5, 0, 6, 1, 6]


def test_random_shares(core):
    r = core.Random([1, 3, 0, 6], seed=7)
    c = collections.Counter(picks(r, 20000))
    assert c[2] == 0
    assert abs(c[0] - 2000) < 250 and abs(c[1] - 6000) < 400 and abs(c[3] - 12000) < 500


def test_random_seeds_differ(core):
    assert picks(core.Random([1] * 10, seed=1), 20) != picks(core.Random([1] * 10, seed=2), 20)


# ---------------------------------------------------------------- hash_key

HEAD = (b"GET /a/b%20c?x=1&user=al%20ice&flag&y=&user=bob#frag HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"X-Session:  \t abc 123 \t\r\n"
        b"x-session: second\r\n"
        b"Cookie: theme=dark; sid=\"q1\"; empty=\r\n"
        b"Empty:\r\n"
        b"cookie: sid=late; other = v2 ;bare\r\n"
        b"\r\n")


@pytest.mark.parametrize("kind,name,want", [
    ("path", b"", b"/a/b%20c"),
    ("path", b"ignored", b"/a/b%20c"),
    ("query", b"x", b"1"),
    ("query", b"user", b"al%20ice"),
    ("query", "user", b"al%20ice"),
    ("query", b"flag", b""),
    ("query", b"y", b""),
    ("query", b"frag", b""),
    ("query", b"missing", b""),
    ("query", b"USER", b""),
    ("header", b"x-session", b"abc 123"),
    ("header", b"X-SESSION", b"abc 123"),
    ("header", "Host", b"example.com"),
    ("header", b"empty", b""),
    ("header", b"Host:", b""),
    ("header", b"missing", b""),
    ("cookie", b"theme", b"dark"),
    ("cookie", b"sid", b'"q1"'),
    ("cookie", b"empty", b""),
    ("cookie", b"other", b"v2"),
    ("cookie", b"bare", b""),
    ("cookie", b"Theme", b""),
    ("cookie", b"missing", b""),
])
def test_hash_key(core, kind, name, want):
    assert core.hash_key(HEAD, kind, name) == want


@pytest.mark.parametrize("target,path,query_q", [
    (b"/", b"/", b""),
    (b"/p?q=v", b"/p", b"v"),
    (b"/p?a=1&q=2&q=3", b"/p", b"2"),
    (b"/p#x?q=1", b"/p", b"1"),
    (b"*", b"*", b""),
    (b"http://h.example:8080/x/y?q=9", b"/x/y", b"9"),
    (b"https://h", b"/", b""),
    (b"http://h?q=1", b"/", b"1"),
    (b"/?q", b"/", b""),
    (b"/?=&q=a=b", b"/", b"a=b"),
])
def test_hash_key_targets(core, target, path, query_q):
    head = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert core.hash_key(head, "path") == path
    assert core.hash_key(head, "query", b"q") == query_q


def test_hash_key_no_fields_and_garbage(core):
    assert core.hash_key(b"GET / HTTP/1.1\r\n\r\n", "header", b"host") == b""
    assert core.hash_key(b"", "path") == b""
    assert core.hash_key(b"garbage", "header", b"x") == b""
    assert core.hash_key(b"GET /x HTTP/1.1\r\nA: 1", "header", b"a") == b"1"
    assert core.hash_key(b"GET /x HTTP/1.1\r\nCookie: a=1\r\n\r\nCookie: b=2\r\n",
                         "cookie", b"b") == b""


def test_hash_key_errors(core):
    with pytest.raises(ValueError, match="unknown hash key kind: 'ip'"):
        core.hash_key(HEAD, "ip", b"x")
    with pytest.raises(ValueError, match="a header hash key needs a name"):
        core.hash_key(HEAD, "header", b"")
    with pytest.raises(TypeError, match="head must be bytes"):
        core.hash_key(bytearray(HEAD), "path")
    with pytest.raises(TypeError, match="name must be bytes or str"):
        core.hash_key(HEAD, "header", 5)


# ---------------------------------------------------------------- Selector, pick_many

@pytest.mark.parametrize("cls", ALL)
def test_selector_base(core, cls):
    b = make(core, cls, [1, 1])
    assert isinstance(b, core.Selector)
    assert issubclass(getattr(core, cls), core.Selector)


def test_selector_select_is_abstract(core):
    with pytest.raises(NotImplementedError, match="Selector.select"):
        core.Selector().select()


@pytest.mark.parametrize("cls", ALL)
def test_pick_many_matches_select_release(core, cls):
    """pick_many(b, n, key) == n x (select, release) done by hand on a twin selector."""
    a, b = make(core, cls, [1, 2, 3, 0, 5]), make(core, cls, [1, 2, 3, 0, 5])
    a.set_eligible(2, False)
    b.set_eligible(2, False)
    for key in (b"k1", b"user-7", b"k1"):
        want = 0
        for _ in range(50):
            idx = a.select(key)
            if idx >= 0:
                a.release(idx)
                want += idx
        assert core.pick_many(b, 50, key) == want
        assert [b.in_flight(i) for i in range(5)] == [0] * 5
        idx = b.select(key)
        assert idx == a.select(key)  # the same state afterwards
        a.release(idx)
        b.release(idx)


def test_pick_many_round_robin(core):
    rr = core.RoundRobin([1, 1, 1, 1])
    assert core.pick_many(rr, 8) == 2 * (0 + 1 + 2 + 3)
    assert core.pick_many(rr, 0) == 0
    assert core.pick_many(rr, 1, key=b"ignored") == 0
    assert rr.select() == 1 and rr.in_flight(1) == 1
    for i in range(4):
        rr.set_eligible(i, False)
    assert core.pick_many(rr, 10) == 0  # every select is -1: nothing picked, nothing released
    assert rr.in_flight(1) == 1


def test_pick_many_maglev_keys(core):
    m = make(core, "Maglev", [1, 1, 1])
    idx = m.select(b"session-1")
    m.release(idx)
    assert core.pick_many(m, 10, b"session-1") == 10 * idx
    assert core.pick_many(m, 10) == 0  # empty key: -2 every time
    assert core.pick_many(m, 10, b"") == 0
    with pytest.raises(TypeError, match="key must be bytes"):
        core.pick_many(m, 1, "session-1")
    assert core.pick_many(m, 0, "not checked") == 0


def test_pick_many_errors(core):
    rr = core.RoundRobin([1, 1])
    with pytest.raises(TypeError, match="selector must be a Selector, not list"):
        core.pick_many([1, 1], 1)
    with pytest.raises(TypeError, match="selector must be a Selector, not NoneType"):
        core.pick_many(None, 1)
    with pytest.raises(ValueError, match="n must not be negative"):
        core.pick_many(rr, -1)
    with pytest.raises(TypeError, match="cannot be interpreted as an integer"):
        core.pick_many(rr, 1.5)
    assert core.pick_many(rr, True) == 0


def test_pick_many_python_subclass(core):
    """A Python subclass overriding select/release is honoured (compiled: cpdef dispatch)."""
    calls = []

    class Logged(core.RoundRobin):
        def select(self, key=b""):
            idx = super().select(key)
            calls.append(("select", key, idx))
            return idx

        def release(self, idx):
            calls.append(("release", idx))
            super().release(idx)

    lb = Logged([1, 1, 1])
    assert core.pick_many(lb, 4, b"k") == 0 + 1 + 2 + 0
    assert calls[:2] == [("select", b"k", 0), ("release", 0)]
    assert len(calls) == 8

    class Broken(core.RoundRobin):
        def select(self, key=b""):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        core.pick_many(Broken([1]), 3)


# ---------------------------------------------------------------- select_excluding (retries)

def sel_ex(b, cls, exclude, i=0):
    return b.select_excluding(exclude, b"key-%d" % i) if cls == "Maglev" else b.select_excluding(exclude)


def _load(b, cls, want):
    """Put ``want[i]`` requests in flight on backend i (select until each has them, releasing the rest)."""
    extra = []
    for k in range(100000):
        if all(b.in_flight(i) >= want[i] for i in range(b.n)):
            break
        i = sel(b, cls, k)
        (extra if b.in_flight(i) > want[i] else []).append(i)
    for i in extra:
        b.release(i)
    assert [b.in_flight(i) for i in range(b.n)] == list(want)


@pytest.mark.parametrize("cls", ALL)
def test_retry_never_returns_the_failed_backend(core, cls):
    """The retry of a request whose backend failed (and was released): 1000 of 1000
    retries pick another backend, though the failed one is now the least loaded."""
    b = make(core, cls, [1, 1, 1])
    _load(b, cls, [0, 3, 3])     # 1 and 2 are busy; 0 is idle
    for t in range(1000):
        first = sel(b, cls, t)
        b.release(first)                  # it failed: the request no longer counts on it
        again = sel_ex(b, cls, {first}, t)
        assert again >= 0 and again != first, (t, first, again)
        b.release(again)
    assert [b.in_flight(i) for i in range(3)] == [0, 3, 3]
    # what a retry by "select again, release it if tried" ran into: the idle backend
    # again (least-conn: every time; the rest: often), however often it asked
    again_idle = 0
    for t in range(1000):
        i = sel(b, cls, t)
        b.release(i)
        again_idle += i == 0
    assert again_idle == 1000 if cls == "LeastConn" else again_idle > 0


@pytest.mark.parametrize("cls", ALL)
def test_select_excluding_none_left(core, cls):
    b = make(core, cls, [1, 0, 2, 3])
    assert sel_ex(b, cls, {0, 2, 3}) == -1          # 1 has weight 0
    assert sel_ex(b, cls, [0, 1, 2, 3]) == -1
    b.set_eligible(3, False)
    assert sel_ex(b, cls, (0, 2)) == -1             # 3 is not eligible
    assert sel_ex(b, cls, frozenset([2])) == 0
    assert sel_ex(b, cls, iter([0])) == 2
    b.set_eligible(0, False)
    b.set_eligible(2, False)
    assert sel_ex(b, cls, set()) == -1              # nothing live at all
    assert [b.in_flight(i) for i in range(4)] == [1, 0, 1, 0]
    if cls == "Maglev":
        assert b.select_excluding({0, 1, 2, 3}, b"") == -2   # no key: the caller falls back
        assert b.select_excluding(set()) == -2


@pytest.mark.parametrize("cls", ALL)
def test_select_excluding_counts_return_to_zero(core, cls):
    b = make(core, cls, [1, 2, 3, 4])
    held = []
    for t in range(400):
        ex = {t % 4, (t * 7) % 4} if t % 3 else set()
        idx = sel_ex(b, cls, ex, t)
        assert idx >= 0 and idx not in ex
        held.append(idx)
        if t % 5 == 4:
            b.release(held.pop(0))
    counts = collections.Counter(held)
    assert [b.in_flight(i) for i in range(4)] == [counts[i] for i in range(4)]
    for idx in held:
        b.release(idx)
    assert [b.in_flight(i) for i in range(4)] == [0, 0, 0, 0]


@pytest.mark.parametrize("cls", ALL)
def test_select_excluding_nothing_is_select(core, cls):
    """With an empty ``exclude``: select's answers, and select's state afterwards."""
    a, b = make(core, cls, [1, 2, 0, 5, 1], seed=3), make(core, cls, [1, 2, 0, 5, 1], seed=3)
    for s_ in (a, b):
        s_.set_eligible(4, False)
    for t in range(300):
        x, y = sel(a, cls, t % 17), sel_ex(b, cls, () if t % 2 else set(), t % 17)
        assert x == y, t
        if t % 3 == 0:
            a.release(x)
            b.release(y)
    assert [a.in_flight(i) for i in range(5)] == [b.in_flight(i) for i in range(5)]


@pytest.mark.parametrize("cls", ALL)
def test_select_excluding_errors(core, cls):
    b = make(core, cls, [1, 1, 1])
    for bad in ({3}, [0, -1], (10**30,), {-(10**30)}):
        with pytest.raises(IndexError, match="backend index out of range"):
            sel_ex(b, cls, bad)
    with pytest.raises(TypeError, match="'float' object cannot be interpreted as an integer"):
        sel_ex(b, cls, [0, 1.0])
    with pytest.raises(TypeError, match="'str' object cannot be interpreted as an integer"):
        sel_ex(b, cls, "0")
    with pytest.raises(TypeError, match="'NoneType' object is not iterable"):
        sel_ex(b, cls, None)
    # a failed call picked nothing and left no trace: the next one excludes exactly what it is told
    assert [b.in_flight(i) for i in range(3)] == [0, 0, 0]
    assert {sel_ex(b, cls, {0, 1}, t) for t in range(20)} == {2}
    if cls == "Maglev":
        with pytest.raises(TypeError, match="key must be bytes"):
            b.select_excluding(set(), "key")


def test_selector_select_excluding_is_abstract(core):
    with pytest.raises(NotImplementedError, match="Selector.select_excluding"):
        core.Selector().select_excluding(set())


def test_rr_excluding_continues_the_rotation(core):
    rr = core.RoundRobin([1, 1, 1, 1])
    assert rr.select() == 0
    assert rr.select_excluding({0, 1}) == 2      # skips the tried ones, rotation goes on
    assert picks(rr, 3) == [3, 0, 1]
    assert rr.select_excluding({3, 0}) == 2
    assert picks(rr, 2) == [3, 0]                # 3 and 0 are not skipped for good


def test_wrr_excluding_leaves_the_excluded_current_weights(core):
    w = core.WeightedRoundRobin([5, 1, 1])
    # excluding 0: a smooth pass over 1 and 2 only (weights 1, 1)
    assert [w.select_excluding({0}) for _ in range(6)] == [1, 2, 1, 2, 1, 2]
    # 1 and 2 went through whole cycles and 0 was never touched: the state is
    # fresh again, and select gives nginx's sequence from its start
    assert picks(w, 14) == [0, 0, 1, 0, 2, 0, 0] * 2
    # excluded half-way through a cycle: the others' picks still sum to the same shares
    w = core.WeightedRoundRobin([3, 2, 1, 0])
    got = [w.select_excluding({k % 3}) if k % 4 == 0 else w.select() for k in range(600)]
    got += picks(w, 600)
    c = collections.Counter(got[600:])
    assert (abs(c[0] - 300) <= 3, abs(c[1] - 200) <= 3, abs(c[2] - 100) <= 3, c[3]) == \
        (True, True, True, 0), c


def test_least_conn_excluding_takes_the_least_loaded_of_the_rest(core):
    lc = core.LeastConn([1, 1, 1, 2])
    _load(lc, "LeastConn", [0, 4, 2, 5])         # per unit of weight: 0, 4, 2, 2.5
    assert lc.select_excluding({0}) == 2
    assert lc.select_excluding({0}) == 3         # 2 is at 3 now; 3 at 2.5
    assert lc.select_excluding({0, 2, 3}) == 1
    assert lc.select() == 0


def test_p2c_excluding_draws_among_the_rest(core):
    p = core.P2C([1, 1, 1], seed=4)
    _load(p, "P2C", [0, 3, 1])
    # 0 excluded: the two candidates can only be 1 and 2, and 2 is less loaded
    for _ in range(100):
        assert p.select_excluding({0}) == 2
        p.release(2)
    # 1 excluded: 0 and 2, and 0 is idle
    for _ in range(100):
        assert p.select_excluding({1}) == 0
        p.release(0)
    assert [p.in_flight(i) for i in range(3)] == [0, 3, 1]


def test_random_excluding_draws_by_weight_among_the_rest(core):
    r = core.Random([5, 1, 3], seed=7)
    c = collections.Counter(r.select_excluding({0}) for _ in range(8000))
    assert c[0] == 0
    assert abs(c[1] - 2000) < 150 and abs(c[2] - 6000) < 150
    assert {r.select_excluding({0, 2}) for _ in range(10)} == {1}


def test_maglev_excluding_walks_on_from_the_key(core):
    """Leaving a key's backend out gives the backend that key gets once that backend is
    down (the next live one in the table); keys on other backends do not move."""
    names = [b"10.0.0.%d:80" % i for i in range(5)]
    m = core.Maglev([1] * 5, names, table_size=251)
    for i in range(300):
        key = b"user-%d" % i
        home = m.select(key)
        m.release(home)
        down = core.Maglev([1] * 5, names, table_size=251)
        down.set_eligible(home, False)
        want = down.select(key)
        assert m.select_excluding({home}, key) == want != home
        m.release(want)
        other = (home + 1) % 5
        assert m.select_excluding({other}, key) == home
        m.release(home)
    assert [m.in_flight(i) for i in range(5)] == [0] * 5


def test_maglev_excluding_bounded_load(core):
    """The bound still applies to the backends left: an overloaded one is walked past."""
    names = [b"a:1", b"b:1", b"c:1"]
    m = core.Maglev([1, 1, 1], names, table_size=101, balance_factor=1.0)
    free = core.Maglev([1, 1, 1], names, table_size=101)
    for want, ex in ((3, {1, 2}), (6, {0, 2})):     # only one left: taken whatever its load
        for i in range(want):
            assert m.select_excluding(ex, b"k-%d" % i) == min({0, 1, 2} - ex)
    assert [m.in_flight(i) for i in range(3)] == [3, 6, 0]
    # 10 requests with this one: the bound is 10/3 each; 1 is over it, 2 under
    keys = [b"k-%d" % i for i in range(200)]
    assert any(free.select_excluding({0}, k) == 1 for k in keys)   # unbounded: some keys on 1
    for k in keys:
        assert m.select_excluding({0}, k) == 2
        m.release(2)
    for i, k in ((0, 3), (1, 6)):
        for _ in range(k):
            m.release(i)
    assert [m.in_flight(i) for i in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("cls", ALL)
def test_pick_many_excluding(core, cls):
    """pick_many(b, n, key, exclude) == n x (select_excluding, release) by hand."""
    a, b = make(core, cls, [1, 2, 3, 0, 5]), make(core, cls, [1, 2, 3, 0, 5])
    for key, ex in ((b"k1", {0}), (b"user-7", [2, 4]), (b"k1", ()), (b"k2", {0, 1, 2, 4})):
        want = 0
        for _ in range(50):
            idx = a.select_excluding(ex, key)
            if idx >= 0:
                a.release(idx)
                want += idx
        assert core.pick_many(b, 50, key, ex) == want
        assert [b.in_flight(i) for i in range(5)] == [0] * 5
    assert core.pick_many(b, 10, b"k", {0, 1, 2, 4}) == 0
    with pytest.raises(IndexError):
        core.pick_many(b, 1, b"k", {7})
    assert core.pick_many(b, 0, b"k", {7}) == 0


def test_select_excluding_python_subclass(core):
    """A Python override of select_excluding is honoured (compiled: cpdef dispatch)."""
    calls = []

    class Logged(core.LeastConn):
        def select_excluding(self, exclude, key=b""):
            idx = super().select_excluding(exclude, key)
            calls.append((sorted(exclude), idx))
            return idx

    lb = Logged([1, 1, 1])
    assert core.pick_many(lb, 3, b"", {1}) == 0 + 2 + 0      # ties in rotation, 1 skipped
    assert calls == [([1], 0), ([1], 2), ([1], 0)]


# ---------------------------------------------------------------- registry

def test_registry_builds_each():
    from fastlb import core as switch
    assert selection.ALGORITHMS == ("round-robin", "weighted-round-robin", "least-conn", "p2c",
                                    "random", "maglev")
    classes = ["RoundRobin", "WeightedRoundRobin", "LeastConn", "P2C", "Random", "Maglev"]
    names = [b"a:1", b"b:1", b"c:1"]
    for name, cls in zip(selection.ALGORITHMS, classes):
        b = selection.make_balancer(name, [1, 2, 3], names, seed=5)
        assert type(b) is getattr(switch, cls)   # follows the switch
        assert b.n == 3
        got = b.select(b"k")
        assert 0 <= got < 3
        b.release(got)
        assert b.in_flight(got) == 0
    m = selection.make_balancer("maglev", [1, 1], ["a", "b"], table_size=7, balance_factor=1.5)
    assert (m.table_size, m.balance_factor) == (7, 1.5)
    assert m.select(b"") == -2


@pytest.mark.parametrize("args,kw,msg", [
    (("leastconn", [1], [b"a"]), {}, "unknown balancing algorithm 'leastconn'"),
    ((None, [1], [b"a"]), {}, "unknown balancing algorithm None"),
    (("p2c", [1], [b"a"]), {"table_size": 7}, "unknown option 'table_size' for p2c"),
    (("maglev", [1], [b"a"]), {"size": 7}, "unknown option 'size' for maglev"),
    (("maglev", [1], [b"a"]), {"table_size": 100}, "maglev: table_size must be a prime.*got 100"),
    (("maglev", [1], [b"a"]), {"balance_factor": 0.5}, "balance_factor must be 0 .* got 0.5"),
    (("maglev", [1, 1], [b"a", b"a"]), {}, "names must be distinct"),
    (("weighted-round-robin", [1, -1], [b"a", b"b"]), {}, "weighted-round-robin: weight .* got -1"),
    (("random", [], []), {}, "random: a balancer needs at least one backend"),
    (("least-conn", [1, 1], [b"a"]), {}, "least-conn: 1 names for 2 backends"),
])
def test_registry_errors(args, kw, msg):
    with pytest.raises(errors.ConfigError, match=msg):
        selection.make_balancer(*args, **kw)
