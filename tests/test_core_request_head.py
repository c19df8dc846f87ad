"""parse_request_head / write_request_head, on both cores (the ``core`` fixture):
what the parsed head carries, the Host rules (RFC 9110 7.2, RFC 9112 3.2) and
absolute-form targets (RFC 9112 3.2.2)."""
import pytest

from fastlb.errors import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    KEY_COOKIE,
    KEY_HEADER,
    KEY_NONE,
    KEY_PATH,
    KEY_QUERY,
    REQ_HTTP10,
    REQ_IDEMPOTENT,
    REQ_KEEP_ALIVE,
    BadRequest,
)

IP = b"10.1.2.3"


def head(first, *fields):
    return first + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def fields_of(out):
    assert out.endswith(b"\r\n\r\n")
    return out[:-4].split(b"\r\n")


def bad(core, raw, match, status=400):
    with pytest.raises(BadRequest) as ei:
        core.parse_request_head(raw)
    assert (ei.value.status, str(ei.value)) == (status, match)


# ---------------------------------------------------------------- what parsing gives


def test_origin_form_attributes(core):
    r = core.parse_request_head(head(b"POST /a/b?c=d HTTP/1.1", b"Host: Example.COM:8080",
                                     b"Content-Length: 12"))
    assert (r.method, r.target, r.version) == (b"POST", b"/a/b?c=d", b"HTTP/1.1")
    assert (r.host, r.path) == (b"Example.COM:8080", b"/a/b?c=d")
    assert (r.flags, r.framing, r.length, r.key) == (REQ_KEEP_ALIVE, BODY_LENGTH, 12, b"")
    assert type(r) is core.RequestHead


def test_http10_without_host(core):
    r = core.parse_request_head(head(b"GET * HTTP/1.0"))
    assert (r.host, r.path, r.version, r.flags) == (None, b"*", b"HTTP/1.0", REQ_HTTP10 | REQ_IDEMPOTENT)
    out = core.write_request_head(r, IP, b"http", b"fastlb", b"10.0.0.5:80")
    assert fields_of(out) == [b"GET * HTTP/1.1", b"Host: 10.0.0.5:80", b"X-Forwarded-For: 10.1.2.3",
                              b"X-Forwarded-Proto: http", b"Via: 1.0 fastlb"]


def test_chunked_attributes(core):
    r = core.parse_request_head(head(b"PUT /u HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked"))
    assert (r.framing, r.length) == (BODY_CHUNKED, 0)
    r = core.parse_request_head(head(b"PUT /u HTTP/1.1", b"Host: h", b"Content-Length: 0"))
    assert (r.framing, r.length) == (BODY_NONE, 0)


def test_one_parse_written_for_several_backends(core):
    """The parsed head is written again for another backend (a retry) unchanged."""
    r = core.parse_request_head(head(b"GET /x HTTP/1.0", b"Connection: keep-alive", b"A: 1"))
    one = core.write_request_head(r, IP, b"http", b"fastlb", b"a:1")
    two = core.write_request_head(r, IP, b"http", b"fastlb", b"b:2")
    assert one.replace(b"Host: a:1", b"Host: b:2") == two
    assert core.write_request_head(r, IP, b"http", b"fastlb", b"a:1") == one


def test_held_heads_are_not_refilled(core):
    raws = [head(b"GET /%d HTTP/1.1" % i, b"Host: h%d" % i, b"X-Forwarded-For: 9.9.9.%d" % i)
            for i in range(5)]
    kept = [core.parse_request_head(raw) for raw in raws]
    core.parse_request_head(head(b"GET /other HTTP/1.1", b"Host: other"))  # dropped at once
    for i, r in enumerate(kept):
        assert (r.path, r.host) == (b"/%d" % i, b"h%d" % i)
        out = core.write_request_head(r, IP, trusted=True)
        assert b"Host: h%d\r\n" % i in out and b"X-Forwarded-For: 9.9.9.%d, 10.1.2.3" % i in out
    del kept
    again = core.parse_request_head(raws[3])
    assert (again.path, again.host) == (b"/3", b"h3")


def test_request_head_is_made_by_parse_only(core):
    with pytest.raises(TypeError):
        core.RequestHead()
    with pytest.raises(TypeError, match="parsed must be a RequestHead"):
        core.write_request_head((b"GET / HTTP/1.1\r\n\r\n", 0, 0, 0), IP)


def test_many_segments(core):
    """Many lines that are not verbatim: the write plan grows past its inline room."""
    fields = [b"Host:h"] + [b"F%d:  %d " % (i, i) for i in range(40)] + [b"X-Forwarded-For:%d" % i
                                                                         for i in range(20)]
    r = core.parse_request_head(head(b"GET http://abs.example/p HTTP/1.1", *fields))
    out = core.write_request_head(r, IP, trusted=True)
    fl = fields_of(out)
    assert fl[0] == b"GET /p HTTP/1.1"
    assert fl[1:42] == [b"Host: abs.example"] + [b"F%d: %d" % (i, i) for i in range(40)]
    assert fl[42] == b"X-Forwarded-For: " + b", ".join(b"%d" % i for i in range(20)) + b", 10.1.2.3"


# ---------------------------------------------------------------- Host


VALID_HOSTS = [
    b"example.com", b"EXAMPLE.com", b"a", b"a.b.c.d.e", b"xn--nxasmq6b.example", b"under_score",
    b"tilde~", b"a-b", b"10.0.0.1", b"999.999.999.999", b"a%20b", b"%41", b"sub!$&'()*+;=delims",
    b"example.com:80", b"example.com:0", b"example.com:65535", b"example.com:", b"h:0080",
    b"[::1]", b"[::1]:8080", b"[2001:db8::7]", b"[2001:db8:0:0:0:0:2:1]", b"[::ffff:192.0.2.1]",
    b"[1::]", b"[1:2:3:4:5:6:7::]", b"[::]", b"[v1.fe80::a+en1]", b"[V7.x]:1",
]
INVALID_HOSTS = [
    b"a b/../<x>", b"[::1", b"x:99999", b"x:65536", b"a@b", b"x,y", b'"quoted"', b"a\tb",
    b":80", b"a:b", b"a:8a", b"a:-1", b"a/b", b"a?b", b"a#b", b"a[b]", b"%", b"%4", b"%zz", b"a\\b",
    b"[]", b"[::1]x", b"[::1]:99999", b"[1:2:3:4:5:6:7:8:9]", b"[1:2:3:4:5:6:7]", b"[1::2::3]",
    b"[12345::]", b"[::1.2.3]", b"[::256.1.1.1]", b"[::01.1.1.1]", b"[:1]", b"[1:]", b"[g::1]",
    b"[v1]", b"[v.x]", b"[vx.x]", b"[v1.]", b"[v1.a,b]", b"[fe80::1%25en0]", b"\x80\x7e\x22",
    b"a:80:80", b"[::1]:80:80", b"<script>", b"\x80", b"caf\xc3\xa9.example",
]


@pytest.mark.parametrize("host", VALID_HOSTS)
def test_valid_host(core, host):
    r = core.parse_request_head(head(b"GET / HTTP/1.1", b"Host: " + host))
    assert r.host == host
    out = core.write_request_head(r, IP)
    assert fields_of(out)[1] == b"Host: " + host
    assert b"\r\nX-Forwarded-Host: " + host + b"\r\n" in out


@pytest.mark.parametrize("host", INVALID_HOSTS)
def test_invalid_host(core, host):
    bad(core, head(b"GET / HTTP/1.1", b"Host: " + host), "invalid Host")
    bad(core, head(b"GET / HTTP/1.0", b"Host: " + host), "invalid Host")
    # still checked when an absolute-form target overrides it
    bad(core, head(b"GET http://ok.example/ HTTP/1.1", b"Host: " + host), "invalid Host")


def test_host_ows_stripped_before_validation(core):
    r = core.parse_request_head(head(b"GET / HTTP/1.1", b"Host: \t example.com \t"))
    assert r.host == b"example.com"


def test_more_than_one_host(core):
    bad(core, head(b"GET / HTTP/1.1", b"Host: a", b"host: a"), "duplicate Host")
    bad(core, head(b"GET http://a/ HTTP/1.1", b"Host: a", b"Host: b"), "duplicate Host")
    bad(core, head(b"GET / HTTP/1.0", b"Host:", b"Host:"), "duplicate Host")


def test_host_errors_in_field_order(core):
    bad(core, head(b"GET / HTTP/1.1", b"Host: a b", b"Content-Length: x"), "invalid Host")
    bad(core, head(b"GET / HTTP/1.1", b"Content-Length: x", b"Host: a b"), "invalid Content-Length")
    bad(core, head(b"GET / HTTP/1.1", b"Host: a b", b"X : y"), "invalid header name")


def test_missing_host_even_with_absolute_target(core):
    bad(core, head(b"GET http://a.example/ HTTP/1.1"), "missing Host")


# ---------------------------------------------------------------- absolute form


@pytest.mark.parametrize("target,authority,path", [
    (b"http://internal.example/x", b"internal.example", b"/x"),
    (b"http://internal.example/x?y=1&z", b"internal.example", b"/x?y=1&z"),
    (b"http://h.example", b"h.example", b"/"),
    (b"http://h.example?q=1", b"h.example", b"/?q=1"),
    (b"http://h.example#frag", b"h.example", b"/#frag"),
    (b"http://h.example:8080//double", b"h.example:8080", b"//double"),
    (b"https://secure.example/s", b"secure.example", b"/s"),
    (b"HTTP://Upper.Example/P", b"Upper.Example", b"/P"),
    (b"HtTpS://h/", b"h", b"/"),
    (b"http://[::1]:81/v6", b"[::1]:81", b"/v6"),
    (b"http://h:/empty-port", b"h:", b"/empty-port"),
    (b"http://10.0.0.1/a/http://x", b"10.0.0.1", b"/a/http://x"),
])
def test_absolute_form(core, target, authority, path):
    r = core.parse_request_head(head(b"GET " + target + b" HTTP/1.1", b"Accept: */*",
                                     b"Host: good.example", b"X-Forwarded-Host: spoofed"))
    assert (r.target, r.host, r.path) == (target, authority, path)
    out = core.write_request_head(r, IP)
    assert fields_of(out) == [b"GET " + path + b" HTTP/1.1", b"Accept: */*", b"Host: " + authority,
                              b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http",
                              b"X-Forwarded-Host: " + authority, b"Via: 1.1 fastlb"]


def test_absolute_form_http10_without_host(core):
    r = core.parse_request_head(head(b"GET http://origin.example:8000/a HTTP/1.0", b"A: b"))
    assert (r.host, r.path) == (b"origin.example:8000", b"/a")
    out = core.write_request_head(r, IP, b"http", b"fastlb", b"backend:80")
    assert fields_of(out) == [b"GET /a HTTP/1.1", b"A: b", b"Host: origin.example:8000",
                              b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-Proto: http",
                              b"X-Forwarded-Host: origin.example:8000", b"Via: 1.0 fastlb"]


def test_absolute_form_host_field_name_kept(core):
    r = core.parse_request_head(head(b"GET http://a.example/ HTTP/1.1", b"hOsT:b.example"))
    assert fields_of(core.write_request_head(r, IP))[1] == b"hOsT: a.example"


@pytest.mark.parametrize("target", [
    b"ftp://h/x", b"http:/x", b"http:x", b"http//h/", b"x", b"h.example/x", b"*x", b"**",
    b"http://", b"http:///x", b"http://?q", b"http://#f", b"https://",
    b"http://user@h/", b"http://user:pw@h/x", b"http://h:99999/", b"http://h:8a/", b"http://[::1/",
    b"http://[::1]x/", b"http://a,b/", b"http://a%zz/", b"http://:80/",
])
def test_invalid_target(core, target):
    bad(core, head(b"GET " + target + b" HTTP/1.1", b"Host: h"), "invalid request target")


def test_target_checked_before_fields(core):
    bad(core, head(b"GET ftp://h/ HTTP/1.1", b"X : y"), "invalid request target")


# ---------------------------------------------------------------- hash keys

KEYED = head(b"GET /p/q?a=1&sid=q2 HTTP/1.1", b"Host: h", b"X-User: \t alice \t",
             b"Cookie: theme=dark; sid=c1", b"x-user: bob", b"cookie: sid=c2")


@pytest.mark.parametrize("kind,name,want,what", [
    (KEY_NONE, b"", b"", None),
    (KEY_PATH, b"", b"/p/q", "path"),
    (KEY_QUERY, b"sid", b"q2", "query"),
    (KEY_QUERY, b"none", b"", "query"),
    (KEY_HEADER, b"x-USER", b"alice", "header"),
    (KEY_HEADER, b"host", b"h", "header"),
    (KEY_HEADER, b"none", b"", "header"),
    (KEY_COOKIE, b"sid", b"c1", "cookie"),
    (KEY_COOKIE, b"theme", b"dark", "cookie"),
    (KEY_COOKIE, b"none", b"", "cookie"),
])
def test_keys(core, kind, name, want, what):
    r = core.parse_request_head(KEYED, kind, name)
    assert r.key == want
    if what is not None:
        assert core.hash_key(KEYED, what, name) == want


@pytest.mark.parametrize("target,path_key,query_key", [
    (b"http://h.example/x/y?q=9", b"/x/y", b"9"),
    (b"http://h.example?q=1", b"/", b"1"),
    (b"https://h", b"/", b""),
    (b"*", b"*", b""),
    (b"/p#x?q=1", b"/p", b"1"),
])
def test_keys_of_targets(core, target, path_key, query_key):
    raw = head(b"OPTIONS " + target + b" HTTP/1.1", b"Host: h")
    assert core.parse_request_head(raw, KEY_PATH).key == path_key == core.hash_key(raw, "path")
    assert core.parse_request_head(raw, KEY_QUERY, b"q").key == query_key == core.hash_key(raw, "query", b"q")


def test_key_arguments(core):
    raw = head(b"GET / HTTP/1.1", b"Host: h")
    with pytest.raises(ValueError, match="unknown key kind"):
        core.parse_request_head(raw, 7)
    with pytest.raises(ValueError, match="needs a key_name"):
        core.parse_request_head(raw, KEY_HEADER, b"")
    with pytest.raises(TypeError, match="key_name must be bytes"):
        core.parse_request_head(raw, KEY_COOKIE, "sid")
    assert core.parse_request_head(raw, KEY_PATH, None).key == b"/"
