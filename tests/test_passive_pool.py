"""Passive ejection never empties the pool, through the real data path.

fastlb in process (``make_lb``) in front of real backends that answer
garbage (an invalid response: a failure for passive checks, 502 for the
client) until they are switched back to answering, under every algorithm.
"""
import httpx
import pytest

from fastlb.health import HealthConfig
from fastlb.selection import ALGORITHMS
from helpers import (  # noqa: F401  (fixtures are used by name)
    Reply,
    active_core,
    backend_loop,
    echo_response,
    make_backend,
    make_lb,
)

pytestmark = [pytest.mark.usefixtures("active_core"), pytest.mark.timeout(60)]


def switchable(state):
    """A handler answering garbage while ``state["fail"]``, else the echo."""
    def handler(be, req):
        if state["fail"]:
            return Reply(b"NOT HTTP AT ALL\r\n\r\n", close=True)
        return echo_response(be, req)
    return handler


def snapshot(lb):
    async def get():
        return lb.proxy.health.snapshot()

    return lb.lt.call(get())


def load(lb, n):
    """``n`` GETs; returns the statuses and, after each, how many backends were ejected."""
    statuses, ejected = [], []
    with httpx.Client(timeout=10) as c:
        for i in range(n):
            statuses.append(c.get(f"{lb.url}/{i}").status_code)
            ejected.append(sum(s["ejected"] for s in snapshot(lb)))
    return statuses, ejected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_default_share_never_ejects_the_last_backend(make_backend, make_lb, algorithm):
    """Three backends all failing, passive checks only: at most two are out at
    a time, requests keep reaching a backend (502, never 503), and when the
    backends answer again the very next request is served."""
    state = {"fail": True}
    bes = [make_backend(n, handler=switchable(state)) for n in "abc"]
    lb = make_lb(bes, algorithm=algorithm, health=HealthConfig(eject_after=3, eject_base=30))
    statuses, ejected = load(lb, 40)
    assert set(statuses) == {502}, statuses
    assert max(ejected) == 2, ejected
    assert sum(len(b.requests) for b in bes) >= 40   # each request reached a backend
    state["fail"] = False
    with httpx.Client(timeout=10) as c:
        r = c.get(lb.url + "/back")
    assert r.status_code == 200 and r.json()["target"] == "/back"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_ejected_soonest_back_on_trial(make_backend, make_lb, algorithm):
    """A share of 100 % lets every backend be ejected (30 s each); the one
    whose back-off ends soonest is back on trial at once, so a recovered
    pool serves the next request rather than answering 503 for 30 s, and
    the success on trial resets that backend's back-off level."""
    state = {"fail": True}
    bes = [make_backend(n, handler=switchable(state)) for n in "abc"]
    lb = make_lb(bes, algorithm=algorithm,
                 health=HealthConfig(eject_after=1, eject_base=30, max_ejected_percent=100))
    statuses, ejected = load(lb, 12)
    assert set(statuses) == {502}, statuses
    snap = snapshot(lb)
    assert all(s["ejections"] >= 1 for s in snap), snap    # every one was ejected...
    assert [s["eligible"] for s in snap].count(True) == 1  # ...and one is on trial
    assert [s["trial"] for s in snap].count(True) == 1
    assert max(ejected) == 2    # the last ejection re-admits another at once
    state["fail"] = False
    with httpx.Client(timeout=10) as c:
        r = c.get(lb.url + "/back")
    assert r.status_code == 200, r.headers
    served = r.headers["x-backend"]
    after = snapshot(lb)["abc".index(served)]
    assert not after["trial"] and after["ejections"] == 0
