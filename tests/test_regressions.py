"""Bugs found in review, each pinned by the input that showed it."""
import asyncio
import socket

import pytest
import uvloop

from fastlb.health import HealthConfig
from fastlb.server import Options, start
from helpers import HOST, active_core  # noqa: F401

pytestmark = pytest.mark.usefixtures("active_core")


def run(coro_fn, limit=20):
    async def bounded():
        return await asyncio.wait_for(coro_fn(), limit)

    return uvloop.run(bounded())


async def balancer(ports, **kw):
    opts = Options(listen_host=HOST, listen_port=0,
                   backends=tuple((HOST, p) for p in ports), **kw)
    proxy, server = await start(opts)
    return proxy, server, server.sockets[0].getsockname()[1]


async def stop(proxy, server):
    server.close()
    proxy.close()
    await proxy.wait_closed()


async def path_echo_backend():
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b"path " + head.split(b" ")[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, HOST, 0)
    return srv, srv.sockets[0].getsockname()[1]


async def read_response(reader):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(n)


def test_pipelined_requests_then_half_close_all_answered():
    async def go():
        srv, bport = await path_echo_backend()
        proxy, server, port = await balancer([bport])
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
        writer.write_eof()
        bodies = [(await read_response(reader))[1] for _ in range(3)]
        assert bodies == [b"path /1", b"path /2", b"path /3"]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
        writer.close()
        await stop(proxy, server)
        srv.close()

    run(go)


def test_rejected_request_logs_its_own_bytes(tmp_path):
    log = tmp_path / "access.log"

    async def go():
        srv, bport = await path_echo_backend()
        proxy, server, port = await balancer([bport], access_log=str(log))
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(reader)
        writer.write(b"GET /bad HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 400")
        writer.close()
        await stop(proxy, server)
        srv.close()
        return len(head) + len(body)

    size = run(go)
    lines = log.read_text().splitlines()
    assert lines[1].split('" ')[1].startswith(f"400 {size} ")


def test_connect_queue_pause_does_not_outlive_a_failed_request():
    """A body queued past the limit while connecting, then the connect fails:
    the next request on the connection must still be read."""
    async def go():
        blackhole = socket.socket()
        blackhole.bind((HOST, 0))
        blackhole.listen(0)
        fillers = []
        for _ in range(4):  # fill the backlog: connects now hang
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(blackhole.getsockname())
            except BlockingIOError:
                pass
            fillers.append(s)
        proxy, server, port = await balancer([blackhole.getsockname()[1]],
                                             connect_timeout=1.0, retries=0)
        reader, writer = await asyncio.open_connection(HOST, port)
        size = 300000
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                     + b"a" * size)
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 502")
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_response(reader)   # answered, not hung
        assert head.startswith(b"HTTP/1.1 502")
        writer.close()
        await stop(proxy, server)
        for s in fillers + [blackhole]:
            s.close()

    run(go)


R_DONE = 2  # fastlb._proxy's R_DONE (a C constant of the compiled data path)


def test_upload_backpressure_pause_ends_with_the_exchange():
    """The backend answers before reading an upload (its buffer full): the next
    request on the client connection must still be read."""
    async def go():
        async def handle(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    low = head.lower()
                    n = int(low.split(b"content-length: ")[1].split(b"\r\n")[0]) \
                        if b"content-length: " in low else 0
                    if n:
                        # answer once fastlb has read the whole upload (it
                        # sits in its write buffers and the kernel's, unread
                        # here): how long that takes depends on the machine
                        for _ in range(400):
                            if proxy.clients and all(c.state == R_DONE for c in proxy.clients):
                                break
                            await asyncio.sleep(0.025)
                        await asyncio.sleep(0.05)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    if n:
                        await reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(handle, HOST, 0)
        srv.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        proxy, server, port = await balancer([srv.sockets[0].getsockname()[1]])
        reader, writer = await asyncio.open_connection(HOST, port)
        size = 3000000
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                     + b"a" * size)
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await stop(proxy, server)
        srv.close()

    run(go)


def test_trial_ends_with_the_first_success():
    """A backend re-admitted on trial after an ejection leaves the trial with
    its first success, even if its failure streak had been reset meanwhile."""
    async def go():
        srv, bport = await path_echo_backend()
        srv2, bport2 = await path_echo_backend()   # the pool is never emptied by ejection
        proxy, server, port = await balancer(
            [bport, bport2], health=HealthConfig(eject_after=3, eject_base=0.2))
        hc = proxy.health
        for _ in range(3):
            proxy.note_failure(proxy.backends[0], "test")
        assert hc.snapshot()[0]["ejected"]
        proxy.backends[0].fail_streak = 0   # a request in flight succeeded meanwhile
        for _ in range(100):
            if hc.snapshot()[0]["trial"]:
                break
            await asyncio.sleep(0.02)
        assert hc.snapshot()[0]["trial"]
        reader, writer = await asyncio.open_connection(HOST, port)
        for i in (1, 2):    # round robin: one of the two reaches backend 0
            writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            await read_response(reader)
        assert not hc.snapshot()[0]["trial"]
        writer.close()
        await stop(proxy, server)
        srv.close()
        srv2.close()

    run(go)


def test_error_answer_survives_unread_input():
    """A request refused while the client is still sending (here: 431 for a
    head with 1 MiB more behind it) must still reach the client: fastlb shuts
    its side and drains instead of closing with unread input (a reset)."""
    async def go():
        srv, bport = await path_echo_backend()
        proxy, server, port = await balancer([bport], max_header_size=1024)
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        data = await asyncio.wait_for(reader.read(), 10)
        assert data.startswith(b"HTTP/1.1 431 "), data[:60]
        writer.close()
        await stop(proxy, server)
        srv.close()

    run(go)
