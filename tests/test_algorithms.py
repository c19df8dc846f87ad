"""The balancing algorithms through the real data path: fastlb in front of real backends."""
import asyncio
import collections
import concurrent.futures

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    HOST,
    FastlbProcess,
    LoopThread,
    active_core,
    backend_loop,
    make_backend,
    make_lb,
    stop_servers,
)

pytestmark = pytest.mark.usefixtures("active_core")


def names(lb, n, headers=None):
    with httpx.Client(timeout=10) as c:
        return [c.get(lb.url + f"/{i}", headers=headers).headers["x-backend"] for i in range(n)]


def test_weighted_round_robin_is_smooth(make_backend, make_lb):
    bes = [make_backend(n) for n in "abc"]
    lb = make_lb(bes, algorithm="weighted-round-robin", weights=(5, 1, 1))
    assert names(lb, 14) == list("aabacaa" * 2)


def test_weight_zero_never_chosen(make_backend, make_lb):
    bes = [make_backend(n) for n in "abc"]
    for algo in ("weighted-round-robin", "random", "least-conn", "p2c"):
        lb = make_lb(bes, algorithm=algo, weights=(1, 0, 1))
        assert "b" not in names(lb, 30), algo


def test_maglev_keys_stick_and_missing_key_falls_back(make_backend, make_lb):
    bes = [make_backend(n) for n in "abcd"]
    lb = make_lb(bes, algorithm="maglev", hash_key="header:X-User")
    by_user = {}
    for user in [f"user-{i}" for i in range(40)]:
        got = set(names(lb, 3, headers={"X-User": user}))
        assert len(got) == 1, user       # one user, one backend
        by_user[user] = got.pop()
    assert len(set(by_user.values())) >= 3  # and users spread over the backends
    # no X-User: weighted round robin over all of them
    assert sorted(names(lb, 8)) == sorted("abcd" * 2)


def test_maglev_cookie_and_query_keys(make_backend, make_lb):
    bes = [make_backend(n) for n in "abcd"]
    lb = make_lb(bes, algorithm="maglev", hash_key="cookie:sid")
    with httpx.Client(timeout=10) as c:
        first = {c.get(lb.url + "/", headers={"Cookie": f"a=1; sid=s{i}"}).headers["x-backend"]
                 for i in range(3) for _ in range(3)}
    assert 1 <= len(first) <= 3
    lb2 = make_lb(bes, algorithm="maglev", hash_key="query:u")
    with httpx.Client(timeout=10) as c:
        for i in range(10):
            got = {c.get(lb2.url + f"/p?x=1&u={i}").headers["x-backend"] for _ in range(3)}
            assert len(got) == 1


def test_maglev_ip_key_pins_a_client(make_backend, make_lb):
    bes = [make_backend(n) for n in "abcd"]
    lb = make_lb(bes, algorithm="maglev")  # hash_key defaults to the client address
    assert len(set(names(lb, 12))) == 1


class DelayBackends:
    """Backends answering after a fixed delay each; they count requests in flight."""

    def __init__(self, delays):
        self.lt = LoopThread("delay-backends")
        self.delays = delays
        self.served = collections.Counter()
        self.servers = []
        self.addrs = []
        for name, delay in delays.items():
            srv = self.lt.call(self._start(name, delay))
            self.servers.append(srv)
            self.addrs.append((HOST, srv.sockets[0].getsockname()[1]))

    async def _start(self, name, delay):
        async def handle(reader, writer):
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    await asyncio.sleep(delay)
                    self.served[name] += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Backend: " + name.encode()
                                 + b"\r\nContent-Length: 2\r\n\r\nok")
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, HOST, 0)

    def stop(self):
        stop_servers(self.lt, self.servers)


@pytest.mark.parametrize("algo", ["least-conn", "p2c"])
def test_least_loaded_algorithms_prefer_fast_backends(make_lb, algo):
    be = DelayBackends({"slow": 0.3, "fast": 0.0, "fast2": 0.0})
    try:
        lb = make_lb(be.addrs, algorithm=algo)

        def worker(n):
            with httpx.Client(timeout=10) as c:
                return [c.get(lb.url + "/").headers["x-backend"] for _ in range(n)]

        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            results = [x for r in ex.map(worker, [8] * 6) for x in r]
        count = collections.Counter(results)
        assert sum(count.values()) == 48
        # round robin would give the slow backend a third (16); the loaded-aware
        # algorithms keep it to the few requests that find it idle
        assert count["slow"] <= 8, count
    finally:
        be.stop()


def test_cli_weights_and_algorithm(make_backend):
    bes = [make_backend(n) for n in "abc"]
    lb = FastlbProcess([], "--algorithm", "weighted-round-robin",
                       "--backend", f"http://{HOST}:{bes[0].port},weight=5",
                       "--backend", f"http://{HOST}:{bes[1].port}",
                       "--backend", f"http://{HOST}:{bes[2].port},weight=1")
    try:
        assert names(lb, 7) == list("aabacaa")
    finally:
        lb.terminate()
