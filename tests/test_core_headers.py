"""Request and response head rewriting, on both cores (the ``core`` fixture).

Requests go through ``parse_request_head`` then ``write_request_head``, as in
the data path (``rewrite`` below); see test_core_request_head.py for what the
parsed head carries and for the Host and target-form rules."""
import pytest

from fastlb.errors import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    MAX_CONTENT_LENGTH,
    REQ_EXPECT_CONTINUE,
    REQ_HEAD,
    REQ_HTTP10,
    REQ_IDEMPOTENT,
    REQ_KEEP_ALIVE,
    REQ_UPGRADE,
    RESP_CLIENT_KEEP_ALIVE,
    RESP_DECHUNK,
    RESP_INFORMATIONAL,
    RESP_UPGRADE,
    RESP_UPSTREAM_KEEP_ALIVE,
    BadGateway,
    BadRequest,
)

IP = b"10.1.2.3"


def head(first, *fields):
    return first + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def rewrite(core, raw, ip=IP, proto=b"http", via=b"fastlb", host_default=b"", trusted=False):
    """(out, flags, framing, length): the head written for a backend, and the framing facts."""
    r = core.parse_request_head(raw)
    return (core.write_request_head(r, ip, proto, via, host_default, trusted), r.flags, r.framing,
            r.length)


def req(core, *fields, line=b"GET /p?q=1 HTTP/1.1", ip=IP, **kw):
    return rewrite(core, head(line, *fields), ip, **kw)


def lines(out):
    assert out.endswith(b"\r\n\r\n")
    return out[:-4].split(b"\r\n")


def fields_of(out):
    return lines(out)[1:]


def bad_request(core, raw, status=400, match=None, **kw):
    with pytest.raises(BadRequest) as ei:
        core.parse_request_head(raw, **kw)
    assert ei.value.status == status
    if match is not None:
        assert str(ei.value) == match
    return ei.value


def bad_gateway(core, raw, req_flags=REQ_KEEP_ALIVE, match=None):
    with pytest.raises(BadGateway) as ei:
        core.rewrite_response_head(raw, req_flags)
    assert ei.value.status == 502
    if match is not None:
        assert str(ei.value) == match
    return ei.value


# ---------------------------------------------------------------- requests: output


def test_minimal_request(core):
    out, flags, framing, length = req(core, b"Host: a.example")
    assert out == (b"GET /p?q=1 HTTP/1.1\r\nHost: a.example\r\n"
                   b"X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n"
                   b"X-Forwarded-Host: a.example\r\nVia: 1.1 fastlb\r\n\r\n")
    assert flags == REQ_KEEP_ALIVE | REQ_IDEMPOTENT
    assert (framing, length) == (BODY_NONE, 0)


def test_result_types(core):
    out, flags, framing, length = req(core, b"Host: a", b"Content-Length: 12", line=b"POST / HTTP/1.1")
    assert type(out) is bytes and type(flags) is int and type(framing) is int and type(length) is int
    assert (framing, length) == (BODY_LENGTH, 12)


@pytest.mark.parametrize("name", [b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE",
                                  b"Trailer", b"Upgrade", b"connection", b"KEEP-ALIVE", b"tE"])
def test_hop_by_hop_removed(core, name):
    value = b"close" if name.lower() == b"connection" else b"x"
    out, *_ = req(core, b"Host: h", name + b": " + value, b"Other: 1")
    assert fields_of(out)[:2] == [b"Host: h", b"Other: 1"]
    assert name.lower() not in out.lower().split(b"\r\n\r\n")[0].replace(b"x-forwarded", b"")


def test_transfer_encoding_removed_and_readded(core):
    out, flags, framing, length = req(core, b"Host: h", b"Transfer-Encoding: Chunked", line=b"POST / HTTP/1.1")
    assert fields_of(out)[:2] == [b"Host: h", b"Transfer-Encoding: chunked"]
    assert (framing, length) == (BODY_CHUNKED, 0)
    assert not flags & REQ_IDEMPOTENT


def test_fields_named_in_connection_removed(core):
    out, *_ = req(core, b"Host: h", b"Connection: Foo, , bar ,keep-alive", b"foo: 1", b"BAR: 2", b"Baz: 3")
    assert fields_of(out)[:2] == [b"Host: h", b"Baz: 3"]


def test_connection_cannot_remove_host_or_content_length(core):
    out, _, framing, length = req(core, b"Host: h", b"Content-Length: 3", b"Connection: host, Content-Length")
    assert fields_of(out)[:2] == [b"Host: h", b"Content-Length: 3"]
    assert (framing, length) == (BODY_LENGTH, 3)


def test_connection_removes_expect(core):
    out, flags, *_ = req(core, b"Host: h", b"Expect: 100-continue", b"Connection: expect")
    assert b"Expect" not in out
    assert flags & REQ_EXPECT_CONTINUE


def test_connection_many_tokens(core):
    names = [b"x-%d" % i for i in range(40)]
    fields = [b"Host: h", b"Connection: " + b", ".join(n.upper() for n in names)]
    fields += [n + b": v" for n in names] + [b"Kept: 1"]
    out, *_ = req(core, *fields)
    assert fields_of(out)[:2] == [b"Host: h", b"Kept: 1"]


XFF_FIELDS = (b"Host: h", b"X-Forwarded-For: 1.1.1.1, 2.2.2.2", b"A: b", b"x-forwarded-for:  3.3.3.3 ")


def test_xff_from_untrusted_client_replaced(core):
    out, *_ = req(core, *XFF_FIELDS)
    assert fields_of(out) == [b"Host: h", b"A: b", b"X-Forwarded-For: 10.1.2.3",
                              b"X-Forwarded-Proto: http", b"X-Forwarded-Host: h", b"Via: 1.1 fastlb"]


def test_xff_from_trusted_proxy_appended(core):
    out, *_ = req(core, *XFF_FIELDS, trusted=True)
    assert fields_of(out) == [b"Host: h", b"A: b",
                              b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 3.3.3.3, 10.1.2.3",
                              b"X-Forwarded-Proto: http", b"X-Forwarded-Host: h", b"Via: 1.1 fastlb"]


def test_forwarded_for_values(core):
    r = core.parse_request_head(head(b"GET / HTTP/1.1", *XFF_FIELDS, b"X-Forwarded-For:"))
    assert r.forwarded_for == b"1.1.1.1, 2.2.2.2, 3.3.3.3"
    assert core.parse_request_head(head(b"GET / HTTP/1.1", b"Host: h")).forwarded_for == b""


FORGED = (b"X-Forwarded-Proto: https", b"Host: real", b"Forwarded: for=192.0.2.1;proto=https",
          b"X-Forwarded-Host: fake", b"A: b")


def test_xf_proto_host_forwarded_from_untrusted_client_replaced(core):
    out, *_ = req(core, *FORGED, proto=b"http")
    assert fields_of(out) == [b"Host: real", b"A: b", b"X-Forwarded-For: 10.1.2.3",
                              b"X-Forwarded-Proto: http", b"X-Forwarded-Host: real",
                              b"Via: 1.1 fastlb"]


def test_xf_proto_host_forwarded_from_trusted_proxy_kept(core):
    out, *_ = req(core, *FORGED, proto=b"http", trusted=True)
    assert fields_of(out) == [b"X-Forwarded-Proto: https", b"Host: real",
                              b"Forwarded: for=192.0.2.1;proto=https", b"X-Forwarded-Host: fake",
                              b"A: b", b"X-Forwarded-For: 10.1.2.3", b"Via: 1.1 fastlb"]


@pytest.mark.parametrize("sent,own", [
    (b"X-Forwarded-Proto: https", [b"X-Forwarded-Host: h"]),
    (b"X-Forwarded-Host: front.example", [b"X-Forwarded-Proto: http"]),
])
def test_trusted_proxy_missing_xf_field_added(core, sent, own):
    out, *_ = req(core, b"Host: h", sent, trusted=True)
    fl = fields_of(out)
    assert fl == [b"Host: h", sent, b"X-Forwarded-For: 10.1.2.3"] + own + [b"Via: 1.1 fastlb"]


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_fields_in_long_heads(core, trusted):
    """Past the inline segment plan of the compiled core, in every position."""
    fields = [b"Host: h"]
    for i in range(30):
        fields += [b"F%d: %d" % (i, i), b"X-Forwarded-For: 10.0.%d.1" % i,
                   (b"Forwarded: for=%d" % i, b"X-Forwarded-Proto: p%d" % i,
                    b"X-Forwarded-Host: h%d" % i)[i % 3]]
    out, *_ = req(core, *fields, trusted=trusted)
    fl = fields_of(out)
    xff = b"X-Forwarded-For: " + b", ".join(b"10.0.%d.1" % i for i in range(30)) + b", 10.1.2.3"
    if trusted:
        assert fl == [f for f in fields if not f.startswith(b"X-Forwarded-For")] + [
            xff, b"Via: 1.1 fastlb"]
    else:
        assert fl == [f for f in fields if f.startswith((b"Host", b"F")) and b"Forwarded" not in f] + [
            b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http", b"X-Forwarded-Host: h",
            b"Via: 1.1 fastlb"]


@pytest.mark.parametrize("via", [None, b""])
def test_via_off(core, via):
    out, *_ = req(core, b"Host: h", via=via)
    assert b"Via" not in out


def test_via_custom_and_http10(core):
    out, *_ = req(core, b"Host: h", via=b"lb1")
    assert fields_of(out)[-1] == b"Via: 1.1 lb1"
    out, *_ = req(core, b"Host: h", line=b"GET / HTTP/1.0", via=b"lb1")
    assert fields_of(out)[-1] == b"Via: 1.0 lb1"


def test_field_normalised(core):
    out, *_ = req(core, b"Host:h", b"A:\t x \t", b"B:", b"C:   ")
    assert fields_of(out)[:4] == [b"Host: h", b"A: x", b"B: ", b"C: "]


def test_obs_text_and_tab_inside_value(core):
    out, *_ = req(core, b"Host: h", b"A: caf\xc3\xa9\tb")
    assert fields_of(out)[1] == b"A: caf\xc3\xa9\tb"


def test_http10_upgraded_and_host_default(core):
    out, flags, *_ = req(core, b"Accept: */*", line=b"GET /x HTTP/1.0", host_default=b"backend:80")
    assert lines(out)[0] == b"GET /x HTTP/1.1"
    assert fields_of(out) == [b"Accept: */*", b"Host: backend:80", b"X-Forwarded-For: 10.1.2.3",
                              b"X-Forwarded-Proto: http", b"Via: 1.0 fastlb"]
    assert flags == REQ_HTTP10 | REQ_IDEMPOTENT


@pytest.mark.parametrize("hd", [b"", None])
def test_http10_no_host_no_default(core, hd):
    out, *_ = req(core, line=b"GET / HTTP/1.0", host_default=hd)
    assert b"Host" not in out


def test_http10_host_kept_not_default(core):
    out, *_ = req(core, b"Host: mine", line=b"GET / HTTP/1.0", host_default=b"other")
    assert fields_of(out)[0] == b"Host: mine" and b"other" not in out


def test_empty_host_accepted(core):
    # RFC 9110 7.2: an empty Host is valid; it names no authority, so no X-Forwarded-Host
    out, *_ = req(core, b"Host:")
    assert fields_of(out) == [b"Host: ", b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http",
                              b"Via: 1.1 fastlb"]


def test_many_fields(core):
    fields = [b"Host: h"] + [b"F%d: %d" % (i, i) for i in range(300)]
    out, *_ = req(core, *fields)
    assert fields_of(out)[:301] == fields


# ---------------------------------------------------------------- requests: Upgrade (RFC 9110 7.8)

WS = (b"Host: h", b"Connection: keep-alive, Upgrade", b"Upgrade: websocket",
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13")


def test_upgrade_request_forwarded(core):
    out, flags, framing, _ = req(core, *WS, line=b"GET /chat HTTP/1.1")
    assert flags == REQ_KEEP_ALIVE | REQ_IDEMPOTENT | REQ_UPGRADE and framing == BODY_NONE
    assert fields_of(out) == [b"Host: h", b"Upgrade: websocket",
                              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                              b"Sec-WebSocket-Version: 13", b"Connection: upgrade",
                              b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http",
                              b"X-Forwarded-Host: h", b"Via: 1.1 fastlb"]


@pytest.mark.parametrize("line,fields", [
    (b"GET / HTTP/1.0", (b"Host: h", b"Connection: upgrade", b"Upgrade: websocket")),
    (b"GET / HTTP/1.1", (b"Host: h", b"Upgrade: websocket")),
    (b"GET / HTTP/1.1", (b"Host: h", b"Connection: upgrade")),
    (b"GET / HTTP/1.1", (b"Host: h", b"Connection: upgrade", b"Upgrade:")),
    (b"POST / HTTP/1.1", (b"Host: h", b"Connection: upgrade", b"Upgrade: h2c",
                          b"Content-Length: 3")),
    (b"POST / HTTP/1.1", (b"Host: h", b"Connection: upgrade", b"Upgrade: h2c",
                          b"Transfer-Encoding: chunked")),
], ids=["http10", "no-connection-option", "no-upgrade-field", "empty-upgrade", "length-body",
        "chunked-body"])
def test_upgrade_not_forwarded(core, line, fields):
    """HTTP/1.0, no "upgrade" option, no protocol, or a body: a plain request
    (RFC 9110 7.8), Upgrade dropped as hop-by-hop."""
    out, flags, *_ = req(core, *fields, line=line)
    assert not flags & REQ_UPGRADE
    assert b"upgrade" not in out.lower()


def test_upgrade_content_length_zero_is_bodiless(core):
    out, flags, framing, _ = req(core, b"Host: h", b"Connection: upgrade", b"Upgrade: ws",
                                 b"Content-Length: 0")
    assert flags & REQ_UPGRADE and framing == BODY_NONE
    assert fields_of(out)[:4] == [b"Host: h", b"Upgrade: ws", b"Content-Length: 0",
                                  b"Connection: upgrade"]


def test_upgrade_fields_named_in_connection_still_dropped(core):
    out, flags, *_ = req(core, b"Host: h", b"Connection: upgrade, x-hop", b"X-Hop: 1",
                         b"upgrade: a/1, b", b"Upgrade: c")
    assert flags & REQ_UPGRADE
    assert fields_of(out)[:4] == [b"Host: h", b"upgrade: a/1, b", b"Upgrade: c",
                                  b"Connection: upgrade"]


def test_bytearray_arguments_accepted(core):
    raw = head(b"GET / HTTP/1.1", b"Host: h")
    assert rewrite(core, raw, bytearray(IP))[0] == rewrite(core, raw, IP)[0]
    assert rewrite(core, bytearray(raw))[0] == rewrite(core, memoryview(raw))[0] == rewrite(core, raw)[0]


# ---------------------------------------------------------------- requests: flags


@pytest.mark.parametrize("version,conn,ka", [
    (b"1.1", None, True), (b"1.1", b"close", False), (b"1.1", b"keep-alive", True),
    (b"1.1", b"Keep-Alive, CLOSE", False), (b"1.0", None, False), (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive", True), (b"1.0", b"keep-alive, close", False), (b"1.0", b"close", False),
])
def test_keep_alive_flag(core, version, conn, ka):
    fields = [b"Host: h"] + ([b"Connection: " + conn] if conn else [])
    _, flags, *_ = req(core, *fields, line=b"GET / HTTP/" + version)
    assert bool(flags & REQ_KEEP_ALIVE) == ka
    assert bool(flags & REQ_HTTP10) == (version == b"1.0")


@pytest.mark.parametrize("method,idem", [
    (b"GET", True), (b"HEAD", True), (b"PUT", True), (b"DELETE", True), (b"OPTIONS", True),
    (b"TRACE", True), (b"POST", False), (b"PATCH", False), (b"get", False), (b"CONNECT", False),
    (b"X", False),
])
def test_method_flags(core, method, idem):
    _, flags, *_ = req(core, b"Host: h", line=method + b" / HTTP/1.1")
    assert bool(flags & REQ_IDEMPOTENT) == idem
    assert bool(flags & REQ_HEAD) == (method == b"HEAD")


def test_expect_continue(core):
    out, flags, *_ = req(core, b"Host: h", b"Expect: 100-Continue", b"Content-Length: 5", line=b"POST / HTTP/1.1")
    assert flags & REQ_EXPECT_CONTINUE
    assert b"Expect: 100-Continue\r\n" in out
    _, flags, *_ = req(core, b"Host: h", b"Expect: something")
    assert not flags & REQ_EXPECT_CONTINUE
    out, flags, *_ = req(core, b"Host: h", b"Expect: 100-continue", line=b"POST / HTTP/1.0")
    assert not flags & REQ_EXPECT_CONTINUE
    assert b"Expect" not in out


def test_content_length_zero(core):
    _, _, framing, length = req(core, b"Host: h", b"Content-Length: 0")
    assert (framing, length) == (BODY_NONE, 0)
    _, _, framing, length = req(core, b"Host: h", b"Content-Length: 000123")
    assert (framing, length) == (BODY_LENGTH, 123)
    _, _, framing, length = req(core, b"Host: h", b"Content-Length: %d" % MAX_CONTENT_LENGTH)
    assert (framing, length) == (BODY_LENGTH, MAX_CONTENT_LENGTH)


# ---------------------------------------------------------------- requests: rejections

GOOD = b"GET / HTTP/1.1\r\nHost: h\r\n"


@pytest.mark.parametrize("fields,match,status", [
    ([b"Content-Length: 1", b"Transfer-Encoding: chunked"], "both Content-Length and Transfer-Encoding", 400),
    ([b"Transfer-Encoding: chunked", b"Content-Length: 1"], "both Content-Length and Transfer-Encoding", 400),
    ([b"Content-Length: 5", b"Content-Length: 5"], "duplicate Content-Length", 400),
    ([b"Content-Length: 5, 5"], "invalid Content-Length", 400),
    ([b"Content-Length: -1"], "invalid Content-Length", 400),
    ([b"Content-Length: +5"], "invalid Content-Length", 400),
    ([b"Content-Length:  "], "invalid Content-Length", 400),
    ([b"Content-Length: 0x10"], "invalid Content-Length", 400),
    ([b"Content-Length: 12345678901234567890"], "invalid Content-Length", 400),
    ([b"Content-Length: %d" % (MAX_CONTENT_LENGTH + 1)], "Content-Length too large", 400),
    ([b"Content-Length: 9999999999999999999"], "Content-Length too large", 400),
    ([b"Transfer-Encoding: gzip"], "unsupported transfer coding", 501),
    ([b"Transfer-Encoding: gzip, chunked"], "unsupported transfer coding", 501),
    ([b"Transfer-Encoding: chunked, chunked"], "unsupported transfer coding", 501),
    ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], "duplicate Transfer-Encoding", 400),
    ([b"Host: h2"], "duplicate Host", 400),
    ([b"HOST: h"], "duplicate Host", 400),
    ([b"X: a", b" folded"], "invalid header line", 400),
    ([b"X: a", b"\tfolded: x"], "invalid header name", 400),
    ([b"X : a"], "invalid header name", 400),
    ([b"X\t: a"], "invalid header name", 400),
    ([b": a"], "invalid header line", 400),
    ([b"no colon"], "invalid header line", 400),
    ([b"X(y): a"], "invalid header name", 400),
    ([b"X: a\nY: b"], "invalid byte in header value", 400),
    ([b"X: a\rY: b"], "invalid byte in header value", 400),
    ([b"X: a\x00b"], "invalid byte in header value", 400),
    ([b"X: a\x7fb"], "invalid byte in header value", 400),
    ([b"X: a\x1b"], "invalid byte in header value", 400),
    ([b"X\n: a"], "invalid header name", 400),
    ([b""], "invalid header line", 400),
])
def test_request_rejected(core, fields, match, status):
    bad_request(core, GOOD + b"".join(f + b"\r\n" for f in fields) + b"\r\n", status, match)


@pytest.mark.parametrize("raw,match", [
    (b"", "incomplete request head"),
    (b"\r\n\r", "incomplete request head"),
    (b"GET / HTTP/1.1\r\nHost: h\r\n", "incomplete request head"),
    (b"\r\n\r\n", "invalid request line"),
    (b"GET\r\n\r\n", "invalid request line"),
    (b"GET /\r\n\r\n", "invalid request line"),
    (b"GET  HTTP/1.1\r\n\r\n", "invalid request line"),
    (b" / HTTP/1.1\r\n\r\n", "invalid request line"),
    (b"G(T / HTTP/1.1\r\n\r\n", "invalid method"),
    (b"GET /a b HTTP/1.1\r\n\r\n", "invalid request target"),
    (b"GET /a\x01 HTTP/1.1\r\n\r\n", "invalid request target"),
    (b"GET /a\x7f HTTP/1.1\r\n\r\n", "invalid request target"),
    (b"GET / HTTP/1.2\r\n\r\n", "unsupported HTTP version"),
    (b"GET / HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
    (b"GET / http/1.1\r\n\r\n", "unsupported HTTP version"),
    (b"GET / HTTP/1.1 \r\n\r\n", "invalid request target"),
    (b"GET / HTTP/1.1x\r\n\r\n", "unsupported HTTP version"),
    (b"GET / HTTP/1.1\n\r\n\r\n", "unsupported HTTP version"),
    (b"GET / HTTP/1.1\r\n\r\n", "missing Host"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding in an HTTP/1.0 request"),
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nX: y\r\n\r\n", "invalid header line"),
])
def test_request_line_rejected(core, raw, match):
    bad_request(core, raw, 400, match)


def test_syntax_errors_win_over_semantic_ones(core):
    raw = head(b"GET / HTTP/1.1", b"Host: a", b"Host: b", b"X : y")
    bad_request(core, raw, 400, "invalid header name")


def test_semantic_errors_in_field_order(core):
    raw = head(b"GET / HTTP/1.1", b"Content-Length: x", b"Host: a", b"Host: b")
    bad_request(core, raw, 400, "invalid Content-Length")
    raw = head(b"GET / HTTP/1.1", b"Host: a", b"Host: b", b"Content-Length: x")
    bad_request(core, raw, 400, "duplicate Host")


# ---------------------------------------------------------------- responses


def resp(core, *fields, line=b"HTTP/1.1 200 OK", req_flags=REQ_KEEP_ALIVE):
    return core.rewrite_response_head(head(line, *fields), req_flags)


def test_minimal_response(core):
    out, status, flags, framing, length = resp(core, b"Content-Length: 2", b"Content-Type: text/plain")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\n"
    assert (status, flags, framing, length) == (200, RESP_UPSTREAM_KEEP_ALIVE | RESP_CLIENT_KEEP_ALIVE,
                                                BODY_LENGTH, 2)


@pytest.mark.parametrize("line,status", [
    (b"HTTP/1.1 200 OK", 200), (b"HTTP/1.1 200", 200), (b"HTTP/1.1 200 ", 200),
    (b"HTTP/1.0 404 Not Found", 404), (b"HTTP/1.1 999 whatever \xff\t", 999),
    (b"HTTP/1.1 100 Continue", 100),
])
def test_status_lines(core, line, status):
    out, st, *_ = resp(core, b"Content-Length: 0", line=line)
    assert st == status
    assert lines(out)[0] == b"HTTP/1.1" + line[8:]


@pytest.mark.parametrize("line,match", [
    (b"HTTP/1.1 20 OK", "invalid status code"),
    (b"HTTP/1.1 2000 OK", "invalid status code"),
    (b"HTTP/1.1 2x0 OK", "invalid status code"),
    (b"HTTP/1.1 099 Low", "invalid status code"),
    (b"HTTP/1.1 000", "invalid status code"),
    (b"HTTP/1.1 200\tOK", "invalid status code"),
    (b"HTTP/1.1 200 O\x01K", "invalid reason phrase"),
    (b"HTTP/1.1 200 O\rK", "invalid reason phrase"),
    (b"HTTP/1.1 200 O\nK", "invalid reason phrase"),
    (b"HTTP/1.2 200 OK", "invalid status line"),
    (b"HTTP/2.0 200 OK", "invalid status line"),
    (b"http/1.1 200 OK", "invalid status line"),
    (b"HTTP/1.1  200 OK", "invalid status code"),
    (b"HTTP/1.1", "invalid status line"),
    (b"HTTP/1.1 20", "invalid status line"),
    (b"ICY 200 OK", "invalid status line"),
    (b"HTTP/1.1 101 Switching Protocols", "unexpected protocol switch"),
])
def test_bad_status_lines(core, line, match):
    bad_gateway(core, head(line, b"Content-Length: 0"), match=match)


def test_incomplete_response(core):
    bad_gateway(core, b"HTTP/1.1 200 OK\r\n", match="incomplete response head")
    bad_gateway(core, b"", match="incomplete response head")


@pytest.mark.parametrize("code", [100, 102, 103, 199])
def test_informational(core, code):
    out, status, flags, framing, length = resp(core, b"Link: </a>", line=b"HTTP/1.1 %d X" % code)
    assert status == code
    assert flags & RESP_INFORMATIONAL
    assert framing == BODY_NONE and length == 0
    assert b"Connection" not in out


@pytest.mark.parametrize("line,req_flags", [
    (b"HTTP/1.1 204 No Content", REQ_KEEP_ALIVE), (b"HTTP/1.1 304 Not Modified", REQ_KEEP_ALIVE),
    (b"HTTP/1.1 200 OK", REQ_KEEP_ALIVE | REQ_HEAD),
])
def test_no_body(core, line, req_flags):
    out, _, flags, framing, length = resp(core, b"Content-Length: 100", line=line, req_flags=req_flags)
    assert (framing, length) == (BODY_NONE, 100)
    assert flags == RESP_UPSTREAM_KEEP_ALIVE | RESP_CLIENT_KEEP_ALIVE
    assert b"Content-Length: 100" in out


def test_head_response_with_chunked(core):
    out, _, flags, framing, _ = resp(core, b"Transfer-Encoding: chunked", req_flags=REQ_KEEP_ALIVE | REQ_HEAD)
    assert framing == BODY_NONE
    assert b"Transfer-Encoding: chunked" in out


def test_chunked_response(core):
    out, _, flags, framing, length = resp(core, b"Transfer-Encoding: CHUNKED", b"A: b")
    assert out == b"HTTP/1.1 200 OK\r\nA: b\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert (framing, length) == (BODY_CHUNKED, 0)
    assert flags == RESP_UPSTREAM_KEEP_ALIVE | RESP_CLIENT_KEEP_ALIVE


def test_close_delimited(core):
    out, _, flags, framing, length = resp(core, b"A: b")
    assert (framing, length) == (BODY_CLOSE, 0)
    assert flags == 0
    assert fields_of(out) == [b"A: b", b"Connection: close"]


def test_content_length_zero_response(core):
    _, _, flags, framing, length = resp(core, b"Content-Length: 0")
    assert (framing, length) == (BODY_NONE, 0)
    assert flags & RESP_UPSTREAM_KEEP_ALIVE


def test_duplicate_content_length(core):
    out, _, _, framing, length = resp(core, b"Content-Length: 7", b"content-length: 007")
    assert (framing, length) == (BODY_LENGTH, 7)
    assert out.count(b"ontent-") == 2
    bad_gateway(core, head(b"HTTP/1.1 200 OK", b"Content-Length: 7", b"Content-Length: 8"),
                match="conflicting Content-Length")


@pytest.mark.parametrize("fields,match", [
    ([b"Content-Length: 1", b"Transfer-Encoding: chunked"], "both Content-Length and Transfer-Encoding"),
    ([b"Transfer-Encoding: gzip"], "unsupported transfer coding"),
    ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], "duplicate Transfer-Encoding"),
    ([b"Content-Length: 1,1"], "invalid Content-Length"),
    ([b"Content-Length: %d" % (MAX_CONTENT_LENGTH + 1)], "Content-Length too large"),
    ([b"X : y"], "invalid header name"),
    ([b" X: y"], "invalid header name"),
    ([b"X: y\x00"], "invalid byte in header value"),
    ([b"X: y\nZ: w"], "invalid byte in header value"),
])
def test_response_rejected(core, fields, match):
    bad_gateway(core, head(b"HTTP/1.1 200 OK", *fields), match=match)


def test_response_te_is_502(core):
    e = bad_gateway(core, head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: br"))
    assert e.status == 502


@pytest.mark.parametrize("line,conn,upstream_ka", [
    (b"HTTP/1.1 200 OK", None, True), (b"HTTP/1.1 200 OK", b"close", False),
    (b"HTTP/1.0 200 OK", None, False), (b"HTTP/1.0 200 OK", b"keep-alive", True),
    (b"HTTP/1.0 200 OK", b"Keep-Alive, Close", False), (b"HTTP/1.1 200 OK", b"keep-alive", True),
])
def test_upstream_keep_alive(core, line, conn, upstream_ka):
    fields = [b"Content-Length: 1"] + ([b"Connection: " + conn] if conn else [])
    out, _, flags, *_ = resp(core, *fields, line=line)
    assert bool(flags & RESP_UPSTREAM_KEEP_ALIVE) == upstream_ka
    assert flags & RESP_CLIENT_KEEP_ALIVE
    assert lines(out)[0] == b"HTTP/1.1 200 OK"
    assert b"Connection" not in out


def test_client_keep_alive_off(core):
    out, _, flags, *_ = resp(core, b"Content-Length: 1", req_flags=0)
    assert flags == RESP_UPSTREAM_KEEP_ALIVE
    assert fields_of(out)[-1] == b"Connection: close"


def test_http10_client(core):
    out, _, flags, framing, _ = resp(core, b"Content-Length: 1", req_flags=REQ_KEEP_ALIVE | REQ_HTTP10)
    assert flags == RESP_UPSTREAM_KEEP_ALIVE | RESP_CLIENT_KEEP_ALIVE
    assert fields_of(out)[-1] == b"Connection: keep-alive"
    out, _, flags, framing, _ = resp(core, b"Content-Length: 1", req_flags=REQ_HTTP10)
    assert fields_of(out)[-1] == b"Connection: close"


def test_dechunk_for_http10_client(core):
    # de-chunked: the trailers are dropped, and so is the Trailer field announcing them
    out, _, flags, framing, _ = resp(core, b"Transfer-Encoding: chunked", b"Trailer: X-T", b"A: b",
                                     req_flags=REQ_KEEP_ALIVE | REQ_HTTP10)
    assert framing == BODY_CHUNKED
    assert flags == RESP_UPSTREAM_KEEP_ALIVE | RESP_DECHUNK
    assert fields_of(out) == [b"A: b", b"Connection: close"]


@pytest.mark.parametrize("line,req_flags", [(b"HTTP/1.1 200 OK", REQ_KEEP_ALIVE),
                                            (b"HTTP/1.0 200 OK", REQ_KEEP_ALIVE),
                                            (b"HTTP/1.1 200 OK", REQ_KEEP_ALIVE | REQ_HEAD)])
def test_trailer_relayed_with_chunked_response(core, line, req_flags):
    # RFC 9110 6.6.2: Trailer is not hop-by-hop; the trailers are relayed, so is the field
    out, _, flags, framing, _ = resp(core, b"Trailer: X-Checksum", b"Transfer-Encoding: chunked",
                                     b"A: b", line=line, req_flags=req_flags)
    assert fields_of(out)[:3] == [b"Trailer: X-Checksum", b"A: b", b"Transfer-Encoding: chunked"]


def test_trailer_named_in_connection_dropped(core):
    out, *_ = resp(core, b"Connection: trailer", b"Trailer: X-T", b"Transfer-Encoding: chunked")
    assert b"Trailer" not in out
    out, *_ = req(core, b"Host: h", b"Connection: trailer", b"Trailer: X-T",
                  b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1")
    assert b"Trailer" not in out


def test_trailer_kept_for_chunked_request_only(core):
    out, *_ = req(core, b"Host: h", b"Trailer: X-T", b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.1")
    assert fields_of(out)[:3] == [b"Host: h", b"Trailer: X-T", b"Transfer-Encoding: chunked"]
    out, *_ = req(core, b"Host: h", b"Trailer: X-T", b"Content-Length: 1", line=b"POST / HTTP/1.1")
    assert fields_of(out)[:2] == [b"Host: h", b"Content-Length: 1"]
    assert b"Trailer" not in out


def test_response_hop_by_hop_and_connection_tokens(core):
    out, *_ = resp(core, b"Connection: X-Secret, host, content-length", b"Keep-Alive: timeout=5",
                   b"x-secret: 1", b"Upgrade: h2c", b"Trailer: X", b"Proxy-Connection: a", b"TE: t",
                   b"Content-Length: 0", b"Kept: 1")
    assert fields_of(out) == [b"Content-Length: 0", b"Kept: 1"]


def test_response_connection_drops_x_forwarded(core):
    out, *_ = resp(core, b"Connection: x-forwarded-for", b"X-Forwarded-For: 1", b"Content-Length: 0")
    assert fields_of(out) == [b"Content-Length: 0"]


def test_response_many_fields(core):
    fields = [b"F%d: %d" % (i, i) for i in range(200)] + [b"Content-Length: 0"]
    out, *_ = resp(core, *fields)
    assert fields_of(out) == fields


def test_response_http10_status_line_rewritten(core):
    out, *_ = resp(core, b"Content-Length: 0", line=b"HTTP/1.0 200 OK")
    assert lines(out)[0] == b"HTTP/1.1 200 OK"


def test_many_single_byte_connection_tokens_leave_interned_bytes_alone(core):
    # regression: lowercasing must never write into CPython's shared 1-byte bytes objects
    letters = [bytes([c]) for c in range(0x41, 0x5B)]
    fields = [b"Host: h", b"Connection: " + b",".join(letters)] + [c + b": 1" for c in letters] + [b"Z1: 2"]
    out, *_ = req(core, *fields)
    assert fields_of(out)[:2] == [b"Host: h", b"Z1: 2"]
    out, *_ = core.rewrite_response_head(head(b"HTTP/1.1 200 OK", *fields[1:], b"Content-Length: 0"), 1)
    assert fields_of(out) == [b"Z1: 2", b"Content-Length: 0"]
    assert [bytes([c]) for c in range(0x41, 0x5B)] == [bytes.fromhex("%02x" % c) for c in range(0x41, 0x5B)]
    assert b"A".lower() == b"a" and b"a".upper() == b"A" and bytes([65]) != bytes([97])


# ---------------------------------------------------------------- responses: 101

SWITCH = head(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
              b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"Keep-Alive: 5")


def test_101_to_upgrade_request(core):
    out, status, flags, framing, length = core.rewrite_response_head(
        SWITCH, REQ_UPGRADE | REQ_KEEP_ALIVE)
    assert (status, flags, framing, length) == (101, RESP_UPGRADE, BODY_NONE, 0)
    assert out == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                   b"Connection: upgrade\r\n\r\n")


def test_101_to_plain_request_is_502(core):
    bad_gateway(core, SWITCH, REQ_KEEP_ALIVE, match="unexpected protocol switch")


def test_101_without_upgrade_is_502(core):
    bad_gateway(core, head(b"HTTP/1.1 101 Switching Protocols", b"Connection: upgrade"),
                REQ_UPGRADE | REQ_KEEP_ALIVE, match="101 without Upgrade")


@pytest.mark.parametrize("line", [b"HTTP/1.1 200 OK", b"HTTP/1.1 426 Upgrade Required"])
def test_refused_upgrade_is_a_plain_response(core, line):
    out, status, flags, framing, _ = core.rewrite_response_head(
        head(line, b"Upgrade: websocket", b"Connection: upgrade", b"Content-Length: 0"),
        REQ_UPGRADE | REQ_KEEP_ALIVE)
    assert flags == RESP_UPSTREAM_KEEP_ALIVE | RESP_CLIENT_KEEP_ALIVE and framing == BODY_NONE
    assert out == line + b"\r\nContent-Length: 0\r\n\r\n"
