"""The load balancer challenge's acceptance scenario, with real processes.

Three backend processes behind ``fastlb serve``: requests go round robin; a
backend killed abruptly under parallel load costs the clients no error; once
restarted it serves again.
"""
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import HOST, REPO, FastlbProcess

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class BackendProcess:
    def __init__(self, port, name):
        self.port = port
        self.name = name
        self.start()

    def start(self):
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "backend_proc.py"), str(self.port), self.name],
            stdout=subprocess.PIPE, env=env)
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", line

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def three_backends():
    procs = [BackendProcess(free_port(), name) for name in "ABC"]
    yield procs
    for p in procs:
        p.kill()


async def _get(reader, writer):
    writer.write(b"GET /x HTTP/1.1\r\nHost: lb\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    backend = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"x-backend":
            backend = value.strip().decode()
    await reader.readexactly(length)
    return status, backend


async def _load(port, clients, per_client, during=None):
    """``clients`` keep-alive connections, each sending ``per_client`` GETs.
    ``during`` runs once a third of the requests are done. Returns (ok, errors,
    seen): ``errors`` lists what went wrong (time, status or exception)."""
    ok = 0
    errors = []
    seen = {}
    total = clients * per_client
    fired = asyncio.Event()

    async def one():
        nonlocal ok
        reader = writer = None
        for _ in range(per_client):
            if not fired.is_set() and ok + len(errors) >= total // 3:
                fired.set()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                status, backend = await asyncio.wait_for(_get(reader, writer), 10)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                errors.append((round(time.monotonic() - t0, 3), repr(e)))
                if writer is not None:
                    writer.close()
                writer = None
                continue
            if status == 200:
                ok += 1
                seen[backend] = seen.get(backend, 0) + 1
            else:
                errors.append((round(time.monotonic() - t0, 3), status))
            await asyncio.sleep(0)
        if writer is not None:
            writer.close()

    async def trigger():
        if during is not None:
            await fired.wait()
            during()
            killed_at.append(round(time.monotonic() - t0, 3))

    t0 = time.monotonic()
    killed_at = []
    trig = asyncio.ensure_future(trigger())
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 60)
    if not trig.done():
        trig.cancel()
    if errors:
        errors.append(("the backend was killed at", killed_at))
    return ok, errors, seen


async def _close(writer):
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


def _sequence(port, n):
    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            return [(await _get(reader, writer))[1] for _ in range(n)]
        finally:
            await _close(writer)

    return asyncio.run(go())


MODES = {
    # active checks as in the challenge: probe /health every second
    "active": ["--health-path", "/health", "--health-interval", "1"],
    # no active checks: only failures on real traffic eject a backend
    "passive": ["--eject-base", "1"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("clients,per_client", [(3, 40), (200, 10)], ids=["3-parallel", "200-parallel"])
def test_kill_backend_under_load_no_client_errors(three_backends, clients, per_client, mode):
    a, b, c = three_backends
    # the stop at the end is bounded: a connection left open after the load
    # (seen rarely on a loaded machine, cause not found yet) waits 3 s, not 30
    lb = FastlbProcess([(HOST, p.port) for p in three_backends], *MODES[mode],
                       "--drain-timeout", "3")
    try:
        assert _sequence(lb.port, 6) == ["A", "B", "C", "A", "B", "C"]
        ok, errors, seen = asyncio.run(_load(lb.port, clients, per_client, during=b.kill))
        assert errors == [], errors
        assert ok == clients * per_client
        assert seen.get("A") and seen.get("C")
        # after the kill, only A and C answer
        assert set(_sequence(lb.port, 6)) == {"A", "C"}
    finally:
        lb.terminate()


def _wait_for_backend(port, name, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if name in _sequence(port, 6):
                return time.monotonic()
        except (asyncio.IncompleteReadError, OSError):
            pass  # 503 while every backend is down closes the connection
        time.sleep(0.05)
    pytest.fail(f"backend {name} did not serve again within {limit} s")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_restarted_backend_serves_again(three_backends, mode):
    a, b, c = three_backends
    lb = FastlbProcess([(HOST, p.port) for p in three_backends], *MODES[mode])
    try:
        b.kill()
        assert set(_sequence(lb.port, 6)) == {"A", "C"}
        time.sleep(1.5)  # let the checks notice
        b.start()
        t0 = time.monotonic()
        # active: interval x rise + 1 s; passive: the 1 s ejection, then a trial request
        _wait_for_backend(lb.port, "B", 3.5)
        assert time.monotonic() - t0 < 3.5
    finally:
        lb.terminate()


def _get_once(port):
    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"GET /x HTTP/1.1\r\nHost: lb\r\n\r\n")
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        finally:
            await _close(writer)

    return asyncio.run(go())


def test_all_backends_down_503_then_recovers(three_backends):
    """Active checks: once they find every backend DOWN, 503 at once."""
    lb = FastlbProcess([(HOST, p.port) for p in three_backends], *MODES["active"])
    try:
        for p in three_backends:
            p.kill()
        # until the checks notice, requests fail over and end in 502; then 503 at once
        deadline = time.monotonic() + 6
        while True:
            t0 = time.monotonic()
            head = _get_once(lb.port)
            took = time.monotonic() - t0
            if head.startswith(b"HTTP/1.1 503"):
                break
            assert head.startswith(b"HTTP/1.1 502"), head
            assert time.monotonic() < deadline, "never answered 503"
            time.sleep(0.1)
        assert b"\r\nRetry-After: " in head
        assert took < 0.5
        # the process keeps serving; a restarted backend brings traffic back
        three_backends[0].start()
        _wait_for_backend(lb.port, "A", 4)
    finally:
        lb.terminate()


def test_all_backends_down_passive_keeps_trying_then_recovers(three_backends):
    """Passive checks only: ejection never empties the pool, so with every
    backend dead requests keep being tried (502 at once, never 503), and a
    restarted backend serves within a few requests, not after its back-off
    (doubled on every failed trial meanwhile)."""
    lb = FastlbProcess([(HOST, p.port) for p in three_backends], *MODES["passive"])
    try:
        for p in three_backends:
            p.kill()
        deadline = time.monotonic() + 2.5
        n = 0
        while time.monotonic() < deadline and n < 200:
            t0 = time.monotonic()
            head = _get_once(lb.port)
            assert head.startswith(b"HTTP/1.1 502"), head
            assert time.monotonic() - t0 < 0.5
            n += 1
            time.sleep(0.01)
        assert n >= 20
        three_backends[1].start()
        t0 = time.monotonic()
        _wait_for_backend(lb.port, "B", 4)
        assert time.monotonic() - t0 < 1.0
    finally:
        lb.terminate()


def test_health_checks_carry_user_agent_and_path(tmp_path):
    """A backend sees the probes: GET on --health-path with fastlb's User-Agent."""
    seen = []

    async def main():
        async def handle(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        lb = await asyncio.to_thread(
            FastlbProcess, [(HOST, port)], "--health-path", "/healthz", "--health-interval", "0.2")
        try:
            for _ in range(50):
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(lb.terminate)
            server.close()

    asyncio.run(main())
    assert len(seen) >= 2
    assert seen[0].startswith(b"GET /healthz HTTP/1.1\r\n")
    assert b"\r\nUser-Agent: fastlb-health/" in seen[0]
