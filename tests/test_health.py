"""fastlb.health: active checks against real backends on 127.0.0.1, passive
ejection, slow start, admin drain, and clean shutdown.

The balancer is a stub recording ``set_eligible`` / ``set_weight`` calls.
Each test runs its own event loop (uvloop, and plain asyncio where said)
under an overall timeout, and ends by checking that no task is left.
"""
import asyncio
import contextlib
import gc
import logging
import os
import socket
import struct
import time
import types
import warnings

import pytest
import uvloop

from fastlb import __version__
from fastlb.errors import ConfigError
from fastlb.health import WEIGHT_SCALE, HealthChecker, HealthConfig, parse_expect

HOST = "127.0.0.1"


# ---------------------------------------------------------------- harness

def run(fn, timeout=8.0, loop="uvloop"):
    """Run ``fn()`` on a new loop, bounded; fail if any task outlives it."""

    async def main():
        async with asyncio.timeout(timeout):
            result = await fn()
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, f"tasks left running: {left}"
        return result

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as r:
        return r.run(main())


async def until(pred, timeout=2.0, step=0.005):
    """Poll ``pred`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


class ListLogger:
    def __init__(self):
        self.records = []

    def _add(self, level, msg, *args):
        self.records.append((level, msg % args if args else msg))

    def debug(self, msg, *args):
        self._add("debug", msg, *args)

    def info(self, msg, *args):
        self._add("info", msg, *args)

    def warning(self, msg, *args):
        self._add("warning", msg, *args)

    def error(self, msg, *args):
        self._add("error", msg, *args)

    def lines(self, word=""):
        return [m for _, m in self.records if word in m]


class StubBalancer:
    def __init__(self, n):
        self.n = n
        self.eligible = [True] * n
        self.weights = [None] * n
        self.calls = []       # (kind, idx, value, time.monotonic())

    def set_eligible(self, idx, ok):
        assert 0 <= idx < self.n
        self.calls.append(("eligible", idx, bool(ok), time.monotonic()))
        self.eligible[idx] = bool(ok)

    def is_eligible(self, idx):
        return self.eligible[idx]

    def set_weight(self, idx, w):
        assert 0 <= idx < self.n
        assert type(w) is int and w >= 0, w
        self.calls.append(("weight", idx, w, time.monotonic()))
        self.weights[idx] = w

    def eligible_calls(self, idx=None):
        return [v for k, i, v, _ in self.calls if k == "eligible" and (idx is None or i == idx)]

    def weight_calls(self, idx):
        return [(v, t) for k, i, v, t in self.calls if k == "weight" and i == idx]


class HB:
    """A health endpoint on 127.0.0.1 whose behaviour is switched by ``mode``:
    ok (answer ``status``), hang, garbage, close (no reply), reset (RST), long
    (a line that never ends), flap (200 and 500 in turn)."""

    def __init__(self, mode="ok", status=200):
        self.mode = mode
        self.status = status
        self.heads = []
        self.times = []       # time.monotonic() of each request head
        self.conns = set()
        self.connections = 0
        self.server = None
        self.port = None

    async def start(self, port=0):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _HBConn(self), HOST, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self):
        """Stop listening (connections are then refused) and drop connections."""
        if self.server is None:
            return
        self.server.close()
        for c in list(self.conns):
            c.transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2)
        self.server = None

    def backend(self, index):
        return be(index, self.port)


class _HBConn(asyncio.Protocol):
    def __init__(self, hb):
        self.hb = hb
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.hb.conns.add(self)
        self.hb.connections += 1

    def connection_lost(self, exc):
        self.hb.conns.discard(self)

    def data_received(self, data):
        hb = self.hb
        self.buf += data
        if b"\r\n\r\n" not in self.buf or len(self.buf) > 65536:
            return
        head = self.buf[:self.buf.index(b"\r\n\r\n") + 4]
        self.buf = b""
        hb.heads.append(head)
        hb.times.append(time.monotonic())
        mode, status = hb.mode, hb.status
        if mode == "flap":
            mode, status = "ok", (200 if len(hb.heads) % 2 == 1 else 500)
        t = self.transport
        if mode == "ok":
            t.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .encode())
            t.close()
        elif mode == "garbage":
            t.write(b"SSH-2.0-OpenSSH_9.0\r\n")
            t.close()
        elif mode == "close":
            t.close()
        elif mode == "reset":
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()
        elif mode == "long":
            t.write(b"A" * 20000)
        # "hang": say nothing


def be(index, port):
    return types.SimpleNamespace(index=index, host=HOST, port=port,
                                 url=f"http://{HOST}:{port}")


@contextlib.asynccontextmanager
async def checking(backends, cfg, weights=None, seed=1, logger=None):
    """A started HealthChecker over ``backends`` (HB objects or ports)."""
    bes = [b.backend(i) if isinstance(b, HB) else be(i, b) for i, b in enumerate(backends)]
    bal = StubBalancer(len(bes))
    log = logger if logger is not None else ListLogger()
    hc = HealthChecker(bes, bal, cfg, asyncio.get_running_loop(), logger=log,
                       weights=weights, seed=seed)
    hc.start()
    try:
        yield hc, bal, log
    finally:
        await hc.stop()


def dead_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("spec, ok, bad", [
    ("200", [200], [201, 204, 500]),
    ("2xx", [200, 204, 299], [199, 300, 500]),
    ("2XX", [250], [300]),
    ("200-399", [200, 302, 399], [199, 400]),
    ("200,204", [200, 204], [201, 203]),
    (" 2xx , 301 ", [200, 301], [302]),
    ("100-599", [100, 599], []),
])
def test_expect_specs(spec, ok, bad):
    cfg = HealthConfig(path="/h", expect=spec)
    for s in ok:
        assert cfg.status_ok(s), (spec, s)
    for s in bad:
        assert not cfg.status_ok(s), (spec, s)


@pytest.mark.parametrize("spec", ["", " ", "abc", "600", "99", "099", "399-200", "2x", "6xx",
                                  "0xx", "200,", ",200", "200-", "20O", "2xx-3xx", "200;204"])
def test_expect_bad_specs(spec):
    with pytest.raises(ConfigError, match="--health-expect"):
        parse_expect(spec)
    with pytest.raises(ConfigError, match="--health-expect"):
        HealthConfig(path="/h", expect=spec)


def test_config_defaults_and_validation():
    c = HealthConfig()
    assert c.path is None and not c.active and c.passive
    assert (c.interval, c.timeout, c.rise, c.fall, c.expect) == (10.0, 2.0, 2, 3, "200")
    assert (c.slow_start, c.eject_after, c.eject_base, c.eject_max, c.eject_5xx) == \
        (0.0, 3, 5.0, 300.0, False)
    assert HealthConfig(interval=0.5).timeout == 0.5
    assert HealthConfig(interval=0.5, timeout=0.2).timeout == 0.2
    assert not HealthConfig(eject_after=0).passive
    assert HealthConfig(path="/healthz").active
    with pytest.raises(dataclasses_frozen_error()):
        c.interval = 1.0
    bad = [
        ({"interval": 0}, "--health-interval"),
        ({"interval": -1}, "--health-interval"),
        ({"interval": "10"}, "--health-interval"),
        ({"interval": 1, "timeout": 2}, "--health-timeout"),
        ({"timeout": 0}, "--health-timeout"),
        ({"rise": 0}, "--health-rise"),
        ({"fall": 0}, "--health-fall"),
        ({"fall": 1.5}, "--health-fall"),
        ({"path": "healthz"}, "--health-path"),
        ({"path": "/a b"}, "--health-path"),
        ({"path": "/a\r\nX: y"}, "--health-path"),
        ({"host": "a\r\nX: y"}, "--health-host"),
        ({"host": ""}, "--health-host"),
        ({"slow_start": -1}, "--slow-start"),
        ({"eject_after": -1}, "--eject-after"),
        ({"eject_base": 0}, "--eject-base"),
        ({"eject_base": 10, "eject_max": 5}, "--eject-max"),
        ({"eject_reset": 0}, "--eject-reset"),
        ({"eject_5xx": "yes"}, "--eject-5xx"),
        ({"max_ejected_percent": -1}, "--max-ejected-percent"),
        ({"max_ejected_percent": 100.5}, "--max-ejected-percent"),
        ({"max_ejected_percent": "50"}, "--max-ejected-percent"),
        ({"max_ejected_percent": True}, "--max-ejected-percent"),
    ]
    for kw, flag in bad:
        with pytest.raises(ConfigError, match=flag):
            HealthConfig(**kw)


@pytest.mark.parametrize("percent, n, allowed", [
    (None, 1, 0), (None, 2, 1), (None, 3, 2), (None, 10, 9), (None, 0, 0),
    (100, 1, 1), (100, 3, 3), (0, 5, 0), (50, 3, 1), (50, 4, 2), (33.4, 3, 1),
    (10, 9, 0), (10, 10, 1), (99.9, 10, 9),
])
def test_max_ejected_share(percent, n, allowed):
    assert HealthConfig(max_ejected_percent=percent).max_ejected(n) == allowed
    assert HealthConfig().max_ejected_percent is None


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_checker_arguments():
    loop = asyncio.new_event_loop()
    try:
        cfg = HealthConfig()
        with pytest.raises(ValueError):
            HealthChecker([be(0, 1), be(1, 2)], StubBalancer(2), cfg, loop, weights=[1])
        with pytest.raises(ValueError):
            HealthChecker([be(0, 1)], StubBalancer(1), cfg, loop, weights=[1.5])
        with pytest.raises(ValueError):
            HealthChecker([be(1, 1), be(0, 2)], StubBalancer(2), cfg, loop)
    finally:
        loop.close()


# ---------------------------------------------------------------- active checks

def test_request_format_user_agent_and_fresh_connections():
    async def go():
        hb = await HB().start()
        cfg = HealthConfig(path="/healthz?deep=1", interval=0.05)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: len(hb.heads) >= 3)
        assert hb.heads[0] == (
            f"GET /healthz?deep=1 HTTP/1.1\r\nHost: {HOST}:{hb.port}\r\n"
            f"User-Agent: fastlb-health/{__version__}\r\nConnection: close\r\n\r\n").encode()
        assert hb.connections == len(hb.heads)  # one fresh connection per check
        # steady state: nothing written, nothing logged
        assert bal.calls == [] and log.records == []

        hb.heads.clear()
        cfg = HealthConfig(path="/", interval=0.05, host="api.example")
        async with checking([hb], cfg):
            assert await until(lambda: hb.heads)
        assert b"\r\nHost: api.example\r\n" in hb.heads[0]
        assert b"\r\nUser-Agent: fastlb-health/" in hb.heads[0]
        assert await until(lambda: not hb.conns)
        await hb.close()

    run(go)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_down_when_refused_then_up_after_rise(loop):
    async def go():
        hb = await HB().start()
        port = hb.port
        interval = 0.05
        cfg = HealthConfig(path="/h", interval=interval, rise=2, fall=3)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"])
            assert hc.snapshot()[0]["state"] == "UP"
            await hb.close()
            t0 = time.monotonic()
            assert await until(lambda: bal.eligible_calls() == [False])
            assert time.monotonic() - t0 < 3 * interval + 1.0
            snap = hc.snapshot()[0]
            assert snap["state"] == "DOWN" and not snap["eligible"]
            assert snap["consecutive_failures"] == 3
            assert snap["last_failure"] == "connection refused"
            assert log.lines() == [
                f"backend http://{HOST}:{port} is DOWN: 3 consecutive failed checks "
                "(connection refused)",
                "no backend is available: all are down, ejected or disabled"]
            assert hc.all_down()

            await hb.start(port)
            t0 = time.monotonic()
            assert await until(lambda: bal.eligible_calls() == [False, True])
            assert time.monotonic() - t0 < 2 * interval + 1.0
            assert not hc.all_down()
            assert log.lines("is UP") == [
                f"backend http://{HOST}:{port} is UP: 2 consecutive successful checks"]
            await asyncio.sleep(4 * interval)
            assert bal.eligible_calls() == [False, True]  # steady again
            assert len(log.records) == 4
        await hb.close()

    run(go, loop=loop)


def test_hanging_backend_marked_down_within_timeout():
    async def go():
        hb = await HB().start()
        cfg = HealthConfig(path="/h", interval=0.1, timeout=0.05, fall=2)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"])
            hb.mode = "hang"
            t0 = time.monotonic()
            assert await until(lambda: bal.eligible_calls() == [False])
            assert time.monotonic() - t0 < 2 * 0.1 + 0.05 + 1.0
            assert hc.snapshot()[0]["last_failure"] == "timed out after 0.05s"
            assert log.lines("DOWN") == [
                f"backend {hb.backend(0).url} is DOWN: 2 consecutive failed checks "
                "(timed out after 0.05s)"]
            # timed-out checks do not pile up connections
            assert len(hb.conns) <= 1
        assert await until(lambda: not hb.conns)
        await hb.close()

    run(go)


def test_wrong_status_down_then_up():
    async def go():
        hb = await HB().start()
        cfg = HealthConfig(path="/h", interval=0.05, rise=3, fall=2)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"])
            hb.status = 503
            assert await until(lambda: bal.eligible_calls() == [False])
            assert hc.snapshot()[0]["last_failure"] == "status 503, expected 200"
            n = len(hb.heads)
            hb.status = 200
            assert await until(lambda: bal.eligible_calls() == [False, True])
            assert len(hb.heads) - n >= 3  # rise=3 passes needed
            assert [m for m in log.lines() if "backend http" in m] == [
                f"backend {hb.backend(0).url} is DOWN: 2 consecutive failed checks "
                "(status 503, expected 200)",
                f"backend {hb.backend(0).url} is UP: 3 consecutive successful checks"]
        await hb.close()

    run(go)


def test_failure_reasons_and_first_check_rule():
    """Every kind of broken endpoint is a failure with its reason; a backend
    never checked before goes DOWN on its first failed check (even with fall=3)."""
    async def go():
        hbs = [await HB(mode).start() for mode in ("garbage", "close", "reset", "long", "hang")]
        ports = hbs + [dead_port()]
        cfg = HealthConfig(path="/h", interval=0.2, timeout=0.1, fall=3)
        async with checking(ports, cfg) as (hc, bal, log):
            assert await until(lambda: all(s["checked"] for s in hc.snapshot()))
            snap = hc.snapshot()
            assert [s["last_failure"] for s in snap] == [
                "invalid status line", "closed without a response", "connection reset",
                "invalid status line", "timed out after 0.1s", "connection refused"]
            assert all(s["state"] == "DOWN" and s["consecutive_failures"] == 1 for s in snap)
            assert sorted(bal.eligible_calls()) == [False] * 6
            assert len(log.lines("first check failed")) == 6
            assert hc.all_down()
        for hb in hbs:
            await hb.close()

    run(go)


def test_flapping_backend_keeps_its_state():
    async def go():
        hb = await HB("flap").start()  # 200, 500, 200, 500, ...
        cfg = HealthConfig(path="/h", interval=0.03, rise=2, fall=2)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: len(hb.heads) >= 12, timeout=3)
            assert hc.snapshot()[0]["state"] == "UP"
        assert bal.calls == []
        assert log.records == []
        await hb.close()

    run(go)


@pytest.mark.parametrize("status, expect, up", [
    (204, "200,204", True),
    (302, "200-399", True),
    (302, "2xx", False),
    (404, "2xx,404", True),
    (200, "204", False),
])
def test_expect_against_live_backend(status, expect, up):
    async def go():
        hb = await HB(status=status).start()
        cfg = HealthConfig(path="/h", interval=0.03, expect=expect, fall=1)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: len(hb.heads) >= 3)
            assert hc.snapshot()[0]["eligible"] is up
            assert bal.eligible_calls() == ([] if up else [False])
        await hb.close()

    run(go)


def test_jitter_spreads_first_checks():
    async def go():
        hbs = [await HB().start() for _ in range(6)]
        interval = 0.5
        cfg = HealthConfig(path="/h", interval=interval)
        t0 = time.monotonic()
        async with checking(hbs, cfg, seed=7) as (hc, bal, log):
            assert await until(lambda: all(hb.times for hb in hbs), timeout=interval + 1)
            firsts = sorted(hb.times[0] - t0 for hb in hbs)
        assert firsts[-1] < interval + 0.2
        assert firsts[-1] - firsts[0] > interval / 4
        gaps = [b - a for a, b in zip(firsts, firsts[1:])]
        assert sum(g > 0.005 for g in gaps) >= 3, firsts  # not all at once
        for hb in hbs:
            await hb.close()

    run(go)


def test_disabled_backend_keeps_being_checked():
    async def go():
        hb = await HB().start()
        cfg = HealthConfig(path="/h", interval=0.03, fall=1, rise=1)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"])
            hc.set_admin(0, False)
            assert bal.eligible_calls() == [False]
            hb.status = 500
            assert await until(lambda: hc.snapshot()[0]["state"] == "DOWN")
            assert bal.eligible_calls() == [False]  # already out: nothing written
            hc.set_admin(0, True)
            assert bal.eligible_calls() == [False]  # still DOWN
            hb.status = 200
            assert await until(lambda: bal.eligible_calls() == [False, True])
            assert hc.snapshot()[0]["admin"] == "enabled"
        await hb.close()

    run(go)


# ---------------------------------------------------------------- passive checks

def test_passive_ejection_backoff_and_trial():
    async def go():
        cfg = HealthConfig(eject_after=3, eject_base=0.1, eject_max=0.4)
        async with checking([1, 2], cfg) as (hc, bal, log):
            loop = asyncio.get_running_loop()
            url = "http://127.0.0.1:1"
            hc.on_failure(0, "connection reset")
            hc.on_failure(0, "connection reset")
            hc.on_success(0)  # consecutive failures only
            hc.on_failure(0, "connection reset")
            hc.on_failure(0, "connection reset")
            assert bal.calls == []
            hc.on_failure(0, "connection reset")
            assert bal.eligible_calls() == [False]
            snap = hc.snapshot()[0]
            assert snap["ejected"] and not snap["eligible"] and snap["ejections"] == 1
            assert snap["state"] == "UP" and snap["last_failure"] == "connection reset"
            assert 0.08 < snap["ejected_until"] - loop.time() <= 0.1 + 1e-6
            assert log.lines() == [f"backend {url} ejected for 0.1s: "
                                   "3 consecutive failures (connection reset)"]
            hc.on_failure(0, "late")  # in flight when ejected: ignored
            assert not hc.all_down()

            expect = [False]
            for backoff in (0.1, 0.2, 0.4, 0.4):
                t0 = time.monotonic()
                expect.append(True)
                assert await until(lambda: bal.eligible_calls() == expect)
                assert backoff - 0.02 < time.monotonic() - t0 < backoff + 0.8
                assert hc.snapshot()[0]["trial"]
                if backoff == 0.4 and len(expect) == 8:
                    break
                hc.on_failure(0, "connect timeout")  # on trial: out again at once
                expect.append(False)
                assert bal.eligible_calls() == expect
            assert log.lines("ejected for") == [
                f"backend {url} ejected for 0.1s: 3 consecutive failures (connection reset)",
                f"backend {url} ejected for 0.2s: failed again after returning (connect timeout)",
                f"backend {url} ejected for 0.4s: failed again after returning (connect timeout)",
                f"backend {url} ejected for 0.4s: failed again after returning (connect timeout)"]
            assert len(log.lines("re-admitted on trial after ejection")) == 4
            # a success ends the trial: one failure is no longer enough
            hc.on_success(0)
            assert not hc.snapshot()[0]["trial"]
            hc.on_failure(0, "x")
            hc.on_failure(0, "x")
            assert bal.eligible_calls() == expect
            assert bal.eligible_calls(1) == []

    run(go)


def test_backoff_resets_after_staying_in_rotation():
    """Without a success reported (no traffic on trial), eject_reset seconds
    back in rotation also bring the back-off level back to the base."""
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=0.05, eject_max=1.0, eject_reset=0.2)
        async with checking([1, 2], cfg) as (hc, bal, log):
            hc.on_failure(0, "a")
            assert await until(lambda: hc.snapshot()[0]["eligible"])
            hc.on_failure(0, "b")  # straight back out: doubled
            assert hc.snapshot()[0]["ejections"] == 2
            assert await until(lambda: hc.snapshot()[0]["eligible"])
            await asyncio.sleep(0.25)  # in rotation longer than eject_reset
            assert hc.snapshot()[0]["trial"]
            hc.on_failure(0, "c")
            assert log.lines("ejected for") == [
                "backend http://127.0.0.1:1 ejected for 0.05s: 1 consecutive failure (a)",
                "backend http://127.0.0.1:1 ejected for 0.1s: failed again after returning (b)",
                "backend http://127.0.0.1:1 ejected for 0.05s: failed again after returning (c)"]
            assert hc.snapshot()[0]["ejections"] == 1

    run(go)


def test_ejected_backend_must_pass_an_active_check():
    async def go():
        hb = await HB().start()
        other = await HB().start()  # stays in rotation: the pool is never empty here
        # fall is high: failing checks alone never take it DOWN here
        cfg = HealthConfig(path="/h", interval=1.5, timeout=0.1, fall=100, rise=1,
                           eject_after=2, eject_base=0.1, eject_max=1.0)
        async with checking([hb, other], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"], timeout=2.5)
            hb.status = 500
            hc.on_failure(0, "connection reset")
            hc.on_failure(0, "connection reset")
            assert bal.eligible_calls() == [False]
            n = len(hb.heads)
            # the back-off ends: a check runs at once, fails, and it stays out
            assert await until(lambda: len(hb.heads) > n, timeout=0.8)
            await asyncio.sleep(0.05)
            snap = hc.snapshot()[0]
            assert snap["awaiting_check"] and snap["ejected"] and not snap["eligible"]
            assert bal.eligible_calls() == [False]
            hb.status = 200  # the next regular check readmits it
            assert await until(lambda: bal.eligible_calls() == [False, True], timeout=2.5)
            assert hc.snapshot()[0]["trial"]
            assert log.lines("back after ejection") == [
                f"backend {hb.backend(0).url} back after ejection: 1 consecutive successful check"]

            # on trial: one failure ejects again (0.2 s); ``rise`` passing checks
            # since then end it, and when the back-off ends first a check runs
            # at once rather than at the next tick: back within 0.2 s + a check
            t0 = time.monotonic()
            hc.on_failure(0, "connection reset")
            assert bal.eligible_calls() == [False, True, False]
            assert await until(lambda: bal.eligible_calls() == [False, True, False, True])
            assert time.monotonic() - t0 < 0.2 + 0.6
            assert bal.eligible_calls(1) == []
        await hb.close()
        await other.close()

    run(go)


def test_on_response_5xx_and_passive_off():
    async def go():
        async with checking([1, 2], HealthConfig(eject_after=3, eject_5xx=True)) as (hc, bal, _):
            hc.on_response(0, 200)
            for _ in range(3):
                hc.on_response(0, 502)
            assert bal.eligible_calls() == [False]
            assert hc.snapshot()[0]["last_failure"] == "status 502"
        async with checking([1, 2], HealthConfig(eject_after=3)) as (hc, bal, _):
            for _ in range(5):
                hc.on_response(0, 500)
            assert bal.calls == []
        async with checking([1], HealthConfig(eject_after=0)) as (hc, bal, log):
            for _ in range(10):
                hc.on_failure(0, "refused")
            assert bal.calls == [] and log.records == []
            assert hc.snapshot()[0]["passive_failures"] == 0

    run(go)


# ---------------------------------------------------------------- the pool is never emptied

def fail_all(hc, rounds, n, reason="connection refused"):
    """``rounds`` failures on every eligible backend, in turn."""
    for _ in range(rounds):
        for i in range(n):
            hc.on_failure(i, reason)


def test_share_default_keeps_the_last_backend_in():
    """Three backends all failing, passive checks only: never more than two
    are ejected and one is always in rotation. The third stays in (said
    once), and as it is failing too the ejected ones get trials meanwhile,
    which frees room in the share (see the tests below)."""
    async def go():
        cfg = HealthConfig(eject_after=2, eject_base=5)
        async with checking([1, 2, 3], cfg) as (hc, bal, log):
            fail_all(hc, 1, 3)
            hc.on_failure(0, "connection refused")
            hc.on_failure(1, "connection refused")
            assert [s["ejected"] for s in hc.snapshot()] == [True, True, False]
            hc.on_failure(2, "connection refused")
            assert hc.snapshot()[2]["eligible"] and not hc.snapshot()[2]["ejected"]
            most = 0
            for _ in range(10):
                for i in range(3):
                    hc.on_failure(i, "connection refused")
                    snap = hc.snapshot()
                    most = max(most, [s["ejected"] for s in snap].count(True))
                    assert any(s["eligible"] for s in snap) and not hc.all_down()
            assert most == 2
            assert [m for lv, m in log.records if lv == "warning" and "not ejected" in m] == [
                "backend http://127.0.0.1:3 not ejected (2 consecutive failures "
                "(connection refused)): at most 2 of 3 may be out at a time "
                "(--max-ejected-percent)"]
            assert True in bal.eligible_calls(0) and True in bal.eligible_calls(1)

    run(go)


def test_share_single_backend_is_never_ejected():
    async def go():
        async with checking([1], HealthConfig(eject_after=1)) as (hc, bal, log):
            for _ in range(50):
                hc.on_failure(0, "connection refused")
            assert bal.calls == []
            assert hc.snapshot()[0]["passive_failures"] == 50
            assert len(log.records) == 1 and "at most 0 of 1" in log.records[0][1]
            hc.on_success(0)  # the episode ends: a new one is said again
            hc.on_failure(0, "reset")
            assert len(log.lines("not ejected")) == 2

    run(go)


def test_share_held_backend_ejected_once_another_returns():
    """A backend kept in by the share is ejected by its next failure once an
    ejected one is back; with a share of 50 % of 4 only two are out at a time."""
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=0.3, max_ejected_percent=50)
        async with checking([1, 2, 3, 4], cfg) as (hc, bal, log):
            hc.on_failure(0, "a")
            await asyncio.sleep(0.15)
            hc.on_failure(1, "b")
            hc.on_failure(2, "c")     # share used up: stays in
            hc.on_failure(2, "c")
            assert [s["eligible"] for s in hc.snapshot()] == [False, False, True, True]
            assert hc.snapshot()[2]["passive_failures"] == 2
            assert [s["held"] for s in hc.snapshot()] == [False, False, True, False]
            assert await until(lambda: hc.snapshot()[0]["eligible"], timeout=1)
            assert not hc.snapshot()[1]["eligible"]   # still out for ~0.15 s
            hc.on_failure(2, "c")     # room again: out at once
            snap = hc.snapshot()
            assert [s["eligible"] for s in snap] == [True, False, False, True]
            assert log.lines("ejected for")[-1] == (
                "backend http://127.0.0.1:3 ejected for 0.3s: 3 consecutive failures (c)")
            hc.on_failure(0, "a")     # on trial, but the share is used up again
            assert hc.snapshot()[0]["eligible"] and hc.snapshot()[0]["trial"]
            assert len(log.lines("not ejected")) == 2

    run(go)


def test_success_on_trial_resets_the_backoff():
    """A backend back after a few ejections whose first request succeeds is
    ejected for eject_base again next time (not for the doubled back-off that
    eject_reset seconds in rotation would only have reset)."""
    async def go():
        cfg = HealthConfig(eject_after=2, eject_base=0.05, eject_max=10, eject_reset=60)
        async with checking([1, 2], cfg) as (hc, bal, log):
            hc.on_failure(0, "x")
            hc.on_failure(0, "x")
            for _ in range(2):        # back on trial, fails again: 0.1, then 0.2
                assert await until(lambda: hc.snapshot()[0]["trial"])
                hc.on_failure(0, "x")
            assert await until(lambda: hc.snapshot()[0]["trial"])
            assert hc.snapshot()[0]["ejections"] == 3
            hc.on_success(0)
            snap = hc.snapshot()[0]
            assert not snap["trial"] and snap["ejections"] == 0
            hc.on_failure(0, "y")     # no longer on trial: eject_after applies again
            assert hc.snapshot()[0]["eligible"]
            hc.on_failure(0, "y")
            assert [m.split(": ")[0] for m in log.lines("ejected for")] == [
                "backend http://127.0.0.1:1 ejected for 0.05s",
                "backend http://127.0.0.1:1 ejected for 0.1s",
                "backend http://127.0.0.1:1 ejected for 0.2s",
                "backend http://127.0.0.1:1 ejected for 0.05s"]
            assert hc.snapshot()[0]["ejections"] == 1

    run(go)


def test_all_ejected_soonest_back_on_trial_at_once():
    """With a share of 100 % every backend may be ejected; when the last one
    is, the one whose back-off ends soonest is back on trial at once (no
    503s for the whole back-off), each failure hands the trial on in back-off
    order, one warning per dry spell, and a success ends the spell."""
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=10, eject_max=100, max_ejected_percent=100)
        async with checking([1, 2, 3], cfg) as (hc, bal, log):
            hc.on_failure(0, "x")
            await asyncio.sleep(0.02)
            hc.on_failure(1, "x")
            await asyncio.sleep(0.02)
            hc.on_failure(2, "x")    # the last one: backend 0 ends soonest
            assert not hc.all_down()
            snap = hc.snapshot()
            assert [s["eligible"] for s in snap] == [True, False, False]
            assert snap[0]["trial"] and not snap[0]["ejected"] and snap[0]["ejections"] == 1
            assert bal.eligible_calls(0) == [False, True]
            warnings_ = [m for lv, m in log.records if lv == "warning"]
            assert warnings_ == [
                "backend http://127.0.0.1:1 ejected for 10s: 1 consecutive failure (x)",
                "backend http://127.0.0.1:2 ejected for 10s: 1 consecutive failure (x)",
                "backend http://127.0.0.1:3 ejected for 10s: 1 consecutive failure (x)",
                "no backend in rotation is working: backend http://127.0.0.1:1 "
                "re-admitted on trial early (its back-off ends soonest)"]

            hc.on_failure(0, "x")    # out for 20 s now: backend 1 (10 s) is next
            assert [s["eligible"] for s in hc.snapshot()] == [False, True, False]
            hc.on_failure(1, "x")
            assert [s["eligible"] for s in hc.snapshot()] == [False, False, True]
            hc.on_failure(2, "x")    # all at 20 s: backend 0 was ejected first
            assert [s["eligible"] for s in hc.snapshot()] == [True, False, False]
            assert len([1 for lv, _ in log.records if lv == "warning"]) == 4
            assert len([1 for lv, _ in log.records if lv == "info"]) == 0

            hc.on_success(0)         # it answers: the spell ends, its level resets
            assert hc.snapshot()[0]["ejections"] == 0
            assert log.records[-1] == (
                "info", "backend http://127.0.0.1:1 answered: the pool is serving again")
            hc.on_failure(0, "x")    # a new spell: said again; ejected for the base,
            assert log.lines("ejected for")[-1] == (   # so it ends soonest again
                "backend http://127.0.0.1:1 ejected for 10s: 1 consecutive failure (x)")
            assert [s["eligible"] for s in hc.snapshot()] == [True, False, False]
            assert log.records[-1][0] == "warning" and log.records[-1][1] == (
                "no backend in rotation is working: backend http://127.0.0.1:1 "
                "re-admitted on trial early (its back-off ends soonest)")
            assert hc.snapshot()[1]["ejections"] == 2   # the level of a failed trial stays

    run(go)


def test_dead_single_backend_with_full_share_stays_on_trial():
    """One backend, share 100 %: under a stream of failures it stays in
    rotation on trial, its back-off level climbs, and the log says it once."""
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=1, eject_max=8, max_ejected_percent=100)
        async with checking([1], cfg) as (hc, bal, log):
            for _ in range(200):
                hc.on_failure(0, "connection refused")
                assert hc.snapshot()[0]["eligible"]
            assert not hc.all_down()
            assert hc.snapshot()[0]["ejections"] == 200
            assert [m for lv, m in log.records if lv != "debug"] == [
                "backend http://127.0.0.1:1 ejected for 1s: 1 consecutive failure "
                "(connection refused)",
                "no backend in rotation is working: backend http://127.0.0.1:1 "
                "re-admitted on trial early (its back-off ends soonest)"]
            assert log.lines("ejected for 8s")  # capped, at debug level

    run(go)


def test_failing_held_backends_put_ejected_ones_back_on_trial():
    """Default share, all three failing: the one kept in is failing too, so
    the ejected ones get trials in back-off order; a recovered one is found
    at once instead of after its (growing) back-off."""
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=30, eject_max=300)
        async with checking([1, 2, 3], cfg) as (hc, bal, log):
            hc.on_failure(0, "x")
            await asyncio.sleep(0.02)
            hc.on_failure(1, "x")
            hc.on_failure(2, "x")    # held; every backend in rotation is failing
            snap = hc.snapshot()
            assert [s["eligible"] for s in snap] == [True, False, True]
            assert snap[0]["trial"]
            hc.on_failure(0, "x")    # the trial fails: backend 1 gets one
            assert [s["eligible"] for s in hc.snapshot()] == [False, True, True]
            hc.on_success(1)         # recovered: ends the spell
            hc.on_failure(2, "x")    # still failing, room in the share: ejected now
            assert [s["eligible"] for s in hc.snapshot()] == [False, True, False]
            assert hc.snapshot()[0]["ejected"]   # not tried again: backend 1 works

    run(go)


def test_drained_others_do_not_leave_the_pool_empty():
    """Passive only, default share, the other backend drained: the failing
    one is ejected and put straight back on trial; draining the last one
    while another is ejected puts the ejected one back."""
    async def go():
        async with checking([1, 2], HealthConfig(eject_after=1, eject_base=30)) as (hc, bal, log):
            hc.set_admin(1, False)
            hc.on_failure(0, "x")
            assert hc.snapshot()[0]["eligible"] and hc.snapshot()[0]["trial"]
            hc.set_admin(1, True)
            hc.on_failure(0, "x")    # a real ejection now (backend 1 serves)
            assert not hc.snapshot()[0]["eligible"]
            hc.set_admin(1, False)   # the last one drained: backend 0 comes back
            assert hc.snapshot()[0]["eligible"] and not hc.all_down()
            hc.set_admin(0, False)
            assert hc.all_down()     # drained by the admin: nothing forced back
            assert log.lines("no backend is available")

    run(go)


def test_active_down_backend_never_forced_back():
    """With active checks on, a backend the checks found DOWN is never put
    back by the fallback; an ejected backend that is UP is."""
    async def go():
        down = await HB(status=500).start()
        up = await HB().start()
        cfg = HealthConfig(path="/h", interval=0.05, fall=1, rise=1,
                           eject_after=1, eject_base=30)
        async with checking([down, up], cfg) as (hc, bal, log):
            assert await until(lambda: all(s["checked"] for s in hc.snapshot()))
            assert [s["state"] for s in hc.snapshot()] == ["DOWN", "UP"]
            hc.on_failure(1, "connection reset")   # UP, ejected, the only one: back
            snap = hc.snapshot()
            assert snap[1]["eligible"] and snap[1]["trial"] and snap[1]["ejections"] == 1
            assert not snap[0]["eligible"] and bal.eligible_calls(0) == [False]
            up.status = 500                         # now DOWN as well
            assert await until(lambda: hc.snapshot()[1]["state"] == "DOWN")
            assert hc.all_down()
            await asyncio.sleep(0.2)
            assert hc.all_down() and bal.eligible_calls(0) == [False]
            assert hc.retry_after() == 1            # one check interval, rounded up
        await down.close()
        await up.close()

    run(go)


# ---------------------------------------------------------------- admin, all down, snapshot

def test_admin_drain_and_all_down():
    async def go():
        async with checking([1, 2], HealthConfig()) as (hc, bal, log):
            assert not hc.all_down()
            hc.set_admin(0, False)
            hc.set_admin(0, False)
            assert bal.eligible_calls() == [False]
            hc.on_failure(0, "x")  # drained: ignored
            assert hc.snapshot()[0]["passive_failures"] == 0
            assert not hc.all_down()
            hc.set_admin(1, False)
            assert hc.all_down()
            hc.set_admin(1, True)
            assert hc.retry_after() == 1
            assert not hc.all_down()
            assert [(i, v) for k, i, v, _ in bal.calls] == [(0, False), (1, False), (1, True)]
            assert log.lines() == [
                "backend http://127.0.0.1:1 draining (admin)",
                "backend http://127.0.0.1:2 draining (admin)",
                "no backend is available: all are down, ejected or disabled",
                "backend http://127.0.0.1:2 enabled (admin)",
                "a backend is available again"]
            snap = hc.snapshot()
            assert snap[0]["admin"] == "disabled" and snap[1]["admin"] == "enabled"

    run(go)


def test_snapshot_fields():
    async def go():
        cfg = HealthConfig(eject_after=2, eject_base=5)
        async with checking([1, 2], cfg, weights=[3, 1]) as (hc, bal, log):
            hc.on_failure(1, "connection refused")
            hc.on_failure(1, "connection refused")
            a, b = hc.snapshot()
            assert a == {
                "index": 0, "url": "http://127.0.0.1:1", "address": "127.0.0.1:1", "pool": None,
                "state": "UP", "checked": False,
                "eligible": True, "admin": "enabled", "ejected": False,
                "ejected_until": None, "eject_remaining": 0.0, "awaiting_check": False,
                "trial": False, "held": False, "ejections": 0, "consecutive_successes": 0,
                "consecutive_failures": 0, "passive_failures": 0, "last_failure": None,
                "weight": 3, "effective_weight": None, "status": "UP", "mode": "enabled",
                "checks": 0, "check_failures": 0, "last_check": None,
                "changed_at": a["changed_at"]}
            assert abs(a["changed_at"] - time.time()) < 5
            assert b["ejected"] and not b["eligible"] and b["ejections"] == 1
            assert b["status"] == "EJECTED" and b["changed_at"] >= a["changed_at"]
            assert 4.5 < b["eject_remaining"] <= 5
            assert b["last_failure"] == "connection refused"
            assert hc.retry_after() == 5  # the ejection ends in (just under) 5 s

    run(go)


def test_default_logger_via_caplog(caplog):
    async def go():
        loop = asyncio.get_running_loop()
        hc = HealthChecker([be(0, 1), be(1, 2)], StubBalancer(2), HealthConfig(eject_after=1),
                           loop)
        hc.start()
        hc.on_failure(0, "connection refused")
        hc.on_failure(1, "connection refused")  # the last one: kept in rotation
        hc.on_failure(1, "connection refused")  # said once
        await hc.stop()

    with caplog.at_level(logging.INFO, logger="fastlb.health"):
        run(go)
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "fastlb.health"]
    assert msgs == [
        ("WARNING", "backend http://127.0.0.1:1 ejected for 5s: 1 consecutive failure "
                    "(connection refused)"),
        ("WARNING", "backend http://127.0.0.1:2 not ejected (1 consecutive failure "
                    "(connection refused)): at most 1 of 2 may be out at a time "
                    "(--max-ejected-percent)"),
        # every backend in rotation is failing: the ejected one is tried again
        ("WARNING", "no backend in rotation is working: backend http://127.0.0.1:1 "
                    "re-admitted on trial early (its back-off ends soonest)")]


# ---------------------------------------------------------------- slow start

def test_slow_start_ramp_after_ejection():
    async def go():
        slow = 0.5
        cfg = HealthConfig(eject_after=1, eject_base=0.05, eject_max=1.0, slow_start=slow)
        async with checking([1, 2], cfg, weights=[1, 3]) as (hc, bal, log):
            # startup: full (scaled) weights, no ramp
            assert [(k, i, v) for k, i, v, _ in bal.calls] == [
                ("weight", 0, WEIGHT_SCALE), ("weight", 1, 3 * WEIGHT_SCALE)]
            await asyncio.sleep(0.1)
            assert len(bal.calls) == 2

            hc.on_failure(1, "reset")
            assert await until(lambda: bal.eligible[1])
            # interrupt the ramp half-way: it stops while ejected, restarts from 10%
            await asyncio.sleep(slow / 2)
            hc.on_failure(1, "reset")
            n = len(bal.weight_calls(1))
            first_ramp = bal.weight_calls(1)[1:]
            assert first_ramp[0][0] == 30 and 3 <= len(first_ramp) < 10
            assert await until(lambda: bal.eligible[1])
            t_back = time.monotonic()
            assert len(bal.weight_calls(1)) > n  # ramp restarted
            assert bal.weight_calls(1)[n][0] == 30
            assert await until(lambda: bal.weights[1] == 300, timeout=slow + 0.5)
            ramp = [w for w, _ in bal.weight_calls(1)[n:]]
            done = bal.weight_calls(1)[-1][1]
            assert ramp[0] == 30 and ramp[-1] == 300
            assert all(a < b for a, b in zip(ramp, ramp[1:])), ramp
            assert len(ramp) >= 5
            assert slow * 0.8 < done - t_back < slow + 0.3
            await asyncio.sleep(0.1)
            assert bal.weights == [100, 300]
            assert [w for w, _ in bal.weight_calls(0)] == [100]  # backend 0 untouched
            assert hc.snapshot()[1]["effective_weight"] == 300

    run(go)


def test_slow_start_after_down_and_weight_one():
    async def go():
        hb = await HB().start()
        slow = 0.3
        cfg = HealthConfig(path="/h", interval=0.03, rise=1, fall=1, slow_start=slow)
        async with checking([hb], cfg) as (hc, bal, log):
            assert await until(lambda: hc.snapshot()[0]["checked"])
            hb.status = 500
            assert await until(lambda: not bal.eligible[0])
            hb.status = 200
            assert await until(lambda: bal.eligible[0])
            n = 1  # the startup call
            assert await until(lambda: bal.weights[0] == WEIGHT_SCALE and
                               len(bal.weight_calls(0)) > n + 1, timeout=slow + 0.5)
            ramp = [w for w, _ in bal.weight_calls(0)[n:]]
            assert ramp[0] == 10 and ramp[-1] == 100  # 10% of weight 1 is expressible
            assert all(a < b for a, b in zip(ramp, ramp[1:])), ramp
        await hb.close()

    run(go)


def test_stop_mid_ramp_restores_full_weight():
    async def go():
        cfg = HealthConfig(eject_after=1, eject_base=0.02, slow_start=5.0)
        async with checking([1, 2], cfg, weights=[2, 1]) as (hc, bal, log):
            hc.on_failure(0, "x")
            assert await until(lambda: bal.eligible[0])
            assert bal.weights[0] == 20
        assert bal.weights[0] == 200

    run(go)


# ---------------------------------------------------------------- shutdown

@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_stop_leaves_no_tasks_sockets_or_timers(loop):
    async def go():
        hang = await HB("hang").start()
        ok = await HB().start()
        base = open_fds()
        cfg = HealthConfig(path="/h", interval=0.2, timeout=0.2, eject_after=1, eject_base=0.1)
        bal = StubBalancer(3)
        hc = HealthChecker([hang.backend(0), ok.backend(1), be(2, dead_port())], bal, cfg,
                           asyncio.get_running_loop(), logger=ListLogger(), seed=3)
        hc.start()
        assert len(asyncio.all_tasks()) == 1 + 3
        assert await until(lambda: hang.conns and ok.heads, timeout=2)  # a check in flight
        hc.on_failure(1, "x")  # an ejection timer pending
        calls = len(bal.calls)
        await hc.stop()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        await hc.stop()  # twice is fine
        hc.on_failure(1, "after stop")  # ignored
        await asyncio.sleep(0.2)  # the back-off would have ended by now
        assert len(bal.calls) == calls
        assert await until(lambda: not hang.conns and not ok.conns)
        assert await until(lambda: open_fds() == base), (open_fds(), base)
        await hang.close()
        await ok.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run(go, loop=loop)
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, [str(w.message) for w in unclosed]
