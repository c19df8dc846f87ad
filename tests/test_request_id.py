"""Request ids (README, "Observability", request ids): an id per request, kept
from the client when it sent a valid one, forwarded, returned, logged.

* The core, on each twin: the ids (UUID-shaped, unique, the same sequence
  from the same seed on both cores, drawn again in a forked child); a
  parsed head given its id (``assign_request_id``: kept, added, replaced)
  and written for the backend; a response head given it
  (``rewrite_response_head_with_id``) and fastlb's own answers
  (``add_request_id``); the access-log formats. Then the compiled core
  against the pure one on seeded random heads and responses.
* End to end, through a balancer on the active core with real sockets and
  a real backend: what the backend receives and the client gets back, heads
  fed whole, in pieces and a byte at a time; a backend that echoes the id;
  fastlb's own answers (400, 404, 408, 431, 502, 503, 504); the access log;
  another field name; per listener and off; two workers and a restart.
"""
import json
import os
import random
import re
import socket
import time
import uuid

import httpx
import pytest

from fastlb import _core_py as P
from fastlb import errors
from fastlb.wire import requestid as rid_py
from helpers import (  # noqa: F401  (fixtures are used by name)
    ACCESS_LOG_COMBINED,
    HANG,
    HOST,
    FastlbProcess,
    Reader,
    Reply,
    access_log_lines,
    active_core,
    backend_loop,
    exchange,
    free_dead_port,
    get,
    make_backend,
    make_config_lb,
    make_lb,
    raw_connect,
    recv_until_close,
    run_fastlb,
    send_raw,
    wait_for,
)
from test_core_parity import C, outcome, rand_request, rand_response  # noqa: F401

N_CASES = int(os.environ.get("FASTLB_PARITY_CASES", "3000"))
UUID4 = re.compile(rb"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
RID = b"X-Request-Id"
STAMP = b"27/Nov/2026:01:00:00 +0000"
KEY = 0x0F1E2D3C4B5A69788796A5B4C3D2E1F00123456789ABCDEFFEDCBA9876543210


def head(*fields, line=b"GET /a HTTP/1.1"):
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


@pytest.fixture
def seeded(core):
    """``core`` with its ids from a fixed seed; fresh random draws afterwards."""
    core.seed_request_ids(0x0123456789ABCDEF, 41, KEY)
    yield core
    reseed(core)


def reseed(core):
    """Fresh random draws, as a process starts with."""
    core.seed_request_ids(int.from_bytes(os.urandom(8), "little"),
                          int.from_bytes(os.urandom(8), "little"),
                          int.from_bytes(os.urandom(32), "little"))


# ---------------------------------------------------------------- the ids, each core

def test_ids_are_uuid_shaped_and_unique(core):
    ids = [core.new_request_id() for _ in range(100000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:2000]:
        assert UUID4.match(i), i
        assert uuid.UUID(i.decode()).version == 4
    # the first three groups are the process's, the rest differ from one id to the next
    assert len({i[:19] for i in ids}) == 1
    assert len({i[19:] for i in ids}) == len(ids)


def test_seeded_golden(seeded):
    assert [seeded.new_request_id() for _ in range(3)] == [
        b"01234567-89ab-4def-a111-0556557f8aee",
        b"01234567-89ab-4def-94db-407cb14cd65c",
        b"01234567-89ab-4def-bec3-c7b07b926cbe",
    ]


def _unmix62(y):
    """The inverse of the unkeyed mixer ids had before the permutation was
    keyed: what anyone could apply to an id to get its counter back."""
    m = (1 << 62) - 1
    y ^= y >> 33
    y = (y * pow(0x81DADEF4BC2DD44D, -1, 1 << 62)) & m
    y ^= (y >> 27) ^ (y >> 54)
    y = (y * pow(0x7FB5D329728EA185, -1, 1 << 62)) & m
    y ^= y >> 31
    return y


def _unpermute62(y, key):
    """The inverse of the keyed permutation (fastlb.wire.requestid._permute62),
    given its key: the Feistel rounds undone in reverse order."""
    keys = [(key >> (64 * i)) & ((1 << 64) - 1) for i in range(4)]
    hi, lo = y >> 31, y & ((1 << 31) - 1)
    for k in reversed(keys):
        hi, lo = lo ^ rid_py._round(hi, k), hi
    return (hi << 31) | lo


def test_the_tail_is_the_counter_through_a_bijection(core):
    """With its key, an id's last 62 bits give the counter back: no two counter
    values share an id."""
    rng = random.Random(3)
    start = rng.getrandbits(62)
    key = rng.getrandbits(256)
    core.seed_request_ids(rng.getrandbits(64), start, key)
    try:
        for k in range(1, 2001):
            tail = int(core.new_request_id()[19:].replace(b"-", b""), 16)
            assert tail >> 62 == 2                      # the variant bits
            assert _unpermute62(tail & ((1 << 62) - 1), key) == (start + k) % (1 << 62)
        # the counter wraps at 2**62 and the ids go on
        core.seed_request_ids(1, (1 << 62) - 2, key)
        tails = [int(core.new_request_id()[19:].replace(b"-", b""), 16) & ((1 << 62) - 1)
                 for _ in range(3)]
        assert [_unpermute62(t, key) for t in tails] == [(1 << 62) - 1, 0, 1]
        # another key, another permutation of the same counters
        core.seed_request_ids(1, start, key ^ 1)
        assert _unpermute62(_tail62(core.new_request_id()), key) != start + 1
    finally:
        reseed(core)


def _tail62(rid):
    """An id's last 62 bits (after its variant bits)."""
    return int(rid[19:].replace(b"-", b""), 16) & ((1 << 62) - 1)


@pytest.mark.usefixtures("active_core")
def test_ids_do_not_give_the_request_count_away(make_backend, make_lb):
    """Two ids a client got do not tell how many requests the process served
    between them: the public code (the mixer's inverse) does not give the
    counter back. With an unkeyed mixer the difference is exactly the count."""
    be = make_backend()
    lb = make_lb([be], request_id=True)
    for gap in (1, 10, 37):
        first = get(lb.port, "/a").get("x-request-id").encode()
        for _ in range(gap - 1):
            get(lb.port, "/b")
        last = get(lb.port, "/c").get("x-request-id").encode()
        assert last[:19] == first[:19]      # the same process
        seen = (_unmix62(_tail62(last)) - _unmix62(_tail62(first))) % (1 << 62)
        assert seen != gap, (first, last)


def test_a_forked_child_draws_its_own(core):
    parent = core.new_request_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child: its next id, then out at once
        try:
            os.write(w, core.new_request_id())
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 100)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert UUID4.match(child)
    assert child[:19] != parent[:19]


@pytest.mark.parametrize("value, ok", [
    (b"abc", True), (b"8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60", True), (b"x" * 200, True),
    (b"Ab09-_.:@+/=", True), (b"x" * 201, False), (b"", False), (b"a b", False),
    (b"a,b", False), (b'"q"', False), (b"a\\b", False), (b"caf\xc3\xa9", False), (b"a;b", False),
    (b"a\tb", False),
])
def test_valid_request_id(core, value, ok):
    assert core.valid_request_id(value) is ok


def test_valid_request_id_parity(C):
    rng = random.Random(5)
    for _ in range(N_CASES):
        value = bytes(rng.randrange(256) if rng.random() < 0.05 else rng.randrange(0x21, 0x7F)
                      for _ in range(rng.choice([0, 1, 5, 36, 199, 200, 201, 300])))
        assert C.valid_request_id(value) == P.valid_request_id(value), value


# ---------------------------------------------------------------- a parsed head gets its id

def assigned(core, raw, name=RID, trusted=False):
    r = core.parse_request_head(raw)
    rid = core.assign_request_id(r, name)
    return rid, core.write_request_head(r, b"10.1.2.3", trusted=trusted)


def test_missing_id_is_added_after_the_clients_fields(seeded):
    rid, out = assigned(seeded, head(b"Host: h", b"Accept: */*"))
    assert rid == b"01234567-89ab-4def-a111-0556557f8aee"
    assert out == (b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nX-Request-Id: " + rid
                   + b"\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n"
                   b"X-Forwarded-Host: h\r\nVia: 1.1 fastlb\r\n\r\n")


def test_valid_client_id_is_kept_in_place(seeded):
    for field, value in [(b"X-Request-Id: abc-1", b"abc-1"), (b"x-request-id:  abc-1 \t", b"abc-1"),
                         (b"X-REQUEST-ID: " + b"z" * 200, b"z" * 200)]:
        rid, out = assigned(seeded, head(b"Host: h", field, b"Accept: */*"))
        assert rid == value
        assert out.startswith(b"GET /a HTTP/1.1\r\nHost: h\r\n" + field.split(b":")[0] + b": "
                              + value + b"\r\nAccept: */*\r\nX-Forwarded-For: ")
        assert out.count(value) == 1
    # nothing was drawn for them
    assert seeded.new_request_id() == b"01234567-89ab-4def-a111-0556557f8aee"


@pytest.mark.parametrize("fields", [
    (b"X-Request-Id: a b",),                                # not an id's characters
    (b"X-Request-Id: " + b"z" * 201,),                      # too long
    (b"X-Request-Id:",),                                    # empty
    (b"X-Request-Id: caf\xc3\xa9",),
    (b"X-Request-Id: one", b"x-request-id: two"),           # two of them: ambiguous
    (b"X-Request-Id: one", b"X-Request-Id: one"),
])
def test_invalid_or_repeated_client_ids_are_replaced(seeded, fields):
    raw = head(b"Host: h", *fields[:1], b"Accept: */*", *fields[1:])
    for trusted in (False, True):
        seeded.seed_request_ids(0x0123456789ABCDEF, 41, KEY)
        rid, out = assigned(seeded, raw, trusted=trusted)
        assert rid == b"01234567-89ab-4def-a111-0556557f8aee"
        assert out.lower().count(b"x-request-id") == 1
        assert b"\r\nAccept: */*\r\nX-Request-Id: " + rid + b"\r\nX-Forwarded-For: " in out


def test_an_id_named_in_connection_is_hop_by_hop(seeded):
    rid, out = assigned(seeded, head(b"Host: h", b"Connection: x-request-id", b"X-Request-Id: abc"))
    assert rid == b"01234567-89ab-4def-a111-0556557f8aee"
    assert b"abc" not in out and out.count(b"X-Request-Id: " + rid) == 1


def test_another_field_name(seeded):
    rid, out = assigned(seeded, head(b"Host: h", b"x-trace: t-1", b"X-Request-Id: abc"), b"X-Trace")
    assert rid == b"t-1"
    assert b"x-trace: t-1\r\nX-Request-Id: abc\r\n" in out
    rid, out = assigned(seeded, head(b"Host: h", b"X-Request-Id: abc"), b"X-Trace")
    assert UUID4.match(rid) and b"X-Request-Id: abc\r\nX-Trace: " + rid + b"\r\n" in out


def test_a_field_the_parser_handles_is_never_the_id(seeded):
    rid, out = assigned(seeded, head(b"Host: h", b"Accept: */*"), b"Host")
    assert UUID4.match(rid)
    assert out.startswith(b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nHost: " + rid + b"\r\n")


def test_assign_is_once_per_head_and_checks_its_arguments(seeded):
    r = seeded.parse_request_head(head(b"Host: h"))
    assert r.request_id is None
    first = seeded.assign_request_id(r, RID)
    assert r.request_id == first
    assert seeded.assign_request_id(r, RID) == first
    assert seeded.write_request_head(r, b"1.2.3.4").count(first) == 1
    for bad in (None, b"", "X-Request-Id"):
        with pytest.raises(TypeError):
            seeded.assign_request_id(r, bad)
    with pytest.raises(TypeError):
        seeded.assign_request_id(object(), RID)


def test_a_head_parsed_again_has_no_stale_id(seeded):
    """The compiled core refills the RequestHead nobody holds any more."""
    r = seeded.parse_request_head(head(b"Host: h"))
    seeded.assign_request_id(r, RID)
    del r
    r = seeded.parse_request_head(head(b"Host: g"))
    assert r.request_id is None
    assert b"X-Request-Id" not in seeded.write_request_head(r, b"1.2.3.4")
    assert seeded.assign_request_id(r, RID) != b""      # and it gets its own
    assert r.request_id is not None


def test_http10_absolute_and_chunked_heads(seeded):
    rid, out = assigned(seeded, head(b"X-Request-Id: k", line=b"GET http://h/x HTTP/1.0"))
    assert rid == b"k" and out.startswith(b"GET /x HTTP/1.1\r\nX-Request-Id: k\r\nHost: h\r\n")
    rid, out = assigned(seeded, head(b"Host: h", b"Transfer-Encoding: chunked",
                                     line=b"POST /u HTTP/1.1"))
    assert out == (b"POST /u HTTP/1.1\r\nHost: h\r\nX-Request-Id: " + rid
                   + b"\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 10.1.2.3\r\n"
                   b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: h\r\nVia: 1.1 fastlb\r\n\r\n")


RID_NAMES = [b"X-Request-Id", b"x-request-id", b"X-Trace", b"X-Custom", b"Host", b"Connection",
             b"Close", b"Keep-Alive", b"Accept"]
RID_VALUES = [b"8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60", b"abc", b"a b", b"x" * 200, b"x" * 201, b"",
              b"\xc3\xa9", b"a,b", b"id-1:2@h/+=", b"v"]


def with_id_fields(rng, raw):
    """``raw`` with 0-3 request-id-like fields (and maybe a Connection naming one) inserted."""
    end = raw.rfind(b"\r\n\r\n")
    if end < 0:
        return raw
    lines = raw[:end].split(b"\r\n")
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        name = rng.choice([b"X-Request-Id", b"x-request-id", b"X-REQUEST-ID", b"X-Request-Idx",
                           b"X-Trace", b"x-custom"])
        sep = rng.choice([b": ", b":", b": \t"])
        lines.insert(rng.randint(1, len(lines)), name + sep + rng.choice(RID_VALUES))
    if rng.random() < 0.1:
        lines.insert(rng.randint(1, len(lines)), b"Connection: " + rng.choice(
            [b"x-request-id", b"X-Trace", b"close, X-Request-Id", b"keep-alive"]))
    return b"\r\n".join(lines) + raw[end:]


def test_assign_parity(C):
    """Both cores give each random head the same id and write the same head for the backend."""
    rng = random.Random(11)

    def run(mod, raw, name, seed):
        mod.seed_request_ids(*seed)

        def go():
            r = mod.parse_request_head(raw)
            rid = mod.assign_request_id(r, name)
            return (rid, r.request_id, mod.write_request_head(r, b"10.0.0.1"),
                    mod.write_request_head(r, b"10.0.0.1", trusted=True),
                    mod.assign_request_id(r, name), r.forwarded_for)
        return outcome(go)

    checked = 0
    for i in range(N_CASES):
        raw = with_id_fields(rng, rand_request(rng))
        name = rng.choice(RID_NAMES)
        seed = (rng.getrandbits(64), rng.getrandbits(62), rng.getrandbits(256))
        want = run(P, raw, name, seed)
        assert run(C, raw, name, seed) == want, (i, raw, name)
        checked += want[0] == "ok"
    assert checked > N_CASES // 4


# ---------------------------------------------------------------- responses and fastlb's own answers

RESP = b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\n\r\n"


def test_a_final_response_gets_the_id(core):
    out, status, flags, framing, length = core.rewrite_response_head_with_id(
        RESP, errors.REQ_KEEP_ALIVE, RID, b"abc")
    assert out == b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nX-Request-Id: abc\r\n\r\n"
    assert (out, status, flags, framing, length)[1:] == core.rewrite_response_head(
        RESP, errors.REQ_KEEP_ALIVE)[1:]
    # closing: the id comes before fastlb's Connection: close
    out = core.rewrite_response_head_with_id(RESP, 0, RID, b"abc")[0]
    assert out.endswith(b"\r\nX-Request-Id: abc\r\nConnection: close\r\n\r\n")


def test_the_backends_own_id_is_not_doubled(core):
    for field in (b"X-Request-Id: theirs", b"x-request-id: abc", b"X-REQUEST-ID:"):
        resp = b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 0\r\n\r\n"
        out = core.rewrite_response_head_with_id(resp, errors.REQ_KEEP_ALIVE, RID, b"abc")[0]
        assert out == core.rewrite_response_head(resp, errors.REQ_KEEP_ALIVE)[0]
        assert out.lower().count(b"x-request-id") == 1
    # one the backend names in Connection does not reach the client: fastlb's does
    resp = b"HTTP/1.1 200 OK\r\nConnection: X-Request-Id\r\nX-Request-Id: t\r\nContent-Length: 0\r\n\r\n"
    out = core.rewrite_response_head_with_id(resp, errors.REQ_KEEP_ALIVE, RID, b"abc")[0]
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Request-Id: abc\r\n\r\n"


def test_interim_responses_do_not_get_it_and_a_101_does(core):
    for line in (b"HTTP/1.1 100 Continue", b"HTTP/1.1 103 Early Hints"):
        resp = line + b"\r\nLink: </a>\r\n\r\n"
        assert core.rewrite_response_head_with_id(resp, 1, RID, b"abc")[0] == \
            core.rewrite_response_head(resp, 1)[0]
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    out = core.rewrite_response_head_with_id(resp, errors.REQ_UPGRADE, RID, b"abc")[0]
    assert out == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"X-Request-Id: abc\r\nConnection: upgrade\r\n\r\n")


def test_response_without_an_id_or_with_bad_arguments(core):
    for name, value in ((None, b"a"), (RID, None), (b"", b"a"), (RID, b"")):
        assert core.rewrite_response_head_with_id(RESP, 1, name, value) == \
            core.rewrite_response_head(RESP, 1)
    with pytest.raises(TypeError):
        core.rewrite_response_head_with_id(RESP, 1, "X-Request-Id", b"a")
    with pytest.raises(errors.BadGateway):
        core.rewrite_response_head_with_id(b"HTTP/1.1 200 OK\r\n", 1, RID, b"a")


def test_response_parity(C):
    rng = random.Random(12)
    for i in range(N_CASES):
        raw = with_id_fields(rng, rand_response(rng))
        flags = rng.choice([0, 1, 2, 16, 17, 32, 33])
        name = rng.choice(RID_NAMES + [None])
        value = rng.choice([b"abc", b"8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60", b"", None])
        want = outcome(P.rewrite_response_head_with_id, raw, flags, name, value)
        assert outcome(C.rewrite_response_head_with_id, raw, flags, name, value) == want, (i, raw)


def test_fastlbs_own_answers_get_it(core):
    msg = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 16\r\n\r\n502 Bad Gateway\n"
    assert core.add_request_id(msg, RID, b"abc") == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 16\r\nX-Request-Id: abc\r\n\r\n"
        b"502 Bad Gateway\n")
    assert core.add_request_id(b"HTTP/1.1 200 OK\r\n\r\n", RID, b"a") == \
        b"HTTP/1.1 200 OK\r\nX-Request-Id: a\r\n\r\n"
    has = b"HTTP/1.1 200 OK\r\nx-request-id: b\r\n\r\nX-Request-Id: not a field\r\n"
    assert core.add_request_id(has, RID, b"a") == has
    assert core.add_request_id(msg, None, b"a") == msg
    with pytest.raises(ValueError):
        core.add_request_id(b"HTTP/1.1 200 OK\r\n", RID, b"a")
    with pytest.raises(TypeError):
        core.add_request_id(msg, RID, "a")


def test_add_parity(C):
    rng = random.Random(13)
    for i in range(N_CASES):
        raw = with_id_fields(rng, rand_response(rng)) + rng.choice([b"", b"body\r\n\r\nmore"])
        name = rng.choice(RID_NAMES)
        assert outcome(C.add_request_id, raw, name, b"abc") == \
            outcome(P.add_request_id, raw, name, b"abc"), (i, raw)


# ---------------------------------------------------------------- the access log's formats

LOG_HEAD = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: u\r\nX-Request-Id: theirs\r\n\r\n"


def test_combined_never_shows_the_id(core):
    plain = core.access_log_line(0, LOG_HEAD, b"1.1.1.1", STAMP, 200, 10, b"b:1", 0.001, 0.002)
    assert core.access_log_line(0, LOG_HEAD, b"1.1.1.1", STAMP, 200, 10, b"b:1", 0.001, 0.002,
                                b"mine") == plain
    assert plain == (b'1.1.1.1 - - [27/Nov/2026:01:00:00 +0000] "GET /a HTTP/1.1" 200 10 '
                     b'"-" "u" b:1 2.000ms 1.000ms\n')


def test_combined_id_and_json_carry_it(core):
    args = (LOG_HEAD, b"1.1.1.1", STAMP, 200, 10, b"b:1", 0.001, 0.002)
    plain = core.access_log_line(0, *args)
    assert core.access_log_line(2, *args, b"mine") == plain[:-1] + b' "mine"\n'
    # without one given: the head's X-Request-Id, as JSON has always shown it
    assert core.access_log_line(2, *args) == plain[:-1] + b' "theirs"\n'
    assert core.access_log_line(2, b"GET / HTTP/1.1\r\n\r\n", *args[1:]).endswith(b' "-"\n')
    assert core.access_log_line(2, b'GET / HTTP/1.1\r\nX-Request-Id: "\r\n\r\n', *args[1:]) \
        .endswith(b' "\\x22"\n')
    assert json.loads(core.access_log_line(1, *args, b"mine"))["request_id"] == "mine"
    assert json.loads(core.access_log_line(1, *args))["request_id"] == "theirs"
    buf = core.AccessLogBuffer(2)
    buf.stamp = STAMP
    buf.add_id(*args[:2], 200, 10, b"b:1", 0.001, 0.002, b"mine")
    buf.add(*args[:2], 200, 10, b"b:1", 0.001, 0.002)
    assert buf.take() == plain[:-1] + b' "mine"\n' + plain[:-1] + b' "theirs"\n'
    with pytest.raises(TypeError):
        core.access_log_line(2, *args, "mine")
    with pytest.raises(TypeError):
        buf.add_id(*args[:2], 200, 10, b"b:1", 0.001, 0.002, None)


def test_log_parity_with_ids(C):
    rng = random.Random(14)
    bufs = [M.AccessLogBuffer(2, 500) for M in (P, C)]
    for b in bufs:
        b.stamp = STAMP
    for i in range(N_CASES):
        raw = with_id_fields(rng, rand_request(rng))
        raw = raw[:rng.randrange(len(raw) + 1)] if rng.random() < 0.2 else raw
        rid = rng.choice([None, b"abc", b"8f14e45f-ceea-467f-a0e6-1c2b3d4e5f60", b'"\xff'])
        for fmt in (0, 1, 2):
            args = (fmt, raw, b"127.0.0.1", STAMP, 200, 5, None, -1.0, 0.25, rid)
            assert C.access_log_line(*args) == P.access_log_line(*args), (i, args)
        line = (raw, b"127.0.0.1", 200, 5, None, -1.0, 0.25)
        full = [b.add(*line) if rid is None else b.add_id(*line, rid) for b in bufs]
        assert full[0] == full[1]
        if full[0]:
            assert bufs[0].take() == bufs[1].take(), i
    assert bufs[0].take() == bufs[1].take()


# ---------------------------------------------------------------- end to end

def sent_ids(resp):
    """The request-id fields the echo backend received (name as sent, value)."""
    return [(n, v) for n, v in resp.json()["headers"] if n.lower() == "x-request-id"]


def ids_of(resp, name="x-request-id"):
    """The values of a response's fields called ``name``."""
    if isinstance(resp, httpx.Response):
        return resp.headers.get_list(name)
    return [v for n, v in resp.headers if n.lower() == name]


SPLITS = [pytest.param(None, id="whole"), pytest.param([3, 17, 30, 44], id="pieces"),
          pytest.param("bytes", id="bytes")]


def raw_get(port, request, split=None, timeout=5.0):
    with raw_connect(port, timeout) as s:
        send_raw(s, request, split, delay=0.0005)
        return Reader(s, timeout).read_response()


@pytest.mark.usefixtures("active_core")
class TestThroughTheBalancer:
    @pytest.mark.parametrize("split", SPLITS)
    def test_added_when_missing(self, make_backend, make_lb, split):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        r = raw_get(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n", split)
        assert r.status == 200
        (got,) = ids_of(r)
        assert UUID4.match(got.encode())
        assert sent_ids(r) == [("X-Request-Id", got)]

    @pytest.mark.parametrize("split", SPLITS)
    def test_kept_when_the_client_sent_one(self, make_backend, make_lb, split):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        r = raw_get(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\nx-request-id: client-7\r\n"
                             b"Accept: */*\r\n\r\n", split)
        assert ids_of(r) == ["client-7"]
        assert sent_ids(r) == [("x-request-id", "client-7")]

    @pytest.mark.parametrize("split", SPLITS)
    @pytest.mark.parametrize("fields", [b"X-Request-Id: " + b"q" * 201 + b"\r\n",
                                        b"X-Request-Id: no spaces\r\n",
                                        b"X-Request-Id: a\r\nX-Request-Id: b\r\n"])
    def test_replaced_when_invalid(self, make_backend, make_lb, split, fields):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        r = raw_get(lb.port, b"GET /x HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n", split)
        (got,) = ids_of(r)
        assert UUID4.match(got.encode())
        assert sent_ids(r) == [("X-Request-Id", got)]

    def test_unique_over_many_requests(self, make_backend, make_lb):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        seen = []
        with httpx.Client(timeout=5) as c:     # keep-alive
            for _ in range(300):
                r = c.get(lb.url + "/k")
                seen.append(r.headers["x-request-id"])
                assert sent_ids(r) == [("X-Request-Id", seen[-1])]
        for _ in range(50):                     # a connection each
            seen.append(get(lb.port, "/n").get("x-request-id"))
        assert len(set(seen)) == len(seen) == 350
        assert all(UUID4.match(s.encode()) for s in seen)

    def test_pipelined_requests_each_get_their_own(self, make_backend, make_lb):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        req = b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n"
        with raw_connect(lb.port) as s:
            s.sendall(req * 3 + b"GET /q HTTP/1.1\r\nHost: t\r\nX-Request-Id: mine\r\n\r\n")
            rd = Reader(s)
            resps = [rd.read_response() for _ in range(4)]
        ids = [ids_of(r)[0] for r in resps]
        assert [sent_ids(r)[0][1] for r in resps] == ids
        assert len(set(ids)) == 4 and ids[3] == "mine"

    def test_the_same_id_on_a_retry(self, make_backend, make_lb):
        bad = make_backend("B", handler=lambda be, req: Reply(None, close=True))
        good = make_backend("G")
        lb = make_lb([bad, good], request_id=True, retries=1)
        back = []
        for _ in range(2):      # round robin: one of them starts on the backend that fails
            r = get(lb.port, "/r")
            assert r.status == 200 and r.json()["backend"] == "G"
            assert sent_ids(r) == [("X-Request-Id", r.get("x-request-id"))]
            back.append(r.get("x-request-id"))
        failed = [q.get("x-request-id") for q in bad.requests]
        assert failed and set(failed) <= set(back)      # tried there first, then retried
        assert [q.get("x-request-id") for q in good.requests] == back
        assert len(set(back)) == 2

    def test_not_doubled_when_the_backend_echoes_it(self, make_backend, make_lb):
        def echo(be, req):
            return (b"HTTP/1.1 200 OK\r\nx-request-id: " + req.get("x-request-id").encode()
                    + b"\r\nContent-Length: 2\r\n\r\nok")

        def own(be, req):
            return b"HTTP/1.1 200 OK\r\nX-Request-Id: the-backends\r\nContent-Length: 2\r\n\r\nok"

        be = make_backend(handler=echo)
        lb = make_lb([be], request_id=True)
        r = get(lb.port, "/e")
        assert ids_of(r) == [be.requests[0].get("x-request-id")]
        assert UUID4.match(ids_of(r)[0].encode())
        # the backend's field (its lowercase name), not a second one of fastlb's
        assert [n for n, _ in r.headers if n.lower() == "x-request-id"] == ["x-request-id"]
        lb = make_lb([make_backend(handler=own)], request_id=True)
        r = get(lb.port, "/o", headers=b"X-Request-Id: client-1\r\n")
        assert ids_of(r) == ["the-backends"]

    def test_http10_chunked_and_a_post(self, make_backend, make_lb):
        be = make_backend()
        lb = make_lb([be], request_id=True)
        r = raw_get(lb.port, b"GET /o HTTP/1.0\r\n\r\n")
        assert len(ids_of(r)) == 1 and sent_ids(r) == [("X-Request-Id", ids_of(r)[0])]
        r = raw_get(lb.port, b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\n")
        assert r.json()["body"] == "abc" and sent_ids(r) == [("X-Request-Id", ids_of(r)[0])]

    def test_off_by_default(self, make_backend, make_lb):
        be = make_backend()
        lb = make_lb([be])
        r = get(lb.port, "/d")
        assert ids_of(r) == [] and sent_ids(r) == []
        r = get(lb.port, "/d", headers=b"X-Request-Id: a b\r\n")     # passed on as any field
        assert ids_of(r) == [] and sent_ids(r) == [("X-Request-Id", "a b")]
        assert b"x-request-id" not in raw_get(lb.port, b"GET / HTTP/1.1\r\n\r\n").raw_head.lower()

    def test_another_field_name(self, make_backend, make_lb):
        be = make_backend()
        lb = make_lb([be], request_id=True, request_id_header="X-Trace-Id")
        r = get(lb.port, "/t", headers=b"X-Request-Id: other\r\n")
        (got,) = ids_of(r, "x-trace-id")
        assert UUID4.match(got.encode()) and ids_of(r) == []
        assert [(n, v) for n, v in r.json()["headers"] if n.lower().startswith("x-")][:2] == \
            [("X-Request-Id", "other"), ("X-Trace-Id", got)]
        r = get(lb.port, "/t", headers=b"x-trace-id: t-1\r\n")
        assert ids_of(r, "x-trace-id") == ["t-1"]


@pytest.mark.usefixtures("active_core")
class TestFastlbsOwnAnswers:
    """Every answer fastlb writes itself carries the id (and its log line the same)."""

    def check(self, resp, log_path, status, expect=None):
        assert resp.status == status
        (got,) = ids_of(resp)
        if expect is None:
            assert UUID4.match(got.encode())
        else:
            assert got == expect
        (line,) = [ln for ln in access_log_lines(log_path, 1) if f'" {status} ' in ln]
        assert line.endswith(f' "{got}"'), line
        return got

    @pytest.mark.parametrize("split", SPLITS)
    def test_400_before_the_head_is_parsed(self, make_backend, make_lb, tmp_path, split):
        log = tmp_path / "a.log"
        lb = make_lb([make_backend()], request_id=True, access_log=str(log),
                     access_log_format="combined_id")
        data, _ = exchange(lb.port, b"GET /a\x01 HTTP/1.1\r\nHost: t\r\nX-Request-Id: c1\r\n\r\n",
                           split=split)
        from helpers import parse_one
        self.check(parse_one(data), log, 400)

    def test_400_after_a_good_request_gets_a_new_id(self, make_backend, make_lb, tmp_path):
        log = tmp_path / "a.log"
        lb = make_lb([make_backend()], request_id=True, access_log=str(log),
                     access_log_format="combined_id")
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n")
            rd = Reader(s)
            first = rd.read_response()
            s.sendall(b"GET /bad HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n")
            second = rd.read_response()
        assert first.status == 200 and second.status == 400
        assert ids_of(first) != ids_of(second)
        lines = access_log_lines(log, 2)
        assert [ln.rsplit(" ", 1)[1] for ln in lines] == [
            f'"{ids_of(first)[0]}"', f'"{ids_of(second)[0]}"']

    def test_404_no_route_keeps_the_clients(self, make_config_lb, make_backend, tmp_path):
        be = make_backend()
        log = tmp_path / "a.log"
        lb = make_config_lb(f"""
            access_log = "{log}"
            access_log_format = "combined_id"
            request_id = true
            [listeners.web]
            bind = "127.0.0.1:0"
            [[listeners.web.routes]]
            path_prefix = "/api/"
            pool = "app"
            [pools.app]
            backends = ["http://{HOST}:{be.port}"]
        """)
        r = get(lb.port("web"), "/nope", headers=b"X-Request-Id: client-404\r\n")
        self.check(r, log, 404, "client-404")

    def test_408_and_431(self, make_backend, make_lb, tmp_path):
        log = tmp_path / "a.log"
        lb = make_lb([make_backend()], request_id=True, access_log=str(log),
                     access_log_format="combined_id", header_timeout=0.4, max_header_size=200)
        from helpers import parse_one
        data, _ = exchange(lb.port, b"GET /slow HTTP/1.1\r\nHost: t\r\n", timeout=5)
        self.check(parse_one(data), log, 408)
        data, _ = exchange(lb.port, b"GET /big HTTP/1.1\r\nHost: t\r\nX: " + b"y" * 300
                           + b"\r\n\r\n")
        self.check(parse_one(data), log, 431)

    def test_502_503_504(self, make_backend, make_lb, tmp_path):
        log = tmp_path / "a.log"
        lb = make_lb([(HOST, free_dead_port())], request_id=True, access_log=str(log),
                     access_log_format="combined_id", retries=0)
        self.check(get(lb.port, "/dead", headers=b"X-Request-Id: c-502\r\n"), log, 502, "c-502")
        log = tmp_path / "b.log"
        lb = make_lb([make_backend()], request_id=True, access_log=str(log),
                     access_log_format="combined_id", weights=(0,))
        self.check(get(lb.port, "/none"), log, 503)
        log = tmp_path / "c.log"
        hang = make_backend(handler=lambda be, req: HANG)
        lb = make_lb([hang], request_id=True, access_log=str(log),
                     access_log_format="combined_id", response_timeout=0.3)
        got = self.check(get(lb.port, "/hang"), log, 504)
        assert hang.requests[0].get("x-request-id") == got     # the backend had it too


@pytest.mark.usefixtures("active_core")
class TestAccessLog:
    def run(self, make_backend, make_lb, tmp_path, fmt, name="a.log", **kw):
        log = tmp_path / name
        lb = make_lb([make_backend()], access_log=str(log), access_log_format=fmt, **kw)
        ids = [ids_of(get(lb.port, f"/{i}", headers=h))
               for i, h in enumerate([b"", b"X-Request-Id: client-2\r\n"])]
        return ids, access_log_lines(log, 2)

    def test_combined_stays_nginx_compatible(self, make_backend, make_lb, tmp_path):
        ids, lines = self.run(make_backend, make_lb, tmp_path, "combined", request_id=True)
        assert all(ACCESS_LOG_COMBINED.match(ln) for ln in lines), lines
        assert not any(i[0] in ln for i, ln in zip(ids, lines))

    def test_combined_id(self, make_backend, make_lb, tmp_path):
        ids, lines = self.run(make_backend, make_lb, tmp_path, "combined_id", request_id=True)
        for (rid,), ln in zip(ids, lines):
            prefix, _, last = ln.rpartition(" ")
            assert ACCESS_LOG_COMBINED.match(prefix) and last == f'"{rid}"'
        assert ids[1] == ["client-2"]

    def test_json(self, make_backend, make_lb, tmp_path):
        ids, lines = self.run(make_backend, make_lb, tmp_path, "json", request_id=True)
        assert [json.loads(ln)["request_id"] for ln in lines] == [i[0] for i in ids]
        # off: the client's X-Request-Id field, as before request ids existed
        ids, lines = self.run(make_backend, make_lb, tmp_path, "json", "off.log")
        assert ids == [[], []]
        assert [json.loads(ln)["request_id"] for ln in lines] == [None, "client-2"]

    def test_a_request_cut_short_is_logged_with_an_id(self, make_backend, make_lb, tmp_path):
        log = tmp_path / "a.log"
        lb = make_lb([make_backend()], access_log=str(log), access_log_format="json",
                     request_id=True)
        with raw_connect(lb.port) as s:
            s.sendall(b"GET /half HTTP/1.1\r\nHost: t\r\n")
            time.sleep(0.2)
        (line,) = access_log_lines(log, 1)
        doc = json.loads(line)
        assert doc["status"] == 499 and UUID4.match(doc["request_id"].encode())


# ---------------------------------------------------------------- configuration, per listener

@pytest.mark.usefixtures("active_core")
def test_per_listener_and_global(make_config_lb, make_backend):
    be = make_backend()
    lb = make_config_lb(f"""
        request_id = true
        request_id_header = "X-Global-Id"
        [listeners.a]
        bind = "127.0.0.1:0"
        default_pool = "p"
        [listeners.b]
        bind = "127.0.0.1:0"
        default_pool = "p"
        request_id = false
        [listeners.c]
        bind = "127.0.0.1:0"
        default_pool = "p"
        request_id_header = "X-C-Id"
        [pools.p]
        backends = ["http://{HOST}:{be.port}"]
    """)
    a, b, c = (get(lb.port(n), "/") for n in "abc")
    assert len(ids_of(a, "x-global-id")) == 1 and ids_of(a) == []
    assert [n for n, _ in b.headers if n.lower().startswith("x-") and n != "X-Backend"] == []
    assert len(ids_of(c, "x-c-id")) == 1 and ids_of(c, "x-global-id") == []
    # a reload turns them off for the next request on an open connection
    with httpx.Client(timeout=5) as client:
        assert "x-global-id" in client.get(lb.url("a") + "/").headers
        lb.reload(f"""
            [listeners.a]
            bind = "127.0.0.1:0"
            default_pool = "p"
            [pools.p]
            backends = ["http://{HOST}:{be.port}"]
        """)
        assert "x-global-id" not in client.get(lb.url("a") + "/").headers


def test_config_and_flag_errors(tmp_path):
    from fastlb.config import loads
    from fastlb.errors import ConfigError

    for value, words in (('"Host"', "fastlb reads or writes itself"),
                         ('"X Bad"', "header field name"), ('""', "header field name"),
                         ("7", "expected a string")):
        with pytest.raises(ConfigError) as e:
            loads(f"""request_id_header = {value}
                      [listeners.a]
                      default_pool = "p"
                      [pools.p]
                      backends = ["http://127.0.0.1:9"]""", "t.toml", resolve=False)
        assert words in str(e.value) and "t.toml:1: request_id_header:" in str(e.value)
    with pytest.raises(ConfigError) as e:
        loads("""[listeners.a]
                 default_pool = "p"
                 request_id = "yes"
                 [pools.p]
                 backends = ["http://127.0.0.1:9"]""", "t.toml", resolve=False)
    assert "listeners.a.request_id: expected true or false" in str(e.value)
    p = run_fastlb("serve", "--backend", "http://127.0.0.1:9", "--request-id",
                   "--request-id-header", "Content-Length")
    assert p.returncode == 2 and "--request-id-header:" in p.stderr, p.stderr
    path = tmp_path / "f.toml"
    path.write_text('request_id_header = "Via"\n[listeners.a]\ndefault_pool = "p"\n'
                    '[pools.p]\nbackends = ["http://127.0.0.1:9"]\n')
    p = run_fastlb("check-config", str(path))
    assert p.returncode == 1 and "request_id_header" in p.stdout


@pytest.mark.usefixtures("active_core")
def test_flags_over_a_file(make_backend, tmp_path):
    be = make_backend()
    path = tmp_path / "f.toml"
    path.write_text(f'request_id = true\n[listeners.a]\nbind = "{HOST}:0"\ndefault_pool = "p"\n'
                    f'[pools.p]\nbackends = ["http://{HOST}:{be.port}"]\n')
    for flags, on in ((["--no-request-id"], False), ([], True),
                      (["--request-id-header", "X-F"], True)):
        lb = FastlbProcess(None, "--config", str(path), *flags)
        try:
            r = get(lb.port, "/")
            name = "x-f" if "X-F" in flags else "x-request-id"
            assert len(ids_of(r, name)) == (1 if on else 0), (flags, r.headers)
            if flags == ["--no-request-id"]:
                assert b"--no-request-id overrides request_id = true" in lb.startup
        finally:
            lb.terminate()


# ---------------------------------------------------------------- processes

@pytest.mark.usefixtures("active_core")
def test_unique_across_two_workers_and_a_restart(make_backend):
    be = make_backend()
    ids = []
    for run in range(2):
        lb = FastlbProcess([be.addr], "--workers", "2", "--request-id")
        try:
            for i in range(120):        # a connection each: the kernel spreads them
                r = get(lb.port, f"/{run}/{i}")
                assert r.status == 200
                ids.append(r.get("x-request-id"))
        finally:
            assert lb.terminate() == 0
    assert len(set(ids)) == len(ids) == 240
    assert all(UUID4.match(i.encode()) for i in ids)
    # each worker of each run is a process of its own: its own first groups
    per_run = [{i[:19] for i in ids[:120]}, {i[:19] for i in ids[120:]}]
    assert [len(p) for p in per_run] == [2, 2]
    assert not per_run[0] & per_run[1]
    assert {q.get("x-request-id") for q in be.requests} == set(ids)
