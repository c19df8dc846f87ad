#!/usr/bin/env python3
"""Differential fuzzing of fastlb against h11, through real sockets.

The parts, in the order a case goes through them:

* **Grammar** (``gen_case``): seeded random HTTP/1.1 request streams: methods,
  targets (origin-form, absolute-form, ``*``, authority-form, odd bytes),
  versions, header names and values with case and whitespace variants,
  framing (none, Content-Length, chunked, both, duplicates, bad values),
  chunk layouts (extensions, trailers, sizes with leading zeros), known
  request-smuggling shapes (CL.TE, TE.CL, TE.TE obfuscations, obs-fold, bare
  LF, space before the colon, NUL and other control bytes, ...), and
  pipelined sequences of several requests; then ``mutate`` (byte flips,
  inserts, deletes, splices, truncation).
* **Oracle** (``h11_requests``): what h11 parses the case as: a list of
  ``Msg`` (method, target, headers, body, trailers, complete or not) and how
  the stream ended (``clean``, ``closed`` after a request that closes the
  connection, ``incomplete`` or ``error``). Each request is parsed by a fresh
  h11 connection so that two things h11 does not model are modelled as
  fastlb does them (both RFC 9112): empty lines before a request line are
  ignored (2.2), and an HTTP/1.0 request with ``Connection: keep-alive`` keeps
  the connection open.
* **Backend** (``RecordingBackend``): an asyncio server that parses what
  fastlb forwards with h11, records every request (``Msg``) under the client
  address fastlb appended to ``X-Forwarded-For``, and answers each request
  with a small fixed response (``X-Fuzz-Backend: 1``, body ``ok``). Bytes it
  cannot parse, or that it cannot attribute, are findings.
* **Runner** (``Fuzzer``): ``fastlb serve`` as a subprocess in front of the
  backend; each case is sent on its own connection from its own source
  address (127.x.y.z: that is how backend records are attributed to cases),
  whole, split at random points, or byte by byte, then half-closed; many
  cases in flight at once. After each batch it waits until the backend is
  quiet, checks a health request still gets 200, and checks every case.
* **Invariant** (``check_case``): fastlb either forwards exactly the
  requests h11 parses from the original (same count, methods, targets,
  header fields, bodies and trailers, with fastlb's documented rewrites of
  Host, X-Forwarded-*, Via and hop-by-hop fields allowed for), or rejects: a
  4xx answer or a close, with none of the refused request reaching the
  backend complete. Bodies stream, so a request refused in its body (bad
  chunked framing) may have reached the backend as a cut-off prefix: its head
  matches the original and its body is a prefix of the original's. Anything
  else is a finding: a forwarded request that differs, an extra request, a
  request h11 refuses but fastlb forwards (fastlb more lenient than h11),
  bytes the backend cannot parse, a 5xx, a hang, a non-HTTP answer, a
  traceback, or a failed health request.

Run as a script for a long budget (``make fuzz``: a million cases)::

    python tests/fuzzgen.py --cases 1000000 --seed 1

It stops by itself after ``--cases`` cases (or ``--time-limit`` seconds),
prints a summary (outcomes, findings by kind with a minimised reproducer
each) and exits 1 if any finding is not in ``ALLOWED``.
``tests/test_fuzz_diff.py`` runs a fixed seed and a small budget in CI.
"""
import argparse
import asyncio
import os
import random
import re
import socket
import sys
import time

import h11

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import HOST, FastlbProcess  # noqa: E402

CRLF = b"\r\n"
MAX_EVENT = 1 << 20          # h11's head size limit, above fastlb's --max-header-size

# ================================================================ grammar

HOSTS = ([b"example.com", b"example.com:8080", b"localhost", b"127.0.0.1", b"[::1]:8080",
          b"xn--bcher-kva.example", b"a.b.c.d.e", b"EXAMPLE.COM"],
         [b"", b"a b", b"a/b", b"a@b", b"exa\x00mple", b"example.com:abc", b"@", b"a:1:2",
          b"[::1", b"\xff", b"a\tb", b"a,b", b"example.com:", b"-", b"a?b", b"a#b", b"%41"])
ORIGIN = [b"/", b"/", b"/index.html", b"/a/b/c?x=1&y=2", b"/search?q=a%20b", b"/%2e%2e/etc",
          b"//double//slash", b"/?", b"/a;p=1", b"/~user/", b"/" + b"x" * 300,
          b"/\xc3\xa9t\xc3\xa9", b"/a?b=c=d&&", b"/a%00b", b"/.."]
ABSOLUTE = [b"http://example.com/", b"http://example.com", b"http://example.com:8080/p?q",
            b"https://example.com/", b"HTTP://EXAMPLE.COM/", b"http://user:pw@example.com/",
            b"http://[::1]:80/", b"http://other.test/x", b"ftp://x/", b"http:/x", b"http://",
            b"http://example.com:99999/", b"http://exa%20mple.com/"]
ODD_TARGETS = [b"/a\x00", b"/a\x7f", b"/a\tb", b"/a\rb", b"/a\nb", b"", b"a", b"\x01/", b"/a\x0b",
               b"/\xff\xfe", b'/a"b', b"/a<b>", b"/{}|\\^`", b"/a\x1b[0m", b"?", b"#"]
METHODS = [b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT", b"PROPFIND",
           b"M-SEARCH", b"X", b"get", b"Post", b"A!#$%&'*+-.^_`|~9"]
BAD_METHODS = [b"G T", b"G\x00T", b"", b"GET\t", b"G(T", b"\xffGET", b"GET/", b"G" * 70,
               b"G:T", b"G\rT"]
BAD_VERSIONS = [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.01", b"http/1.1", b"HTTP/1",
                b"HTTP/ 1.1", b"HTTP/1.1x", b"HTTP/11", b"HTTP/1.1 ", b"HTTP/3", b"HTTP/1.0\x00",
                b"HTTP/9.9", b"HTTP/1.\xff"]
OTHER_FIELDS = [
    b"User-Agent: fuzz/1.0", b"Accept: */*", b"X-Custom: value", b"Cookie: a=b; c=d",
    b"X-Forwarded-For: 1.2.3.4", b"X-Forwarded-For: 10.0.0.1, 10.0.0.2", b"x-forwarded-for:",
    b"X-Forwarded-Host: evil.test", b"X-Forwarded-Proto: https", b"Via: 1.1 other",
    b"Connection: close", b"Connection: keep-alive", b"Connection: X-Custom",
    b"Connection: close, X-Custom", b"Connection: Content-Length", b"Connection: Host",
    b"Connection: Transfer-Encoding", b"Connection: X-Forwarded-For", b"Connection: ,,",
    b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive", b"TE: trailers",
    b"Trailer: X-Trailer", b"Upgrade: websocket", b"Upgrade: h2c", b"Expect: 100-continue",
    b"Expect: nope", b"Content-Type: text/plain", b"Authorization: Basic eHl6",
    b"X-Empty:", b"X-Spaces:    padded   ", b"X-Tab:\tvalue\t", b"X-Obs: caf\xe9",
    b"X-Quoted: \"a, b\"", b"X-Long: " + b"v" * 3000, b"X-Custom: again", b"x-custom: lower",
    b"Range: bytes=0-1", b"If-None-Match: \"e\"", b"Forwarded: for=1.2.3.4",
]
BAD_FIELDS = [
    b"X Y: z", b"X(Y): z", b": novalue", b"X-\x00: z", b"\xffX: z", b"X-No-Colon",
    b"X-Ctl: a\x01b", b"X-Del: a\x7fb", b"X-Nul: a\x00b", b"X-Cr: a\rb", b"X-Lf: a\nb",
    b" X-Leading: space", b"\tX-Leading: tab", b"X-Sp : before", b"X-Tab\t: before",
    b"X-Vt: \x0bv", b"X-Ff: \x0cv", b"X-Esc: \x1b", b"X:\x00",
]
TE_GOOD = [b"chunked", b"chunked", b"chunked", b"Chunked", b"CHUNKED"]
TE_BAD = [b"chunked, identity", b"identity, chunked", b"gzip, chunked", b"chunked, gzip",
          b"chunked,chunked", b"chunked ", b"\tchunked", b"xchunked", b"chunked\x00", b"chunk",
          b"chunked;q=1", b",chunked", b"chunked,", b"\"chunked\"", b"identity", b"",
          b"\x0bchunked", b"chunked\x0b", b"ch unked", b"chunked\r", b"cHuNkEd, chunked"]
TE_SHAPES = [b"Transfer-Encoding: %s", b"Transfer-Encoding: %s", b"transfer-encoding: %s",
             b"TRANSFER-ENCODING: %s", b"Transfer-Encoding:%s", b"Transfer-Encoding : %s",
             b"Transfer-Encoding\t: %s", b"Transfer-Encoding:\r\n %s", b"Transfer-Encoding:\r\n\t%s",
             b" Transfer-Encoding: %s", b"Transfer_Encoding: %s", b"Transfer-Encoding\x00: %s",
             b"X-Pad: y\r\n Transfer-Encoding: %s", b"Transfer-Encoding: \r\n %s",
             b"Transfer-Encoding: x\r\nTransfer-Encoding: %s", b"Transfer-Encoding:  %s  "]
CL_SHAPES = [b"Content-Length: %s", b"Content-Length: %s", b"content-length: %s",
             b"CONTENT-LENGTH: %s", b"Content-Length:%s", b"Content-Length : %s",
             b"Content-Length:\r\n %s", b" Content-Length: %s", b"Content_Length: %s",
             b"Content-Length:\t%s\t"]
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"
SMUGGLED_BODY = b"POST /smuggled HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 4\r\n\r\nbody"
INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"0", b"1", b"a", b"\x7f",
           b"\xff", b"\x0b", b"\x0c", b"\r\n ", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
           b"Content-Length: 0\r\n", b"Content-Length: 5\r\n", b"0\r\n\r\n", b"Host: x\r\n",
           b"Connection: close\r\n", b"HTTP/1.1", b"GET / HTTP/1.1\r\n", b"ffffffff", b"-",
           b"\r\r", b"\n\n", b"%00", b"\"", b"\\"]


def _choice(rng, seq):
    return seq[int(rng.random() * len(seq))]


def _good_or_bad(rng, pair, p_bad):
    return _choice(rng, pair[1] if rng.random() < p_bad else pair[0])


def _alphabet(chars):
    return bytes(chars[i % len(chars)] for i in range(256))


_TEXT = _alphabet(b"abcdefghijklmnopqrstuvwxyz0123456789 ")
_FRAMING_SOUP = _alphabet(b"\r\n0a;: ")


def gen_body(rng, p_smuggle=0.08):
    r = rng.random()
    if r < p_smuggle:
        return _choice(rng, [SMUGGLED, SMUGGLED_BODY, b"0\r\n\r\n" + SMUGGLED, b"x" + SMUGGLED])
    n = _choice(rng, [0, 1, 2, 5, 10, 16, 31, 64, 100, 255, 256, 1000, 4000])
    raw = rng.randbytes(n)
    if r < 0.6:
        return raw.translate(_TEXT)
    if r < 0.8:
        return raw
    return raw.translate(_FRAMING_SOUP)


def gen_chunked(rng, body, bad):
    """A chunked encoding of ``body``; ``bad`` turns on layout faults now and then."""
    out = []
    i = 0
    while i < len(body):
        size = min(len(body) - i, _choice(rng, [1, 2, 3, 7, 16, 100, 1 << 20]))
        fmt = _choice(rng, [b"%x", b"%x", b"%x", b"%X", b"0%x", b"000%x", b"0" * 20 + b"%x"])
        line = fmt % size
        if rng.random() < 0.15:
            line += _choice(rng, [b";a", b";a=b", b';a="b c"', b";a=b;c", b";" + b"e" * 100,
                                  b";a=\xff", b"; a=b"] + ([b" ;a", b";\x00", b";a\x7f", b";\r",
                                                             b"\t;a"] if bad else []))
        data = body[i:i + size]
        end = CRLF
        if bad and rng.random() < 0.1:
            which = rng.randrange(5)
            if which == 0:
                end = _choice(rng, [b"\n", b"", b"\r", b"XX", b"\r\r\n", b" \r\n"])
            elif which == 1:
                line = _choice(rng, [b"%x" % (size + 1), b"%x" % max(size - 1, 0), b"-1",
                                     b"0x%x" % size, b"+%x" % size, b"%x " % size, b" %x" % size,
                                     b"ffffffffffffffffff", b"g", b""])
            elif which == 2:
                out.append(line + _choice(rng, [b"\n", b"\r", b"\r\r\n"]) + data + end)
                i += size
                continue
            elif which == 3:
                data += _choice(rng, [b"X", b"\r\n", SMUGGLED])
            else:
                line = line + b"\r\n" + _choice(rng, [b"", b"\r\n"])
                out.append(line + data + end)
                i += size
                continue
        out.append(line + CRLF + data + end)
        i += size
    last = _choice(rng, [b"0", b"0", b"0", b"00", b"0000", b"0;ext=1", b"000000000000000000000"])
    out.append(last + CRLF)
    r = rng.random()
    if r < 0.12:
        out.append(_choice(rng, [b"X-Trailer: v\r\n", b"X-A: 1\r\nX-B: 2\r\n", b"Expires: never\r\n",
                                 b"x-trailer:\r\n"]))
    elif bad and r < 0.2:
        out.append(_choice(rng, [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                 b"X T: v\r\n", b" X: folded\r\n", b"X: a\x00b\r\n", b"X-No-Colon\r\n",
                                 b"Host: evil.test\r\n", b"X: v\nY: w\r\n"]))
    if bad and rng.random() < 0.05:
        out.append(_choice(rng, [b"", b"\n", b"\r", b"X"]))
    else:
        out.append(CRLF)
    return b"".join(out)


def gen_request(rng, p_bad=0.12, http10_keepalive=True):
    """One request: request line, fields, framing and body."""
    bad = rng.random() < p_bad * 3
    r = rng.random()
    if r < 0.45:
        method = b"GET"
    elif r < 0.75:
        method = b"POST"
    elif not bad or r < 0.95:
        method = _choice(rng, METHODS)
    else:
        method = _choice(rng, BAD_METHODS)
    r = rng.random()
    if method == b"CONNECT" and r < 0.7:
        target = _choice(rng, [b"example.com:443", b"example.com", b"[::1]:443", b"/"])
    elif method == b"OPTIONS" and r < 0.4:
        target = b"*"
    elif r < 0.7:
        target = _choice(rng, ORIGIN)
    elif r < 0.85:
        target = _choice(rng, ABSOLUTE)
    elif r < 0.88:
        target = b"*"
    elif not bad:
        target = _choice(rng, ORIGIN)
    else:
        target = _choice(rng, ODD_TARGETS)
    r = rng.random()
    if r < 0.85:
        version = b"HTTP/1.1"
    elif r < 0.96 or not bad:
        version = b"HTTP/1.0"
    else:
        version = _choice(rng, BAD_VERSIONS)
    sp = b" " if not bad or rng.random() < 0.8 else _choice(rng, [b"  ", b"\t", b" \t", b"\x0b"])
    if bad and rng.random() < 0.03:
        line = method + sp + target         # HTTP/0.9 simple request
    else:
        line = method + sp + target + (b" " if rng.random() < 0.97 else sp) + version

    fields = []
    r = rng.random()
    if r < 0.86:
        name = b"Host" if rng.random() < 0.9 else _choice(rng, [b"host", b"HOST", b"hOsT"])
        fields.append(name + b": " + _good_or_bad(rng, HOSTS, p_bad))
    elif r < 0.91 and (bad or version == b"HTTP/1.0"):
        pass                                # no Host
    elif r < 0.96 and bad:
        fields.append(b"Host: " + _choice(rng, HOSTS[0]))
        fields.append(b"Host: " + _choice(rng, HOSTS[0] + [b""]))
    else:
        fields.append(b"Host: " + _choice(rng, HOSTS[0]))
    for _ in range(_choice(rng, [0, 0, 1, 1, 2, 3, 5, 8])):
        fields.append(_choice(rng, BAD_FIELDS) if bad and rng.random() < 0.2
                      else _choice(rng, OTHER_FIELDS))
    if rng.random() < 0.01:
        fields += [b"X-Many-%d: %d" % (i, i) for i in range(rng.randint(50, 150))]
    if version == b"HTTP/1.0" and http10_keepalive and rng.random() < 0.6:
        fields.append(_choice(rng, [b"Connection: keep-alive", b"Connection: Keep-Alive",
                                    b"connection: keep-alive, x-custom"]))

    body = b""
    r = rng.random()
    if method in (b"POST", b"PUT", b"PATCH") or rng.random() < 0.15:
        framing = "cl" if r < 0.45 else "chunked" if r < 0.8 else "none" if r < 0.9 else "both"
    else:
        framing = "none" if r < 0.9 else "cl" if r < 0.95 else "chunked"
    if framing != "none":
        body = gen_body(rng)
    raw_body = b""
    if framing in ("cl", "both"):
        n = len(body)
        value = b"%d" % n
        if bad and rng.random() < 0.25:
            value = _choice(rng, [b"0%d" % n, b"000%d" % n, b"+%d" % n, b"-1", b"%d, %d" % (n, n),
                                  b"%d,%d" % (n, n + 1), b"%d %d" % (n, n), b"0x%x" % n, b"%d.0" % n,
                                  b"", b"99999999999999999999", b"%d" % (n + 1),
                                  b"%d" % max(n - 1, 0), b"\x00%d" % n, b"%d\x00" % n,
                                  b"4611686018427387905", b"1e3"])
        shape = _choice(rng, CL_SHAPES) if bad else b"Content-Length: %s"
        cl_index = len(fields)
        fields.append(shape % value)
        if bad and rng.random() < 0.1:
            fields.append(b"Content-Length: " + _choice(rng, [value, b"%d" % (n + 3), b"0"]))
        raw_body = body
    if framing in ("chunked", "both"):
        te = _good_or_bad(rng, (TE_GOOD, TE_BAD), 0.4 if bad else 0.0)
        shape = _choice(rng, TE_SHAPES) if bad and rng.random() < 0.5 else b"Transfer-Encoding: %s"
        te_field = shape % te
        if framing == "both" and rng.random() < 0.5:
            fields.insert(cl_index, te_field)    # TE before CL
            cl_index += 1
        else:
            fields.append(te_field)
        if bad and rng.random() < 0.1:
            fields.append(b"Transfer-Encoding: " + _choice(rng, [b"chunked", b"identity"]))
        raw_body = gen_chunked(rng, body, bad)
        if framing == "both" and rng.random() < 0.5:
            # TE.CL: the Content-Length covers a prefix only; CL.TE: it covers more
            n = rng.randrange(len(raw_body) + 8)
            fields[cl_index] = b"Content-Length: %d" % n
    if rng.random() < 0.3:
        rng.shuffle(fields)
    eol = CRLF
    if bad and rng.random() < 0.1:
        eol = _choice(rng, [b"\n", b"\r", b"\r\r\n", b"\n\r"])
    lines = [line] + fields
    if bad and rng.random() < 0.15:
        # one odd line ending only
        k = rng.randrange(len(lines))
        head = b"".join(ln + (_choice(rng, [b"\n", b"\r", b"\r\r\n"]) if i == k else eol)
                        for i, ln in enumerate(lines)) + eol
    else:
        head = b"".join(ln + eol for ln in lines) + eol
    return head + raw_body


# Request-smuggling shapes from the literature (CL.TE, TE.CL, TE.TE, and the
# 2019-2024 parser disagreements), each a whole stream.
def _smuggle_shapes():
    h = b"POST / HTTP/1.1\r\nHost: example.com\r\n"
    g = b"GET / HTTP/1.1\r\nHost: example.com\r\n"
    s = SMUGGLED
    shapes = [
        h + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        h + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(s)) + s,
        h + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + s + b"\r\n0\r\n\r\n",
        h + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(s) + s + b"\r\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        h + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: chunked\x00\r\n\r\n0\r\n\r\n" + s,
        h + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"X: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 30 + b"5\r\nhello\r\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n" + s,
        h + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
        h + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n" + s,
        h + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: y\n\r\n" + s,
        h + b"Transfer-Encoding: chunked\r\n\r\n1;a=\"\r\nX\r\n0\r\n\r\n" + s,
        h + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
        h + b"Content-Length: 5\r\nContent-Length: 0\r\n\r\nhello",
        h + b"Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
        h + b"Content-Length: 5, 0\r\n\r\nhello",
        h + b"Content-Length: +5\r\n\r\nhello",
        h + b"Content-Length: 5\x00\r\n\r\nhello",
        h + b"Content-Length\r\n : 5\r\n\r\nhello",
        h + b"Content-Length:\r\n 5\r\n\r\nhello",
        g + b"Content-Length: %d\r\n\r\n" % len(s) + s,
        g + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(s) + s + b"\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: example.com\n\n" + s,
        b"GET / HTTP/1.1\r\nHost: example.com\n\r\n" + s,
        b"GET / HTTP/1.1\rHost: example.com\r\n\r\n" + s,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nX: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nX\x00: a\r\n\r\n" + s,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET http://other.test/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: %d\r\n\r\n" % len(s) + s,
        b"POST / HTTP/1.1\r\nHost: example.com\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(s) + s + b"\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + s,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: Content-Length\r\nContent-Length: %d\r\n\r\n"
        % len(s) + s,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: Transfer-Encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + s,
        b"GET / HTTP/1.1\r\nHost: example.com\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello" + s,
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\n" + s,
        b"\r" + s,
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n\r\n" + s,
        b"GET / HTTP/1.1 \r\nHost: example.com\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc" + s,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + s,
        b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n" + s,
    ]
    return shapes


SMUGGLE_SHAPES = _smuggle_shapes()


def mutate(rng, data, other=b""):
    """1-4 seeded mutations: flips, inserts, deletes, duplicates, splices, truncation."""
    data = bytearray(data)
    for _ in range(_choice(rng, [1, 1, 1, 2, 2, 3, 4])):
        n = len(data)
        pos = rng.randrange(n + 1)
        op = rng.randrange(9)
        if op == 0 and n:
            data[min(pos, n - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            data[min(pos, n - 1)] = rng.randrange(256)
        elif op <= 3:
            data[pos:pos] = _choice(rng, INSERTS)
        elif op == 4 and n:
            del data[pos:pos + _choice(rng, [1, 1, 2, 4, 16])]
        elif op == 5 and n:
            k = _choice(rng, [1, 2, 8, 32])
            data[pos:pos] = data[pos:pos + k]
        elif op == 6 and other:
            cut = rng.randrange(len(other) + 1)
            data = data[:pos] + bytearray(other[cut:])
        elif op == 7 and n:
            del data[pos:]
        elif n:
            k = min(pos, n - 1)
            data[k:k + 1] = bytes(data[k:k + 1]).swapcase()
    return bytes(data)


def gen_case(rng):
    """A stream of 1-4 requests, maybe a known smuggling shape, maybe mutated."""
    r = rng.random()
    if r < 0.1:
        data = _choice(rng, SMUGGLE_SHAPES)
        if rng.random() < 0.5:
            data += gen_request(rng, p_bad=0.0)
    else:
        n = _choice(rng, [1, 1, 1, 1, 2, 2, 3, 4])
        parts = []
        for _ in range(n):
            if parts and rng.random() < 0.05:
                parts.append(_choice(rng, [b"\r\n", b"\r\n\r\n", b"\n"]))
            parts.append(gen_request(rng))
        data = b"".join(parts)
    if rng.random() < 0.35:
        data = mutate(rng, data, gen_request(rng) if rng.random() < 0.3 else b"")
    return data


def gen_plan(rng, data):
    """How to send ``data``: a list of piece lengths (a single piece: whole)."""
    n = len(data)
    r = rng.random()
    if n < 2 or r < 0.6:
        return [n]
    if r < 0.93 or n > 300:
        cuts = sorted({rng.randrange(1, n) for _ in range(_choice(rng, [1, 1, 2, 3, 6]))})
    else:
        cuts = range(1, n)                       # byte by byte
    out, last = [], 0
    for c in list(cuts) + [n]:
        out.append(c - last)
        last = c
    return out


# ================================================================ h11 oracle

class Msg:
    """One request as h11 parsed it (on the client side or at the backend)."""

    __slots__ = ("method", "target", "version", "headers", "body", "trailers", "complete",
                 "error", "owner")

    def __init__(self, ev):
        self.method = bytes(ev.method)
        self.target = bytes(ev.target)
        self.version = bytes(ev.http_version)
        self.headers = [(bytes(n), bytes(v)) for n, v in ev.headers.raw_items()]
        self.body = bytearray()
        self.trailers = []
        self.complete = False
        self.error = None
        self.owner = None

    def get_all(self, lname):
        return [v for n, v in self.headers if n.lower() == lname]

    def __repr__(self):
        return (f"Msg({self.method!r} {self.target!r} HTTP/{self.version.decode()} "
                f"{self.headers!r} body={bytes(self.body)[:80]!r} trailers={self.trailers!r} "
                f"complete={self.complete} error={self.error!r})")


def _tokens(values):
    out = []
    for v in values:
        out += [t.strip(b" \t").lower() for t in v.split(b",") if t.strip(b" \t")]
    return out


def _h11_reason(e):
    """h11's error message without the bytes it quotes."""
    return re.sub(r":\s*(bytearray|b['\"]).*$|\(.*$", "", str(e)).strip()


def _response_for(method, close=False):
    status = 405 if method == b"CONNECT" else 200
    hdrs = [(b"X-Fuzz-Backend", b"1"), (b"Content-Length", b"2")]
    if close:
        hdrs.append((b"Connection", b"close"))
    return status, hdrs


def _skip_empty_lines(rest):
    """RFC 9112 2.2: empty lines (CRLF, or a bare LF) before a request line are ignored."""
    while rest[:2] == CRLF or rest[:1] == b"\n":
        rest = rest[2:] if rest[:2] == CRLF else rest[1:]
    return rest


def h11_requests(data, skip=_skip_empty_lines):
    """Parse ``data`` (a whole client stream, then the client's half-close) with h11.

    Returns ``(msgs, end, reason)``: ``end`` is "clean" (every byte used),
    "closed" (a request closed the connection; later bytes are not requests),
    "incomplete" (the stream ends inside a head or a body) or "error" (h11
    refuses; ``reason`` says why; if the error is inside a body, the last
    message is that request, not complete).
    """
    msgs = []
    rest = bytes(data)
    while True:
        stripped = skip(rest)
        if not stripped:
            return msgs, "clean", None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        conn.receive_data(stripped)
        cur = None
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                if cur is not None:
                    cur.error = _h11_reason(e)
                return msgs, "error", _h11_reason(e)
            t = type(ev)
            if t is h11.Data:
                cur.body += ev.data
            elif t is h11.Request:
                cur = Msg(ev)
                msgs.append(cur)
            elif t is h11.EndOfMessage:
                cur.trailers = [(bytes(n), bytes(v)) for n, v in ev.headers.raw_items()]
                cur.complete = True
                break
            elif ev is h11.NEED_DATA:
                return msgs, "incomplete", None
            else:   # pragma: no cover - h11 gives nothing else before EndOfMessage
                raise AssertionError(ev)
        status, hdrs = _response_for(cur.method)
        conn.send(h11.Response(status_code=status, headers=hdrs))
        if cur.method != b"HEAD":
            conn.send(h11.Data(data=b"ok"))
        conn.send(h11.EndOfMessage())
        rest = bytes(conn.trailing_data[0])
        if conn.our_state is h11.MUST_CLOSE:
            toks = _tokens(cur.get_all(b"connection"))
            # RFC 9112 9.3: HTTP/1.0 keep-alive, which h11 does not implement
            if not (cur.version == b"1.0" and b"keep-alive" in toks and b"close" not in toks):
                return msgs, "closed", None
        elif conn.our_state is not h11.DONE:
            return msgs, "closed", None     # a protocol switch: nothing more is HTTP


# Fields fastlb removes or rewrites on the way (README, "What fastlb does with HTTP").
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"transfer-encoding", b"upgrade"])
# (the client is not a trusted proxy: its X-Forwarded-* and Forwarded are replaced)
REWRITTEN = frozenset([b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                       b"forwarded"])
PROTECTED = frozenset([b"host", b"content-length"])
# absolute-form (RFC 9112 3.2.2): scheme "://" authority, then path and query
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)(#.*)?", re.S)
_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}


def is_upgrade(msg):
    """An upgrade request fastlb forwards as one (RFC 9110 7.8): HTTP/1.1, a
    protocol in Upgrade, the "upgrade" option in Connection, and no body."""
    return (msg.version == b"1.1" and any(v.strip(b" \t") for v in msg.get_all(b"upgrade"))
            and b"upgrade" in _tokens(msg.get_all(b"connection"))
            and not msg.get_all(b"transfer-encoding")
            and all(v.strip(b" \t") == b"0" for v in msg.get_all(b"content-length")))


def expected_fields(msg):
    """The fields of an original request that must reach the backend, in order
    (Host is checked on its own)."""
    named = set(_tokens(msg.get_all(b"connection"))) - PROTECTED - {b"close", b"keep-alive"}
    # Trailer goes on with the trailers, that is when the body goes on chunked
    chunked = any(b"chunked" in v.lower() for v in msg.get_all(b"transfer-encoding"))
    upgrade = is_upgrade(msg)
    out = []
    for n, v in msg.headers:
        ln = n.lower()
        if ln == b"upgrade" and upgrade:
            out.append((n, v))
            continue
        if ln in HOP_BY_HOP or ln in REWRITTEN or ln in named or ln == b"host":
            continue
        if ln == b"trailer" and not chunked:
            continue
        if ln == b"expect" and msg.version == b"1.0":
            continue    # RFC 9110 10.1.1: ignored in HTTP/1.0
        out.append((n, v))
    return out


_VIA = re.compile(rb"1\.[01] \S+\Z")


def forwarded_fields(msg, original):
    """The fields of a forwarded request, less those fastlb adds (and Host)."""
    out = []
    fields = msg.headers
    # fastlb appends its own Via last; an earlier Via is the client's
    vias = [i for i, (n, v) in enumerate(fields) if n.lower() == b"via"]
    own_via = vias[-1] if vias and _VIA.match(fields[vias[-1]][1]) and \
        len(vias) > len(original.get_all(b"via")) else -1
    upgrade = is_upgrade(original)
    for i, (n, v) in enumerate(fields):
        ln = n.lower()
        if ln in REWRITTEN or i == own_via or ln == b"transfer-encoding" or ln == b"host":
            continue
        if upgrade and ln == b"connection" and v == b"upgrade":
            continue    # fastlb's own, with the Upgrade fields it keeps
        out.append((n, v))
    return out


def _authority(scheme, auth):
    """Host information of an absolute-form target, as a Host value to compare."""
    host = auth.rpartition(b"@")[2].lower()
    port = _DEFAULT_PORT.get(scheme.lower())
    if port and host.endswith(port):
        host = host[:-len(port)]
    return host


# RFC 9110 7.2 (Host = uri-host [ ":" port ], RFC 3986 3.2.2): IP-literal, or a
# reg-name (IPv4 addresses are reg-names too), then an optional port.
VALID_HOST = re.compile(rb"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+)\]"
                        rb"|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")


def compare(fwd, orig):
    """'' when ``fwd`` (at the backend) is ``orig`` (from the client) after fastlb's
    documented rewrites; else the name of the first part that differs.

    Allowed rewrites: hop-by-hop fields and those named in Connection go
    (but Upgrade on an upgrade request, which goes with fastlb's own
    ``Connection: upgrade``), X-Forwarded-*, Forwarded and Via are fastlb's
    (the cases come from untrusted addresses), Expect goes from HTTP/1.0 requests,
    an HTTP/1.0 request without Host gets one, and an absolute-form target may
    be sent in origin-form. The Host of an absolute-form request must be the
    target's authority (RFC 9112 3.2.2: the received Host is ignored).
    """
    if fwd.method != orig.method:
        return "method"
    absolute = _ABSOLUTE.fullmatch(orig.target)
    if absolute:
        path = absolute.group(3)
        if not path.startswith(b"/"):
            path = b"/" + path      # RFC 9112 3.2.1: an empty path is sent as "/"
        if fwd.target not in (orig.target, path):
            return "target"
    elif fwd.target != orig.target:
        return "target"
    if forwarded_fields(fwd, orig) != expected_fields(orig):
        return "fields"
    hosts = fwd.get_all(b"host")
    orig_hosts = orig.get_all(b"host")
    if absolute:
        want = _authority(absolute.group(1), absolute.group(2))
        got = [_authority(absolute.group(1), h) for h in hosts]
        if got != [want]:
            if hosts == orig_hosts:
                return "absolute-form: Host kept, not the target's authority"
            if not orig_hosts and len(hosts) == 1:
                return "absolute-form: the backend's address as Host, not the target's authority"
            return "absolute-form: Host is not the target's authority"
    elif orig_hosts:
        if hosts != orig_hosts:
            return "host"
    elif len(hosts) != 1:
        return "host"       # HTTP/1.0 without Host: exactly one is added
    if fwd.complete:
        if bytes(fwd.body) != bytes(orig.body):
            return "body"
        if fwd.trailers != orig.trailers:
            return "trailers"
    elif not bytes(orig.body).startswith(bytes(fwd.body)):
        return "body prefix"
    return ""


# ================================================================ recording backend

CASE_IP = re.compile(rb"127\.\d+\.\d+\.\d+\Z")
HEALTH_IP = "127.0.0.1"


def case_ip(i):
    """The source address of case ``i``: 127.A.B.C, unique for 16 million cases."""
    c = 1 + i % 254
    b = (i // 254) % 256
    a = 1 + (i // (254 * 256)) % 250
    return f"127.{a}.{b}.{c}"


class _BackendConn(asyncio.Protocol):
    def __init__(self, be):
        self.be = be
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        self.cur = None
        self.transport = None
        self.raw = bytearray()       # bytes since the last complete request (for reports)

    def connection_made(self, transport):
        self.transport = transport
        self.be.conns.add(self)

    def connection_lost(self, exc):
        self.be.conns.discard(self)
        if self.cur is not None:
            self.be.closed(self.cur)       # cut off: stays incomplete
            self.cur = None
        else:
            left = bytes(self.h11.trailing_data[0])
            if left.strip(b"\r\n"):
                self.be.bad_bytes(left, "closed inside a head")

    def data_received(self, data):
        be = self.be
        self.raw += data
        self.h11.receive_data(data)
        conn = self.h11
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                reason = _h11_reason(e)
                if self.cur is not None:
                    self.cur.error = reason
                    be.closed(self.cur)
                    self.cur = None
                else:
                    be.bad_bytes(bytes(self.raw), reason)
                self.transport.close()
                return
            t = type(ev)
            if t is h11.Data:
                self.cur.body += ev.data
            elif t is h11.Request:
                self.cur = Msg(ev)
                be.opened(self.cur)
            elif t is h11.EndOfMessage:
                msg = self.cur
                self.cur = None
                msg.trailers = [(bytes(n), bytes(v)) for n, v in ev.headers.raw_items()]
                msg.complete = True
                be.closed(msg)
                self.raw.clear()
                status, hdrs = _response_for(msg.method)
                out = conn.send(h11.Response(status_code=status, headers=hdrs))
                if msg.method != b"HEAD":
                    out += conn.send(h11.Data(data=b"ok"))
                out += conn.send(h11.EndOfMessage())
                self.transport.write(out)
                if conn.our_state is not h11.DONE:
                    self.transport.close()       # fastlb asked to close: it never should
                    be.bad_bytes(bytes(self.raw), f"connection not reusable: {conn.states}")
                    return
                conn.start_next_cycle()
            else:
                return       # NEED_DATA or PAUSED (only after a close)


class RecordingBackend:
    """An h11 backend that records every request it gets, by client address.

    ``records[ip]`` lists the ``Msg`` fastlb forwarded for the client at
    ``ip`` (the last element of X-Forwarded-For), in arrival order;
    ``unattributed`` the requests without a known address; ``garbage`` the
    bytes h11 could not parse, with its reason (under the client address
    when one can be read from them, else under "").
    """

    def __init__(self):
        self.records = {}
        self.unattributed = []
        self.garbage = {}
        self.conns = set()
        self.open_by = {}           # ip -> requests in progress
        self.server = None
        self.port = None

    async def start(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _BackendConn(self), HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def opened(self, msg):
        xff = msg.get_all(b"x-forwarded-for")
        ip = xff[-1].rsplit(b",", 1)[-1].strip(b" \t") if xff else b""
        if CASE_IP.match(ip):
            msg.owner = ip.decode()
            self.records.setdefault(msg.owner, []).append(msg)
            self.open_by[msg.owner] = self.open_by.get(msg.owner, 0) + 1
        else:
            self.unattributed.append(msg)

    def closed(self, msg):
        if msg.owner is not None:
            self.open_by[msg.owner] -= 1

    def bad_bytes(self, raw, reason):
        m = _XFF_IN_RAW.search(raw)
        ip = m.group(1).decode() if m else ""
        self.garbage.setdefault(ip, []).append((raw, reason))

    async def settled(self, ip, limit=3.0):
        """Wait (bounded) until no request from ``ip`` is in progress here."""
        deadline = time.monotonic() + limit
        while self.open_by.get(ip) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    def take(self, ip):
        self.open_by.pop(ip, None)
        return self.records.pop(ip, []), self.garbage.pop(ip, [])

    def pending_bytes(self):
        """Connections holding bytes that are not (yet) a request."""
        return [bytes(c.h11.trailing_data[0]) for c in self.conns
                if c.cur is None and bytes(c.h11.trailing_data[0]).strip(b"\r\n")]

    def close(self):
        self.server.close()
        for c in list(self.conns):
            c.transport.abort()


_XFF_IN_RAW = re.compile(rb"(?i)\r\nX-Forwarded-For: [^\r\n]*?(127\.\d+\.\d+\.\d+)\r\n")


# ================================================================ client side

class _Client(asyncio.Protocol):
    def __init__(self):
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.transport = None
        self.how = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.how = self.how or "eof"
        return False

    def connection_lost(self, exc):
        if self.how is None:
            self.how = "reset" if exc is not None else "eof"
        if not self.done.done():
            self.done.set_result(None)


async def send_case(port, ip, data, plan, timeout, piece_delay=0.001):
    """Send ``data`` from ``ip`` in the pieces of ``plan``, half-close, and read
    until fastlb closes. Returns ``(answer bytes, how it ended)``: "eof",
    "reset" or "timeout"."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((ip, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        transport, proto = await loop.create_connection(_Client, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        pos = 0
        for i, n in enumerate(plan):
            if transport.is_closing() or proto.done.done():
                break
            transport.write(data[pos:pos + n])
            pos += n
            if i + 1 < len(plan):
                await asyncio.sleep(piece_delay)
        if not transport.is_closing() and not proto.done.done():
            transport.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(proto.done), timeout)
        except asyncio.TimeoutError:
            proto.how = "timeout"
        return bytes(proto.data), proto.how
    finally:
        transport.abort()


_RESP = re.compile(rb"HTTP/1\.1 (\d{3})[^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n")


def parse_answers(data):
    """``[(status, from_backend)]`` of the responses in ``data``, and whether
    anything else was there. Backend bodies are ``ok``; fastlb's are its
    status line in words: neither holds 'HTTP/1.1 '."""
    out = []
    odd = bool(data) and not data.startswith(b"HTTP/1.1 ")
    for m in _RESP.finditer(data):
        out.append((int(m.group(1)), b"\r\nX-Fuzz-Backend: 1\r\n" in b"\r\n" + m.group(2)))
    if data and not out:
        odd = True
    return out, odd


# ================================================================ the invariant

# Statuses fastlb may refuse a request with (README): anything else (502, 504,
# ...) means the backend and fastlb disagreed on where a request ends.
REFUSALS = frozenset([400, 405, 413, 431, 501])


class Finding:
    """A broken invariant: ``kind`` and ``detail`` name it (its signature),
    ``data`` and ``plan`` are the case, ``row`` all that ``check_case`` saw."""

    __slots__ = ("kind", "detail", "data", "plan", "note", "row")

    def __init__(self, kind, detail, data, plan, note="", row=None):
        self.kind = kind
        self.detail = detail
        self.data = data
        self.plan = plan
        self.note = note
        self.row = row

    @property
    def signature(self):
        return (self.kind, self.detail)

    def __repr__(self):
        return f"Finding({self.kind}: {self.detail}; {self.data[:300]!r} {self.note[:600]})"


def check_case(data, plan, oracle, fwd, garbage, answer, how):
    """Check one case; returns ``(outcome, findings)``.

    ``oracle`` is ``h11_requests(data)``; ``fwd`` and ``garbage`` the
    backend's records and unparseable bytes for this case; ``answer``/``how``
    what the client got. Outcomes: "same"
    (all forwarded as h11 reads them, or all refused where h11 refuses too),
    "stricter" (fastlb refused a request h11 accepts), "finding".
    """
    msgs, end, reason = oracle
    good = [m for m in msgs if m.complete]
    findings = []
    row = (data, plan, oracle, fwd, garbage, answer, how)

    def find(kind, detail, note=""):
        findings.append(Finding(kind, detail, data, plan, note, row))

    complete = [m for m in fwd if m.complete]
    partial = [m for m in fwd if not m.complete]
    if partial and fwd[-1] is not partial[0] or len(partial) > 1:
        find("order", "a cut-off request before another", repr(fwd))
    for i, m in enumerate(complete):
        if i >= len(msgs):
            find("extra", "a request h11 does not see" if end != "error" else
                 f"forwarded after h11 refused: {reason}", f"{m!r}\nh11: {msgs!r} {end}")
        elif not msgs[i].complete:
            find("lenient", f"forwarded whole, h11: {msgs[i].error or end}",
                 f"{m!r}\nh11: {msgs[i]!r}")
        else:
            diff = compare(m, msgs[i])
            if diff:
                find("mismatch", diff, f"at backend: {m!r}\nh11 reads: {msgs[i]!r}")
    for m in fwd:
        if not all(VALID_HOST.fullmatch(h) for h in m.get_all(b"host")):
            find("rfc", "forwarded an invalid Host (RFC 9110 7.2 wants 400)", repr(m))
    if partial:
        m = partial[0]
        i = len(complete)
        if i >= len(msgs):
            find("lenient", f"head forwarded, h11: {reason or end}", f"{m!r}")
        else:
            diff = compare(m, msgs[i])
            if diff:
                find("mismatch", "cut-off " + diff, f"at backend: {m!r}\nh11 reads: {msgs[i]!r}")
            if m.error:
                find("backend", f"h11 at the backend: {m.error}", repr(m))

    for raw, why in garbage:
        find("backend", f"unparseable at the backend: {why}", repr(raw[:600]))
    answers, odd = parse_answers(answer)
    if how == "timeout":
        find("hang", "no close", f"answer {answer[:200]!r}")
    if odd:
        find("answer", "not HTTP", f"{answer[:200]!r}")
    from_backend = [s for s, b in answers if b]
    own = [s for s, b in answers if not b]
    if len(from_backend) != len(complete):
        find("answer", f"backend answers relayed != requests forwarded ({how})",
             f"{len(from_backend)} answers, {len(complete)} forwarded; {answer[:300]!r}")
    if own:
        if len(own) > 1 or answers[-1][1]:
            find("answer", "fastlb answered, then went on", repr(answers))
        if own[-1] not in REFUSALS:
            find("status", f"fastlb answered {own[-1]}", f"{answer[:300]!r}")
    if findings:
        return "finding", findings
    if len(complete) < len(good):
        return "stricter", findings
    return "same", findings


# ================================================================ allowlist

class Allowed:
    """A known difference: a finding of one of ``kinds`` whose detail matches
    the regex ``detail`` and for which ``explains(finding)`` holds."""

    def __init__(self, name, reason, kinds, detail, explains=None):
        self.name = name
        self.reason = reason
        self.kinds = kinds
        self.detail = re.compile(detail)
        self.explains = explains

    def matches(self, f):
        return (f.kind in self.kinds and self.detail.search(f.detail) is not None
                and (self.explains is None or f.row is not None and self.explains(f)))


def _strip_cr_and_lf(rest):
    return rest.lstrip(b"\r\n")


def _explained_by_cr_skipping(f):
    """The finding goes away when the oracle skips CR and LF bytes in any
    mix before a request line, as fastlb does."""
    data, plan, _oracle, fwd, garbage, answer, how = f.row
    again = check_case(data, plan, h11_requests(data, skip=_strip_cr_and_lf), fwd, garbage,
                       answer, how)[1]
    return all(allowed(g, but="cr-before-request-line") for g in again)


# Keep this list small, each entry with its reason: what fastlb does, and why
# it is tolerated for now. Rejections are always allowed and never listed;
# forwarding something different never is.
ALLOWED = [
    Allowed("cr-before-request-line",
            "fastlb skips any run of CR and LF bytes before a request line (a bare CR "
            "too), where RFC 9112 2.2 allows empty lines (CRLF) and h11 refuses a bare "
            "CR; the bytes skipped never reach the backend, the request after them is "
            "forwarded as h11 reads it once they are gone.",
            ("extra", "lenient"), r"illegal request line|no request line",
            _explained_by_cr_skipping),
]


def allowed(f, but=None):
    """The ALLOWED entry (other than the one named ``but``) that explains ``f``, or None."""
    for a in ALLOWED:
        if a.name != but and a.matches(f):
            return a
    return None


# ================================================================ runner

class Stats:
    def __init__(self):
        self.cases = 0
        self.outcomes = {"same": 0, "stricter": 0, "finding": 0}
        self.h11_end = {}
        self.forwarded = 0
        self.cut = 0
        self.refused = {}
        self.plans = {"whole": 0, "split": 0, "bytes": 0}
        self.findings = {}          # (kind, detail, allowlist entry or None) -> [Finding, count]
        self.health = 0
        self.started = time.monotonic()
        self.finished = None        # when the cases were done (minimising comes after)

    def rate(self):
        return self.cases / max(time.monotonic() - self.started, 1e-9)

    def note(self, f):
        a = allowed(f)
        slot = self.findings.setdefault(f.signature + (a.name if a else None,), [f, 0])
        slot[1] += 1

    def add(self, outcome, findings, row):
        _data, plan, oracle, fwd, _garbage, answer, _how = row
        self.cases += 1
        self.outcomes[outcome] += 1
        self.h11_end[oracle[1]] = self.h11_end.get(oracle[1], 0) + 1
        self.forwarded += sum(1 for m in fwd if m.complete)
        self.cut += sum(1 for m in fwd if not m.complete)
        for s, from_backend in parse_answers(answer)[0]:
            if not from_backend:
                self.refused[s] = self.refused.get(s, 0) + 1
        kind = "whole" if len(plan) == 1 else "bytes" if max(plan) == 1 and len(plan) > 8 else "split"
        self.plans[kind] += 1
        for f in findings:
            self.note(f)

    def unexpected(self):
        """``[(Finding, count)]`` of the findings no allowlist entry explains."""
        return [(f, n) for key, (f, n) in self.findings.items() if key[2] is None]

    def summary(self, minimised=None):
        el = (self.finished or time.monotonic()) - self.started
        lines = [f"{self.cases} cases in {el:.1f} s ({self.cases / max(el, 1e-9):.0f}/s); "
                 f"{self.health} health checks",
                 "outcomes: " + ", ".join(f"{k} {v}" for k, v in self.outcomes.items()),
                 "h11 reads the cases as: " + ", ".join(f"{k} {v}" for k, v in sorted(self.h11_end.items())),
                 f"requests forwarded whole: {self.forwarded}; cut off in the body: {self.cut}",
                 "fastlb's refusals: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.refused.items())),
                 "sent: " + ", ".join(f"{k} {v}" for k, v in self.plans.items())]
        if not self.findings:
            lines.append("findings: none")
        for key, (f, n) in sorted(self.findings.items(), key=lambda kv: (kv[0][2] is not None, -kv[1][1])):
            kind, detail, name = key
            lines.append(f"finding [{kind}] {detail}: {n} case(s)"
                         + (f" (allowed: {name})" if name else " NOT ALLOWED"))
            small = (minimised or {}).get(key)
            lines.append(f"    example: {f.data[:400]!r} sent as {_plan_name(f.plan)}")
            if small is not None:
                lines.append(f"    minimised: {small!r}")
            lines.append("    " + f.note[:800].replace("\n", "\n    "))
        return "\n".join(lines)


def _plan_name(plan):
    if len(plan) == 1:
        return "one piece"
    if max(plan) == 1:
        return "byte by byte"
    return f"pieces of {plan}"


class Fuzzer:
    """fastlb (a subprocess, on the active core) in front of a RecordingBackend.

    ``run(cases)`` keeps ``concurrency`` cases in flight; each case is
    checked as soon as it is over (fastlb closed the connection, and no
    request from its address is still arriving at the backend)."""

    def __init__(self, concurrency=32, timeout=10.0, extra=(), proxy=None):
        self.concurrency = concurrency
        self.timeout = timeout
        self.extra = list(extra)
        # ``proxy``: an async callable (backend port) -> an object with ``port``
        # and ``terminate()``, to fuzz something else than ``fastlb serve``
        self.proxy = proxy
        self.backend = RecordingBackend()
        self.lb = None
        self.next_ip = 0

    async def start(self):
        await self.backend.start()
        if self.proxy is not None:
            self.lb = await self.proxy(self.backend.port)
            return
        args = ["--header-timeout", "10", "--response-timeout", "3", "--keepalive-timeout", "10",
                "--retries", "0", "--eject-after", "0"] + self.extra
        loop = asyncio.get_running_loop()
        self.lb = await loop.run_in_executor(
            None, lambda: FastlbProcess([(HOST, self.backend.port)], *args))

    def stop(self):
        try:
            if self.lb is not None:
                self.lb.terminate()
        finally:
            self.backend.close()

    def stderr(self):
        return b"".join(getattr(self.lb, "stderr_lines", ()))

    def alive(self):
        proc = getattr(self.lb, "proc", None)
        return proc is None or proc.poll() is None

    async def health(self):
        """A plain request still gets 200 from the backend."""
        answer, how = await send_case(self.lb.port, HEALTH_IP,
                                      b"GET /fuzz-health HTTP/1.1\r\nHost: fuzz\r\n\r\n",
                                      [44], self.timeout)
        self.backend.records.pop(HEALTH_IP, None)
        return answer.startswith(b"HTTP/1.1 200 ") and how == "eof"

    async def one(self, data, plan):
        """Run one case from a fresh address; returns ``check_case``'s arguments."""
        ip = case_ip(self.next_ip)
        self.next_ip += 1
        try:
            answer, how = await send_case(self.lb.port, ip, data, plan, self.timeout)
        except OSError as e:
            answer, how = b"", f"connect failed: {e}"
        await asyncio.sleep(0.003)      # bytes fastlb sent before it closed are still landing
        await self.backend.settled(ip)
        fwd, garbage = self.backend.take(ip)
        return data, plan, h11_requests(data), fwd, garbage, answer, how

    def loose_ends(self):
        """Findings that belong to no one case: requests without the client's
        address, bytes that name no client, bytes left on pooled connections."""
        be = self.backend
        out = []
        for m in be.unattributed:
            out.append(Finding("unattributed", "a request without the client's address",
                               b"", [0], repr(m)))
        for raw, reason in be.garbage.pop("", []):
            out.append(Finding("backend", f"unparseable at the backend: {reason}",
                               raw, [len(raw)], repr(raw[:600])))
        for raw in be.pending_bytes():
            out.append(Finding("backend", "leftover bytes on a pooled connection",
                               raw, [len(raw)], repr(raw[:600])))
        be.unattributed = []
        return out

    async def run(self, cases, stats, time_limit=None, health_every=500, progress=None):
        """Run the (data, plan) pairs that the iterator ``cases`` yields."""
        deadline = time.monotonic() + time_limit if time_limit else None
        it = iter(cases)
        last_report = [time.monotonic()]
        stop = [False]

        async def worker():
            while not stop[0]:
                if deadline is not None and time.monotonic() > deadline:
                    return
                try:
                    data, plan = next(it)
                except StopIteration:
                    return
                row = await self.one(data, plan)
                outcome, findings = check_case(*row)
                stats.add(outcome, findings, row)
                if stats.cases % health_every == 0:
                    await self.check_health(stats)
                    if not self.alive():
                        stop[0] = True
                if progress and time.monotonic() - last_report[0] > progress:
                    last_report[0] = time.monotonic()
                    print(f"... {stats.cases} cases, {len(stats.findings)} distinct findings, "
                          f"{stats.rate():.0f}/s", flush=True)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        await asyncio.sleep(0.05)
        await self.check_health(stats)
        for f in self.loose_ends():
            stats.note(f)

    async def check_health(self, stats):
        if await self.health():
            stats.health += 1
        else:
            stats.note(Finding("health", "a plain request failed", b"", [0],
                               self.stderr()[-2000:].decode("latin-1")))
        for f in self.loose_ends():
            stats.note(f)

    async def check(self, data, plan=None):
        """Run one case alone; returns its findings, and those of no one case."""
        row = await self.one(data, plan or [len(data)])
        await asyncio.sleep(0.01)
        return check_case(*row)[1] + self.loose_ends()

    async def minimise(self, f, max_trials=2000, time_limit=20.0):
        """Shrink a finding's case (sent whole) while it keeps the same signature,
        by lines, then by bytes; None if it does not come back when sent whole."""
        data = f.data
        sig = f.signature
        deadline = time.monotonic() + time_limit
        trials = [0]

        async def still(d):
            trials[0] += 1
            return any(x.signature == sig for x in await self.check(d))

        if not await still(data):
            return None

        async def shrink(units):
            n = max(1, len(units) // 2)
            while n >= 1 and trials[0] < max_trials and time.monotonic() < deadline:
                i = 0
                shrunk = False
                while i < len(units) and trials[0] < max_trials and time.monotonic() < deadline:
                    cand = units[:i] + units[i + n:]
                    if cand and await still(b"".join(cand)):
                        units = cand
                        shrunk = True
                    else:
                        i += n
                if not shrunk:
                    n //= 2
            return b"".join(units)

        data = await shrink(data.splitlines(keepends=True))     # whole lines first
        return await shrink([data[i:i + 1] for i in range(len(data))])


def generated(seed, n):
    """The ``n`` cases (data, plan) of ``seed``, always the same ones."""
    rng = random.Random(seed)
    for _ in range(n):
        data = gen_case(rng)
        yield data, gen_plan(rng, data)


async def fuzz(cases, seed, concurrency=32, time_limit=None, progress=None, minimise=0,
               minimise_time=20.0, minimise_allowed=True, extra=(), proxy=None):
    """Run ``cases`` generated cases from ``seed``; returns (Stats, minimised, stderr).

    The first ``minimise`` distinct findings (those not allowed first; allowed
    ones only with ``minimise_allowed``) are minimised, ``minimise_time``
    seconds at most each."""
    fz = Fuzzer(concurrency=concurrency, extra=extra, proxy=proxy)
    await fz.start()
    stats = Stats()
    minimised = {}
    try:
        await fz.run(generated(seed, cases), stats, time_limit=time_limit, progress=progress)
        stats.finished = time.monotonic()
        err = fz.stderr()
        if b"Traceback" in err or b"Exception in callback" in err:
            stats.note(Finding("traceback", "fastlb logged a traceback", b"", [0],
                               err[-3000:].decode("latin-1")))
        todo = sorted((kv for kv in stats.findings.items() if minimise_allowed or kv[0][2] is None),
                      key=lambda kv: kv[0][2] is not None)
        for key, (f, _n) in todo[:minimise]:
            if f.kind in ("traceback", "health", "unattributed") or not f.data:
                continue
            small = await fz.minimise(f, time_limit=minimise_time)
            if small is not None:
                minimised[key] = small
        return stats, minimised, fz.stderr()
    finally:
        fz.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="also stop after S seconds")
    p.add_argument("--minimise", type=int, default=20, metavar="N",
                   help="minimise the first N distinct findings (0: none)")
    p.add_argument("--progress", type=float, default=30.0, metavar="S")
    a = p.parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:     # pragma: no cover
        runner = asyncio.run
    stats, small, _err = runner(fuzz(a.cases, a.seed, a.concurrency, a.time_limit,
                                     a.progress, a.minimise))
    print(stats.summary(small))
    bad = stats.unexpected()
    print(f"{len(bad)} distinct finding(s) not in the allowlist")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
