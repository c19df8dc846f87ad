"""RoundRobin, on both cores (the ``core`` fixture)."""
import pytest


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


def test_release_is_a_noop(core):
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
