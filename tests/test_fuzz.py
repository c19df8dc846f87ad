"""Random and mangled input, byte soup included: every connection ends with an
HTTP answer or a close, within a bound, the process logs no traceback, and it
keeps serving everyone else."""
import asyncio
import random

import pytest

from helpers import HOST, FastlbProcess, active_core, backend_loop, make_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("active_core")

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nConnection: close\r\n\r\n",
]
NOISE = [b"\r", b"\n", b"\x00", b" ", b":", b"\t", b"\r\n", b"\x7f", b"\xff", b"0", b"-1",
         b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: b\r\n",
         b"\r\n\r\n", b"HTTP/1.1", b";", b"ffffffffffffffffff"]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(data))
        if op < 0.35:
            data[pos:pos] = rng.choice(NOISE)
        elif op < 0.6 and data:
            del data[pos:pos + rng.randint(1, 4)]
        elif op < 0.8 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        else:
            data += rng.choice(VALID)   # pipelined follow-up
    return bytes(data)


async def one(port, payload, rng):
    """Send ``payload`` in random pieces, then half-close; return all that came back."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        step = rng.choice([1, 3, 7, 4096])
        try:
            for i in range(0, len(payload), step):
                writer.write(payload[i:i + step])
                await writer.drain()
            writer.write_eof()
        except OSError:
            pass  # fastlb answered and closed before the rest was sent
        try:
            return await asyncio.wait_for(reader.read(), 8)
        except OSError:
            return b"<reset>"  # our late bytes met a connection fastlb had closed
    finally:
        writer.close()


def test_mangled_requests_get_answers_and_the_proxy_keeps_serving(make_backend):
    be = make_backend("A")
    lb = FastlbProcess([be.addr], "--header-timeout", "2", "--response-timeout", "3")
    rng = random.Random(1234)
    cases = [mutate(rng, rng.choice(VALID)) for _ in range(300)]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) for _ in range(50)]

    async def go():
        results = []
        for start in range(0, len(cases), 25):
            batch = cases[start:start + 25]
            results += await asyncio.gather(*(one(lb.port, c, random.Random(i))
                                              for i, c in enumerate(batch)))
        return results

    try:
        results = asyncio.run(asyncio.wait_for(go(), 120))
        for case, out in zip(cases, results):
            # an answer, if any, is HTTP; a close without one is allowed for
            # input that never formed a request head
            assert out in (b"", b"<reset>") or out.startswith(b"HTTP/1.1 "), (case, out[:80])
        # still serving
        ok = asyncio.run(one(lb.port, VALID[0], random.Random(0)))
        assert ok.startswith(b"HTTP/1.1 200")
    finally:
        lb.terminate()
    log = b"".join(lb.stderr_lines)
    assert b"Traceback" not in log and b"Exception in callback" not in log, log[-2000:]
