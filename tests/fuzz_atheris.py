#!/usr/bin/env python3
"""Coverage-guided differential fuzzing of the two cores with atheris.

Every input goes to the pure core (``fastlb._core_py``, instrumented for
coverage) and to the compiled core (``fastlb._core``), which must give the
same answer: the same output (bytes, flags, framing, length) or the same
exception type, status and message. ``one_input`` is the whole harness; it
decodes an input as:

* byte 0: options: client address, X-Forwarded-Proto, Via pseudonym, the
  Host for HTTP/1.0 requests without one, and whether the rest is a request
  or a response head;
* byte 1: a seed for where the rest is split for the chunked scanner (its
  top bit: the client is a trusted proxy);
* byte 2: the request flags a response answers;
* the rest: a stream. Up to its first CRLF CRLF (or all of it) is a head, for
  the request (or response) head parser and for every ``hash_key`` kind; what
  follows is a chunked body, fed to ``ChunkedScanner`` in pieces (decoding
  and not).

Run it (``make fuzz-atheris``)::

    python tests/fuzz_atheris.py -max_total_time=600 [corpus dir]

With no corpus directory given, it starts from ``build/fuzz-corpus``, seeded
with streams of the HTTP grammar in ``tests/fuzzgen.py``. atheris ships
libFuzzer in its wheel (no clang needed for pure-Python coverage); the
compiled core is not instrumented, so the coverage that guides it is the
pure core's. Without atheris installed (``pip install -e '.[fuzz]'``) it
says so and exits 0. ``tests/test_fuzz_diff.py`` runs ``one_input`` on
seeded random inputs in CI.

The request-head parser is reached through ``request_head`` (the adapter):
``parse_request_head`` then ``write_request_head``, every parsed field and
the written head compared.
"""
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

IPS = [b"10.0.0.1", b"127.0.0.1", b"::1", b"", b"203.0.113.9"]
PROTOS = [b"http", b"https"]
VIAS = [b"fastlb", None, b"", b"lb-2"]
HOST_DEFAULTS = [b"", b"backend:8080", None, b"[::1]:80"]
HASH_KINDS = [("path", b""), ("query", b"q"), ("query", b"x"), ("header", b"host"),
              ("header", b"x-custom"), ("cookie", b"sid"), ("cookie", b"a")]


def outcome(fn, *args):
    """What a call gives: ("ok", result), or the exception's type, status and message."""
    try:
        return ("ok", fn(*args))
    except Exception as e:  # noqa: BLE001 - every difference counts
        return ("raise", type(e), getattr(e, "status", None), str(e))


# ---------------------------------------------------------------- adapter

def request_head(core, head, client_ip, proto, via, host_default, trusted):
    """Parse and write a request head with ``core``: the parsed fields and the output."""
    req = core.parse_request_head(head)
    fields = (req.method, req.target, req.version, req.host, req.path, req.flags,
              req.framing, req.length, req.key, req.forwarded_for)
    return fields + (core.write_request_head(req, client_ip, proto, via, host_default, trusted),)


def response_head(core, head, req_flags):
    return core.rewrite_response_head(head, req_flags)


def scan_pieces(core, pieces, decode):
    """Feed ``pieces`` to a ChunkedScanner; every step's answer, done and the payload."""
    from fastlb.errors import BadRequest
    sc = core.ChunkedScanner(decode=decode, exc=BadRequest)
    steps = []
    for piece in pieces:
        r = outcome(sc.scan, piece)
        steps.append(r)
        if r[0] != "ok" or r[1] >= 0:
            break
    return steps, sc.done, b"".join(sc.payload)


# ---------------------------------------------------------------- one input

def split(data, seed):
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice([0, 1, 2, 5, 20])))
    out, last = [], 0
    for c in cuts + [len(data)]:
        out.append(data[last:c])
        last = c
    return out


def one_input(data, py, c):
    """Run one input through both cores; raise AssertionError on any difference."""
    if len(data) < 3:
        return
    opt, seed, req_flags = data[0], data[1], data[2] & 63
    stream = bytes(data[3:])
    end = py.find_head_end(stream)
    head = stream if end < 0 else stream[:end]
    assert end == c.find_head_end(stream), ("find_head_end", stream)
    if opt & 0x80:
        a, b = outcome(response_head, py, head, req_flags), outcome(response_head, c, head, req_flags)
        assert a == b, ("rewrite_response_head", head, req_flags, a, b)
    else:
        args = (IPS[opt % 5], PROTOS[(opt >> 3) & 1], VIAS[(opt >> 4) & 3],
                HOST_DEFAULTS[(opt >> 5) & 3], bool(seed & 0x80))
        a, b = outcome(request_head, py, head, *args), outcome(request_head, c, head, *args)
        assert a == b, ("request_head", head, args, a, b)
    kind, name = HASH_KINDS[seed % len(HASH_KINDS)]
    a, b = outcome(py.hash_key, head, kind, name), outcome(c.hash_key, head, kind, name)
    assert a == b, ("hash_key", head, kind, name, a, b)
    if end >= 0:
        pieces = split(stream[end:], seed)
        decode = bool(opt & 0x40)
        a, b = scan_pieces(py, pieces, decode), scan_pieces(c, pieces, decode)
        assert a == b, ("ChunkedScanner", pieces, decode, a, b)


def seed_inputs(rng, n):
    """``n`` inputs built from the HTTP grammar of tests/fuzzgen.py."""
    sys.path.insert(0, HERE)
    import fuzzgen
    out = []
    for _ in range(n):
        stream = fuzzgen.gen_case(rng)
        if rng.random() < 0.1:
            stream = stream.replace(b"GET ", b"HTTP/1.1 200 OK\r\nX: ", 1)
        out.append(bytes([rng.randrange(256), rng.randrange(256), rng.randrange(256)]) + stream)
    return out


def main(argv):
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install -e '.[fuzz]'): nothing to do")
        return 0
    with atheris.instrument_imports(include=["fastlb"]):
        from fastlb import _core_py as py
        from fastlb import core as switch
    c = switch.implementation("c")
    if c is None:
        print("the compiled core is not built (or FASTLB_NO_EXTENSIONS=1): nothing to compare")
        return 0
    args = list(argv)
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = os.path.join(REPO, "build", "fuzz-corpus")
        if not os.path.isdir(corpus) or not os.listdir(corpus):
            os.makedirs(corpus, exist_ok=True)
            for i, inp in enumerate(seed_inputs(random.Random(1), 500)):
                with open(os.path.join(corpus, f"seed-{i:04d}"), "wb") as f:
                    f.write(inp)
        args.append(corpus)

    def test_one(data):
        one_input(data, py, c)

    atheris.Setup(args, test_one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
