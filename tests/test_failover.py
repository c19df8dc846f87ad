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
    ``during`` runs once a third of the requests are done. Returns (ok, errors, seen)."""
    ok = errors = 0
    seen = {}
    total = clients * per_client
    fired = asyncio.Event()

    async def one():
        nonlocal ok, errors
        reader = writer = None
        for _ in range(per_client):
            if not fired.is_set() and ok + errors >= total // 3:
                fired.set()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                status, backend = await asyncio.wait_for(_get(reader, writer), 10)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                errors += 1
                writer = None
                continue
            if status == 200:
                ok += 1
                seen[backend] = seen.get(backend, 0) + 1
            else:
                errors += 1
            await asyncio.sleep(0)
        if writer is not None:
            writer.close()

    async def trigger():
        if during is not None:
            await fired.wait()
            during()

    trig = asyncio.ensure_future(trigger())
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 60)
    if not trig.done():
        trig.cancel()
    return ok, errors, seen


def _sequence(port, n):
    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        out = []
        for _ in range(n):
            out.append((await _get(reader, writer))[1])
        writer.close()
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("clients,per_client", [(3, 40), (200, 10)], ids=["3-parallel", "200-parallel"])
def test_kill_backend_under_load_no_client_errors(three_backends, clients, per_client):
    a, b, c = three_backends
    lb = FastlbProcess([(HOST, p.port) for p in three_backends])
    try:
        assert _sequence(lb.port, 6) == ["A", "B", "C", "A", "B", "C"]
        ok, errors, seen = asyncio.run(_load(lb.port, clients, per_client, during=b.kill))
        assert errors == 0
        assert ok == clients * per_client
        assert seen.get("A") and seen.get("C")
        # after the kill, only A and C answer
        assert set(_sequence(lb.port, 6)) == {"A", "C"}
    finally:
        lb.terminate()


def test_restarted_backend_serves_again(three_backends):
    a, b, c = three_backends
    lb = FastlbProcess([(HOST, p.port) for p in three_backends])
    try:
        b.kill()
        assert set(_sequence(lb.port, 6)) == {"A", "C"}
        b.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if "B" in _sequence(lb.port, 6):
                break
            time.sleep(0.1)
        else:
            pytest.fail("restarted backend B never served again")
    finally:
        lb.terminate()
