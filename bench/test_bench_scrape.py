"""What one scrape of the admin listener costs: ``/metrics`` and ``/status.json``
for 3 pools x 10 backends with 4 workers' counter slots (plus spare slots and
the retired one), every counter non-zero.

Run: ``python -m pytest bench/test_bench_scrape.py --benchmark-only``.
"""
import asyncio
import random

from fastlb.config.model import BackendConfig, Config, ListenerConfig, PoolConfig
from fastlb.observe.status import collect, metrics_text
from fastlb.runtime.shm import NB, NL, Layout, Tables

WORKERS = 4


def _config():
    pools = {}
    port = 20000
    for name in ("app", "api", "static"):
        bes = []
        for _ in range(10):
            port += 1
            bes.append(BackendConfig(url=f"http://127.0.0.1:{port}", host="127.0.0.1",
                                     port=port))
        pools[name] = PoolConfig(name=name, backends=tuple(bes))
    listeners = {"web": ListenerConfig(name="web", port=0, default_pool="app")}
    return Config(listeners=listeners, pools=pools)


class _Source:
    def __init__(self, proxy, tables, layout):
        self.proxy = proxy
        self.tables = tables
        self.layout = layout

    def rows(self):
        return self.layout.backends, self.layout.listeners

    def pools(self):
        return list(self.proxy.pools.values())

    def listeners(self):
        return [("web", "127.0.0.1:8080", [])]

    def process(self):
        return {"pid": 1, "workers": WORKERS, "started": 0.0, "uptime": 1.0, "reloads": 0,
                "last_reload": None, "version": "bench"}


def test_scrape_3_pools_10_backends_4_workers(benchmark):
    from fastlb.proxy import Proxy

    config = _config()
    loop = asyncio.new_event_loop()
    try:
        proxy = Proxy(config, loop)
        tables = Tables.create(*Layout.capacity(config, WORKERS))
        layout = Layout(tables)
        layout.assign(config)
        rng = random.Random(1)
        for slot in range(tables.slots):
            for row in layout.backends.values():
                r = tables.backend_counters(slot, row)
                for k in range(NB):
                    r[k] = rng.randrange(1, 1 << 30)
            for row in layout.listeners.values():
                r = tables.listener_counters(slot, row)
                for k in range(NL):
                    r[k] = rng.randrange(1, 1 << 30)
        source = _Source(proxy, tables, layout)

        def scrape():
            return metrics_text(collect(source))

        text = benchmark(scrape)
        assert text.count("fastlb_server_requests_total{") == 30
        proxy.close()
    finally:
        loop.close()
