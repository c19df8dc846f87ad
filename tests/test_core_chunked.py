"""ChunkedScanner, on both cores (the ``core`` fixture)."""
import pytest

from fastlb.errors import MAX_CHUNK_SIZE_DIGITS, BadGateway, BadRequest


def feed(core, pieces, decode=True, exc=BadRequest):
    """Feed ``pieces`` in order; return (end index in the joined input or -1, payload, scanner)."""
    sc = core.ChunkedScanner(decode=decode, exc=exc)
    offset = 0
    for piece in pieces:
        r = sc.scan(piece)
        if r >= 0:
            assert sc.done
            return offset + r, b"".join(sc.payload), sc
        assert not sc.done
        offset += len(piece)
    return -1, b"".join(sc.payload), sc


def all_splits(core, data, decode=True):
    """Whole, every two-way split, byte by byte: all must agree. Returns (end, payload)."""
    want = feed(core, [data], decode)[:2]
    for k in range(len(data) + 1):
        assert feed(core, [data[:k], data[k:]], decode)[:2] == want, k
    assert feed(core, [data[i:i + 1] for i in range(len(data))], decode)[:2] == want
    return want


BODIES = [
    (b"0\r\n\r\n", b""),
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    (b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n", b"0123456789abcdefghij"),
    (b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
    (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    (b"5;a=\"q;x\"\t; b\r\nhello\r\n0\r\n\r\n", b"hello"),
    (b"3\r\n\r\n\r\r\n0\r\n\r\n", b"\r\n\r"),
    (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nOther:\tv\xff \r\n\r\n", b"hello"),
    (b"0\r\nA:\r\n\r\n", b""),
    # leading zeros are valid (RFC 9112 7.1: chunk-size = 1*HEXDIG)
    (b"0000000000000000001\r\nx\r\n0\r\n\r\n", b"x"),
    (b"0" * 19 + b"5;e=1\r\nhello\r\n" + b"0" * 20 + b"\r\n\r\n", b"hello"),
    (b"0" * 4 + b"0000000000000003\r\nabc\r\n0\r\n\r\n", b"abc"),
]


@pytest.mark.parametrize("data,payload", BODIES)
def test_bodies(core, data, payload):
    end, got = all_splits(core, data)
    assert end == len(data)
    assert got == payload
    # without decode nothing is collected, the end is the same
    end2, got2, _ = feed(core, [data], decode=False)
    assert (end2, got2) == (end, b"")


@pytest.mark.parametrize("data,payload", BODIES)
def test_data_after_end_not_consumed(core, data, payload):
    tail = b"GET / HTTP/1.1\r\n\r\n"
    end, got = all_splits(core, data + tail)
    assert end == len(data)
    assert got == payload


def test_done_returns_start(core):
    sc = core.ChunkedScanner()
    assert sc.scan(b"0\r\n\r\nrest") == 5
    assert sc.done
    assert sc.scan(b"anything", 3) == 3
    assert sc.scan(b"") == 0


def test_start_offset(core):
    buf = b"XXXX5\r\nhello\r\n0\r\n\r\n"
    sc = core.ChunkedScanner(decode=True)
    assert sc.scan(buf, 4) == len(buf)
    assert sc.payload == [b"hello"]


def test_growing_buffer_with_start(core):
    body = b"4\r\nabcd\r\n3;x\r\nefg\r\n0\r\nT: v\r\n\r\n"
    for step in (1, 2, 5):
        sc = core.ChunkedScanner(decode=True)
        buf = b""
        consumed = 0
        end = -1
        while end < 0:
            buf += body[len(buf):len(buf) + step]
            end = sc.scan(buf, consumed)
            consumed = len(buf)
        assert end == len(body)
        assert b"".join(sc.payload) == b"abcdefg"


def test_start_past_end(core):
    sc = core.ChunkedScanner()
    assert sc.scan(b"abc", 10) == -1


def test_negative_start(core):
    with pytest.raises(ValueError):
        core.ChunkedScanner().scan(b"0\r\n\r\n", -1)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_types(core, kind):
    data = b"5\r\nhello\r\n0\r\n\r\n"
    sc = core.ChunkedScanner(decode=True)
    assert sc.scan(kind(data)) == len(data)
    assert sc.payload == [b"hello"]
    assert all(type(p) is bytes for p in sc.payload)


def test_payload_is_a_list_the_caller_empties(core):
    sc = core.ChunkedScanner(decode=True)
    assert sc.scan(b"3\r\nabc\r\n") == -1
    assert sc.payload == [b"abc"]
    sc.payload.clear()
    assert sc.scan(b"2\r\nde\r\n0\r\n\r\n") == 12
    assert sc.payload == [b"de"]


def test_decode_attribute(core):
    sc = core.ChunkedScanner()
    assert not sc.decode
    sc.scan(b"2\r\nab")
    sc.decode = True
    sc.scan(b"\r\n2\r\ncd\r\n")
    assert sc.payload == [b"cd"]


def test_large_chunk(core):
    size = 70000
    data = b"%x\r\n" % size + b"z" * size + b"\r\n0\r\n\r\n"
    end, got, _ = feed(core, [data[:1000], data[1000:50000], data[50000:]])
    assert end == len(data)
    assert got == b"z" * size


def test_max_size_digits(core):
    assert MAX_CHUNK_SIZE_DIGITS == 20
    data = b"0" * 20 + b"\r\n\r\n"
    assert feed(core, [data])[0] == len(data)
    # 15 significant digits after any run of zeros: the largest size accepted (2**60 - 1)
    sc = core.ChunkedScanner()
    assert sc.scan(b"0" * 5 + b"f" * 15 + b"\r\n" + b"x" * 1000) == -1
    # the RFC 9112 7.1 example of leading zeros, 19 digits
    assert feed(core, [b"0000000000000000001\r\nx\r\n0\r\n\r\n"])[0] == 29


@pytest.mark.parametrize("size,match", [
    (b"0" * 21, "chunk size too long"),
    (b"0" * 20 + b"1", "chunk size too long"),
    (b"0" * 16 + b"1" * 5, "chunk size too long"),
    (b"1" + b"0" * 15, "chunk size too large"),
    (b"0" * 4 + b"1" + b"0" * 15, "chunk size too large"),
])
def test_size_bounds(core, size, match):
    for pieces in ([size + b"\r\n"], [bytes([c]) for c in size + b"\r\n"]):
        sc = core.ChunkedScanner()
        with pytest.raises(BadRequest, match=match):
            for piece in pieces:
                sc.scan(piece)


ERRORS = [
    (b"g\r\n", "invalid chunk size"),
    (b"\r\n", "invalid chunk size"),
    (b";x\r\n", "invalid chunk size"),
    (b" 5\r\n", "invalid chunk size"),
    (b"5 \r\n", "invalid chunk size"),
    (b"-5\r\n", "invalid chunk size"),
    (b"0x5\r\n", "invalid chunk size"),
    (b"5\n", "invalid chunk size"),
    (b"1" * 16 + b"\r\n", "chunk size too large"),
    (b"0" * 65 + b"\r\n", "chunk size too long"),
    (b"5\rx", "missing LF after chunk size"),
    (b"5;a\r\r", "missing LF after chunk size"),
    (b"5;a\nb\r\n", "invalid chunk extension"),
    (b"5;a\x00\r\n", "invalid chunk extension"),
    (b"5;a\x7f\r\n", "invalid chunk extension"),
    (b"5;" + b"a" * 5000 + b"\r\n", "chunk extension too long"),
    (b"5\r\nhelloX", "missing CRLF after chunk data"),
    (b"5\r\nhello\rX", "missing CRLF after chunk data"),
    (b"5\r\nhello\n", "missing CRLF after chunk data"),
    (b"5\r\nhello\r\r\n", "missing CRLF after chunk data"),
    (b"0\r\n\n", "invalid trailer"),
    (b"0\r\n:x\r\n\r\n", "invalid trailer"),
    (b"0\r\n X: y\r\n\r\n", "invalid trailer"),
    (b"0\r\nX : y\r\n\r\n", "invalid trailer name"),
    (b"0\r\nX\r\n\r\n", "invalid trailer name"),
    (b"0\r\nX: a\x01\r\n\r\n", "invalid byte in trailer"),
    (b"0\r\nX: a\nY: b\r\n\r\n", "invalid byte in trailer"),
    (b"0\r\nX: a\rY", "missing LF after trailer"),
    (b"0\r\n\rX", "missing LF after last chunk"),
    (b"0\r\n" + b"X: " + b"a" * 17000 + b"\r\n\r\n", "trailers too large"),
]


@pytest.mark.parametrize("data,match", ERRORS)
def test_errors(core, data, match):
    for exc in (BadRequest, BadGateway):
        for pieces in ([data], [data[i:i + 1] for i in range(len(data))],
                       [data[:len(data) // 2], data[len(data) // 2:]]):
            sc = core.ChunkedScanner(decode=True, exc=exc)
            with pytest.raises(exc) as ei:
                for piece in pieces:
                    assert sc.scan(piece) == -1
            assert type(ei.value) is exc
            assert str(ei.value) == match
            assert ei.value.status == exc.status
            assert not sc.done


def test_extension_limit_boundary(core):
    # the chunk-size line, digits and ';' included, may be 4096 bytes long
    ok = b"5;" + b"a" * (4096 - 2) + b"\r\nhello\r\n0\r\n\r\n"
    assert feed(core, [ok])[0] == len(ok)
    bad = b"5;" + b"a" * (4096 - 1) + b"\r\n"
    with pytest.raises(BadRequest, match="chunk extension too long"):
        feed(core, [bad])


def test_trailer_limit_boundary(core):
    # the trailer section counts from after the last chunk's CRLF to its final CRLF included
    def body(k):
        return b"0\r\nX: " + b"a" * k + b"\r\n\r\n"
    limit = 16384 - len(b"X: \r\n\r\n")
    assert feed(core, [body(limit)])[0] == len(body(limit))
    with pytest.raises(BadRequest, match="trailers too large"):
        feed(core, [body(limit + 1)])


def test_custom_exception_class(core):
    class Mine(Exception):
        pass

    sc = core.ChunkedScanner(exc=Mine)
    with pytest.raises(Mine, match="invalid chunk size"):
        sc.scan(b"z")
