"""Differential fuzzing: what fastlb forwards against what h11 reads.

``tests/fuzzgen.py`` generates request streams from an HTTP/1.1 grammar
(smuggling shapes, pipelining, mutations), sends each through a real
``fastlb serve`` (on the active core) in front of an h11 backend that records
every request it gets, and checks that fastlb forwards exactly the requests
h11 reads from the original, or refuses (see its docstring for the
invariant). Here a fixed seed and budget run in CI; ``make fuzz`` runs a
million cases. Known differences are listed, with their reasons, in
``fuzzgen.ALLOWED``; anything else fails this test with a minimised case.

Also here: the checker catches a proxy that desyncs (so a pass means
something), the comparison rules one by one, and the compiled core against
the pure one on inputs of the same grammar (the CI twin of
``tests/fuzz_atheris.py``).
"""
import asyncio
import os
import random
import re

import h11
import pytest
import uvloop

import fuzzgen as F
import fuzz_atheris
from helpers import HOST, active_core  # noqa: F401
from fastlb import _core_py
from fastlb import core as _switch

# Each CI run (compiled, then pure) takes about 25 and 40 s for these on 2 cores.
CASES = int(os.environ.get("FASTLB_FUZZ_CASES", "25000"))
SEED = int(os.environ.get("FASTLB_FUZZ_SEED", "8"))
TIME_LIMIT = float(os.environ.get("FASTLB_FUZZ_TIME_LIMIT", "150"))
CORE_CASES = int(os.environ.get("FASTLB_FUZZ_CORE_CASES", "20000"))


@pytest.mark.timeout(TIME_LIMIT + 150)
def test_fastlb_forwards_what_h11_reads_or_refuses(active_core):
    stats, small, err = uvloop.run(F.fuzz(CASES, SEED, concurrency=32, time_limit=TIME_LIMIT,
                                          minimise=3, minimise_allowed=False))
    report = stats.summary(small)
    print(report)
    assert not stats.unexpected(), report
    assert b"Traceback" not in err, err[-3000:]
    # the budget ran (the time limit only guards against a machine far slower than CI's)
    assert stats.cases >= min(CASES, 2000), report
    # and exercised both sides: requests forwarded (whole, pipelined, cut off in
    # their body), refusals, agreement on both, fastlb stricter than h11, every
    # way of sending, and a health check after every 500 cases
    assert stats.forwarded > stats.cases // 3, report
    assert stats.cut > 0 and stats.outcomes["stricter"] > 0, report
    assert stats.refused.get(400, 0) > stats.cases // 10, report
    assert stats.h11_end.get("clean", 0) > 0 and stats.h11_end.get("error", 0) > 0, report
    assert all(n > 0 for n in stats.plans.values()), report
    assert stats.health >= stats.cases // 500, report


# ---------------------------------------------------------------- the checker can fail


class DesyncProxy:
    """A broken proxy: it frames requests by Content-Length alone (it never
    heard of Transfer-Encoding, so CL.TE and chunked bodies desync it), adds
    X-Forwarded-For, and pipes everything to one backend connection per
    client."""

    def __init__(self, backend_port):
        self.backend_port = backend_port
        self.server = None
        self.port = None
        self.tasks = set()

    async def start(self):
        self.server = await asyncio.start_server(self.client, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def client(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        ip = writer.get_extra_info("peername")[0].encode()
        up_r, up_w = await asyncio.open_connection(HOST, self.backend_port)

        async def back():
            while data := await up_r.read(65536):
                writer.write(data)
            writer.close()

        relay = asyncio.ensure_future(back())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                line, _, rest = head.partition(b"\r\n")
                if up_w.is_closing():
                    break
                up_w.write(line + b"\r\nX-Forwarded-For: " + ip + b"\r\n" + rest + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if not up_w.is_closing():
                up_w.write_eof()
            try:
                await asyncio.wait_for(relay, 5)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            up_w.close()
            writer.close()
            self.tasks.discard(task)

    def terminate(self):
        self.server.close()
        for t in list(self.tasks):
            t.cancel()


def test_the_checker_catches_a_proxy_that_desyncs():
    async def start(port):
        return await DesyncProxy(port).start()

    stats, _small, _err = uvloop.run(F.fuzz(600, SEED, concurrency=16, time_limit=60,
                                            proxy=start))
    found = {(f.kind, f.detail) for f, _n in stats.unexpected()}
    # bodies read as heads reach the backend as requests of their own (a
    # smuggled method or target where the client's request should be), and
    # chunked bodies arrive cut into pieces the backend cannot parse
    assert found & {("mismatch", "method"), ("mismatch", "target"), ("extra", "a request h11 does not see")}, \
        stats.summary()
    assert any(kind == "backend" for kind, _ in found), stats.summary()


def msg(raw):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    m = None
    while True:
        ev = conn.next_event()
        if type(ev) is h11.Request:
            m = F.Msg(ev)
        elif type(ev) is h11.Data:
            m.body += ev.data
        elif type(ev) is h11.EndOfMessage:
            m.trailers = [(bytes(n), bytes(v)) for n, v in ev.headers.raw_items()]
            m.complete = True
            return m


ORIG = (b"POST /p?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: 5\r\nX-Forwarded-For: 1.2.3.4\r\nVia: 1.1 other\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: t\r\n\r\n")
FWD = (b"POST /p?q=1 HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 other\r\nX-A: 1\r\nx-a: 2\r\n"
       b"Transfer-Encoding: chunked\r\nX-Forwarded-For: 1.2.3.4, 127.1.0.1\r\n"
       b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test\r\nVia: 1.1 fastlb\r\n\r\n"
       b"3\r\nhel\r\n2\r\nlo\r\n0\r\nX-T: t\r\n\r\n")


@pytest.mark.parametrize("old,new,diff", [
    (b"", b"", ""),                                            # fastlb's rewrites, re-chunked
    (b"POST /p?q=1", b"POST /p?q=2", "target"),
    (b"POST /p", b"PUT /p", "method"),
    (b"X-A: 1\r\nx-a: 2", b"x-a: 2\r\nX-A: 1", "fields"),       # order kept
    (b"X-A: 1\r\n", b"", "fields"),                             # a field dropped
    (b"X-A: 1", b"x-A: 1", "fields"),                           # name case kept
    (b"Via: 1.1 other\r\n", b"", "fields"),                     # the client's Via is kept
    (b"Host: a.test\r\n", b"Host: b.test\r\n", "host"),
    (b"lo\r\n0", b"lO\r\n0", "body"),
    (b"X-T: t", b"X-T: u", "trailers"),
])
def test_compare_rules(old, new, diff):
    assert F.compare(msg(FWD.replace(old, new, 1)), msg(ORIG)) == diff


def test_compare_hop_by_hop_and_connection_named_fields_must_go():
    assert F.compare(msg(FWD.replace(b"X-A: 1", b"X-Hop: 1\r\nX-A: 1")), msg(ORIG)) == "fields"
    assert F.compare(msg(FWD.replace(b"X-A: 1", b"Keep-Alive: 5\r\nX-A: 1")), msg(ORIG)) == "fields"


def test_compare_absolute_form():
    orig = msg(b"GET http://b.test:80/x HTTP/1.1\r\nHost: b.test\r\n\r\n")
    assert F.compare(msg(b"GET /x HTTP/1.1\r\nHost: b.test\r\n\r\n"), orig) == ""
    assert F.compare(msg(b"GET http://b.test:80/x HTTP/1.1\r\nHost: B.test\r\n\r\n"), orig) == ""
    assert F.compare(msg(b"GET /y HTTP/1.1\r\nHost: b.test\r\n\r\n"), orig) == "target"
    other = msg(b"GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert F.compare(msg(b"GET /x HTTP/1.1\r\nHost: b.test\r\n\r\n"), other) == ""
    assert F.compare(msg(b"GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n"), other) == \
        "absolute-form: Host kept, not the target's authority"


def test_h11_oracle_models_fastlbs_keep_alive_and_empty_lines():
    # HTTP/1.0 keep-alive (h11 would close) and empty lines before a request line
    msgs, end, _ = F.h11_requests(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\r\n"
                                  b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                                  b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [m.target for m in msgs] == [b"/a", b"/b"] and end == "closed"
    msgs, end, _ = F.h11_requests(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel")
    assert end == "incomplete" and bytes(msgs[0].body) == b"hel" and not msgs[0].complete
    msgs, end, reason = F.h11_requests(b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n")
    assert msgs == [] and end == "error" and "Host" in reason


def test_allowlist_is_small_and_every_entry_has_a_reason():
    assert len(F.ALLOWED) <= 6
    names = [a.name for a in F.ALLOWED]
    assert len(set(names)) == len(names)
    assert all(len(a.reason) > 40 for a in F.ALLOWED)
    # no entry allows forwarding a different request (only these kinds of mismatch)
    for a in F.ALLOWED:
        if "mismatch" in a.kinds:
            assert a.detail.pattern.startswith("^(cut-off )?absolute-form: ")


# ---------------------------------------------------------------- compiled core vs pure


@pytest.fixture(scope="module")
def C():
    if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
        pytest.skip("FASTLB_NO_EXTENSIONS=1")
    mod = _switch.implementation("c")
    if mod is None:
        if os.environ.get("FASTLB_REQUIRE_EXTENSIONS") == "1":
            pytest.fail("compiled core fastlb._core is not built")
        pytest.skip("compiled core fastlb._core is not built")
    return mod


def test_cores_agree_on_the_grammar(C):
    """fuzz_atheris.one_input on seeded inputs of the grammar, mutated the way
    libFuzzer would (flips, inserts, deletes, splices)."""
    rng = random.Random(SEED)
    inputs = fuzz_atheris.seed_inputs(rng, CORE_CASES // 2)
    for i in range(CORE_CASES // 2):
        inputs.append(F.mutate(rng, inputs[i], inputs[rng.randrange(len(inputs))]))
    ok = errs = 0
    for inp in inputs:
        fuzz_atheris.one_input(inp, _core_py, C)
        a = fuzz_atheris.outcome(fuzz_atheris.request_head, _core_py, inp[3:], b"1.2.3.4", b"http",
                                 b"fastlb", b"", False)
        ok += a[0] == "ok"
        errs += a[0] != "ok"
    # both answers occur (the streams' first heads; most carry a body or more)
    assert ok > len(inputs) // 20 and errs > len(inputs) // 20, (ok, errs)


def test_the_core_harness_finds_a_difference():
    """one_input raises when the two cores differ (a core patched to differ)."""
    class Patched:
        def __getattr__(self, name):
            return getattr(_core_py, name)

        @staticmethod
        def write_request_head(req, *args):
            return _core_py.write_request_head(req, *args).replace(b"Via: 1.1", b"Via: 1.0")

    with pytest.raises(AssertionError, match="request_head"):
        fuzz_atheris.one_input(b"\x00\x00\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n", _core_py, Patched())
    fuzz_atheris.one_input(b"\x00\x00\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n", _core_py, _core_py)
