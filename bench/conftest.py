"""Shared fixtures of the benchmarks (``python -m pytest bench --benchmark-only``).

``bench/`` is not under the project's ``testpaths`` (``tests``), so a plain
``pytest`` never collects it; it runs only when named on the command line.
"""
import os
import sys

import pytest

from fastlb import core as _switch

# bench/e2e.py is imported by test_bench_e2e.py as ``e2e``, whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # The root pyproject sets ``timeout = 120`` for pytest-timeout; where that
    # plugin is not installed, keep the ``timeout`` mark of the e2e test known.
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


@pytest.fixture(params=["py", "c"], ids=["py", "c"])
def core(request):
    """Each core as a module: ``fastlb._core_py`` (id py) and ``fastlb._core`` (id c).

    The compiled one is skipped when it is not built (or FASTLB_NO_EXTENSIONS=1).
    """
    mod = _switch.implementation(request.param)
    if mod is None:
        pytest.skip("compiled core fastlb._core is not built (or FASTLB_NO_EXTENSIONS=1)")
    return mod


# A Firefox request as a browser sends it: 9 header lines, a ~60-byte cookie.
REQUEST_HEAD = (
    b"GET /static/app.js?v=3 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
    b"image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: sessionid=8f3a2c1e9b7d4f6a; csrftoken=Zx81QpLm2Vt7; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Cache-Control: max-age=0\r\n"
    b"\r\n"
)

# A typical backend response head: 5 header lines.
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Wed, 27 Nov 2024 10:00:00 GMT\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: 1234\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)

# A small chunked body: three chunks, an extension-free last chunk, no trailers.
CHUNKED_BODY = (
    b"1a\r\n" + b"a" * 26 + b"\r\n"
    b"40\r\n" + b"b" * 64 + b"\r\n"
    b"7\r\n" + b"c" * 7 + b"\r\n"
    b"0\r\n\r\n"
)


@pytest.fixture
def request_head():
    return REQUEST_HEAD


@pytest.fixture
def response_head():
    return RESPONSE_HEAD


@pytest.fixture
def chunked_body():
    return CHUNKED_BODY
