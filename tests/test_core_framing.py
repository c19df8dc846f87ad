"""find_head_end on both cores: the first CRLF CRLF, from any start, with any split of lines."""
import random

import pytest


@pytest.mark.parametrize(
    "data,start,expected",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0, 27),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n", 0, 27),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n", 27, 45),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 0, -1),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0, -1),
        (b"\r\n\r\n", 0, 4),
        (b"\r\n\r\n", 1, -1),
        (b"x\r\n\r\n", 1, 5),
        (b"\n\r\n", 0, -1),
        (b"a\n\n\r\n\n\r\r\n", 0, -1),
        (b"", 0, -1),
        (b"abc", 10, -1),
    ],
)
def test_find_head_end(core, data, start, expected):
    assert core.find_head_end(data, start) == expected


def test_find_head_end_agrees_with_bytes_find(core):
    rng = random.Random(7)
    alphabet = b"\r\nab: "
    for _ in range(5000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        start = rng.randrange(0, 26)
        i = data.find(b"\r\n\r\n", start)
        assert core.find_head_end(data, start) == (-1 if i < 0 else i + 4), (data, start)


def test_find_head_end_agrees_with_bytes_find_in_long_data(core):
    """Long enough for the compiled core's 16-byte steps, with near misses
    (LF ? LF, CR LF CR, ...) at every alignment."""
    rng = random.Random(8)
    alphabet = b"\r\n\r\nab: "
    for _ in range(5000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(18, 90)))
        start = rng.randrange(0, len(data) + 2)
        i = data.find(b"\r\n\r\n", start)
        assert core.find_head_end(data, start) == (-1 if i < 0 else i + 4), (data, start)
    for n in range(0, 70):
        data = b"x" * n + b"\r\n\r\n" + b"y" * rng.randrange(40)
        for start in range(n + 2):
            assert core.find_head_end(data, start) == (n + 4 if start <= n else -1), (data, start)


def test_find_head_end_rejects(core):
    with pytest.raises(TypeError):
        core.find_head_end(bytearray(b"\r\n\r\n"))
    with pytest.raises(ValueError):
        core.find_head_end(b"\r\n\r\n", -1)


def test_read_buffer_is_a_writable_bytearray_of_its_size(core):
    for n in (0, 1, 2048, 65536):
        buf = core.read_buffer(n)
        assert type(buf) is bytearray and len(buf) == n
        memoryview(buf)[:n] = b"\x5a" * n       # written through a view, as a transport does
        assert buf == b"\x5a" * n
    with pytest.raises(ValueError):
        core.read_buffer(-1)


def test_buffer_bytes_copies_a_range(core):
    rng = random.Random(11)
    buf = bytearray(rng.randbytes(5000))
    for start, end in ((0, 0), (0, 5000), (17, 2065), (4999, 5000), (5000, 5000)):
        out = core.buffer_bytes(buf, start, end)
        assert type(out) is bytes and out == bytes(buf[start:end])
    out = core.buffer_bytes(buf, 0, 10)
    buf[0:10] = b"0123456789"
    assert out != b"0123456789"                 # a copy: the buffer may be read into again


def test_buffer_bytes_rejects(core):
    buf = bytearray(b"abcdef")
    for start, end in ((-1, 2), (3, 2), (0, 7)):
        with pytest.raises(ValueError):
            core.buffer_bytes(buf, start, end)
    for bad in (b"abcdef", memoryview(buf), "abcdef"):
        with pytest.raises(TypeError):
            core.buffer_bytes(bad, 0, 1)
