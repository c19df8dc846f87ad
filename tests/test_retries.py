"""Retries through the real data path: which requests go to another backend, and how far."""
import asyncio
import collections

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    HOST,
    LoopThread,
    active_core,
    backend_loop,
    free_dead_port,
    make_backend,
    make_lb,
    stop_servers,
)

pytestmark = pytest.mark.usefixtures("active_core")


class ClosingBackend:
    """Reads a request head, waits ``delay``, then closes without answering."""

    def __init__(self, delay):
        self.lt = LoopThread("closing-backend")
        self.heads = []

        async def start():
            async def handle(reader, writer):
                try:
                    self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                    await asyncio.sleep(delay)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
                writer.transport.abort()

            return await asyncio.start_server(handle, HOST, 0)

        self.server = self.lt.call(start())
        self.addr = (HOST, self.server.sockets[0].getsockname()[1])

    def stop(self):
        stop_servers(self.lt, [self.server])


@pytest.fixture
def closing_backend():
    made = []

    def make(delay=0.0):
        be = ClosingBackend(delay)
        made.append(be)
        return be

    yield make
    for be in made:
        be.stop()


def test_connect_failure_goes_to_next_backend_for_any_method(make_backend, make_lb):
    good = make_backend("good")
    lb = make_lb([(HOST, free_dead_port()), good.addr])
    with httpx.Client(timeout=10) as c:
        for _ in range(4):
            r = c.post(lb.url + "/p", content=b"payload")
            assert r.status_code == 200 and r.json()["body"] == "payload"


def test_retries_zero_gives_502_at_once(make_backend, make_lb):
    good = make_backend("good")
    lb = make_lb([(HOST, free_dead_port()), good.addr], retries=0)
    with httpx.Client(timeout=10) as c:
        statuses = [c.get(lb.url + "/").status_code for _ in range(4)]
    assert collections.Counter(statuses) == {200: 2, 502: 2}


def test_idempotent_request_retried_after_backend_closes(make_backend, make_lb, closing_backend):
    bad = closing_backend()
    good = make_backend("good")
    lb = make_lb([bad.addr, good.addr])
    with httpx.Client(timeout=10) as c:
        for _ in range(4):
            r = c.get(lb.url + "/g")
            assert r.status_code == 200 and r.headers["x-backend"] == "good"
    assert bad.heads  # the bad backend did get the requests first


def test_non_idempotent_request_never_replayed(make_backend, make_lb, closing_backend):
    bad = closing_backend()
    good = make_backend("good")
    lb = make_lb([bad.addr, good.addr])
    with httpx.Client(timeout=10) as c:
        statuses = [c.post(lb.url + "/p", content=b"x").status_code for _ in range(4)]
    assert collections.Counter(statuses) == {200: 2, 502: 2}
    assert all(r.method == "POST" for r in good.requests)
    assert len(good.requests) == 2   # the POSTs the bad backend got were not sent again


def test_no_new_try_after_retry_timeout(make_backend, make_lb, closing_backend):
    slow_bad = closing_backend(delay=0.8)
    good = make_backend("good")
    lb = make_lb([slow_bad.addr, good.addr], retry_timeout=0.3)
    with httpx.Client(timeout=10) as c:
        statuses = [c.get(lb.url + "/").status_code for _ in range(2)]
    assert sorted(statuses) == [200, 502]
    lb2 = make_lb([slow_bad.addr, good.addr])  # default 10 s: retried
    with httpx.Client(timeout=10) as c:
        assert [c.get(lb2.url + "/").status_code for _ in range(2)] == [200, 200]
