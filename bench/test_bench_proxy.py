"""The data path in memory (bench/inmem.py): 1000 keep-alive requests per call through
ClientProtocol and a pooled UpstreamProtocol, with stand-in transports: the user-space
cost of fastlb itself, without sockets. One row per balancing algorithm."""
import pytest

from inmem import build

N = 1000


@pytest.mark.parametrize("algorithm,hash_key", [
    ("round-robin", "ip"),
    ("weighted-round-robin", "ip"),
    ("least-conn", "ip"),
    ("p2c", "ip"),
    ("random", "ip"),
    ("maglev", "ip"),
    ("maglev", "cookie:session"),
])
def test_data_path(benchmark, algorithm, hash_key):
    """Benchmark 1000 requests (9 browser headers) and responses through the data path."""
    run = build(algorithm, hash_key)
    run(100)
    benchmark(run, N)
