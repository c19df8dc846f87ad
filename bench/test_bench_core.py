"""Micro benchmarks of the per-request core, the pure and the compiled twin side by side.

Run: ``python -m pytest bench/test_bench_core.py --benchmark-only --benchmark-group-by=func``.
Each benchmarked call loops N times, so per-operation cost = time / N.
"""
from fastlb.errors import BODY_LENGTH, BODY_NONE, REQ_KEEP_ALIVE

N_SELECT = 1000
N_HEAD = 100
N_SCAN = 100


def test_round_robin_select(benchmark, core):
    """Benchmark 1000 calls to RoundRobin.select over 4 backends."""
    rr = core.RoundRobin([1, 1, 1, 1])
    select = rr.select

    def run():
        for _ in range(N_SELECT):
            select()

    benchmark(run)
    assert {rr.select() for _ in range(4)} == {0, 1, 2, 3}


def test_rewrite_request_head(benchmark, core, request_head):
    """Benchmark 100 calls to rewrite_request_head on a 9-header browser request."""
    rewrite = core.rewrite_request_head

    def run():
        for _ in range(N_HEAD):
            rewrite(request_head, b"10.1.2.3", b"http", b"fastlb", b"127.0.0.1:8000")

    benchmark(run)
    out, flags, framing, length = rewrite(request_head, b"10.1.2.3", b"http", b"fastlb",
                                          b"127.0.0.1:8000")
    assert flags & REQ_KEEP_ALIVE and framing == BODY_NONE and length == 0
    assert b"X-Forwarded-For: 10.1.2.3\r\n" in out and b"Connection" not in out


def test_rewrite_response_head(benchmark, core, response_head):
    """Benchmark 100 calls to rewrite_response_head on a 5-header 200 response."""
    rewrite = core.rewrite_response_head

    def run():
        for _ in range(N_HEAD):
            rewrite(response_head, REQ_KEEP_ALIVE)

    benchmark(run)
    out, status, flags, framing, length = rewrite(response_head, REQ_KEEP_ALIVE)
    assert status == 200 and framing == BODY_LENGTH and length == 1234


def test_chunked_scan(benchmark, core, chunked_body):
    """Benchmark 100 calls to ChunkedScanner.scan (a fresh scanner each) on a 3-chunk body."""
    Scanner = core.ChunkedScanner

    def run():
        for _ in range(N_SCAN):
            Scanner().scan(chunked_body)

    benchmark(run)
    assert Scanner().scan(chunked_body) == len(chunked_body)
