"""The shared-memory table: layout, folding of a gone worker's counters, rows
kept across configurations, and a second process writing the same pages."""
import os
import subprocess
import sys

import pytest

from fastlb.config.model import BackendConfig, Config, ListenerConfig, PoolConfig
from fastlb.runtime.shm import (B_ACTIVE, B_REQUESTS, FLAG_SET, FLAG_UP, L_CONNECTIONS,
                                Layout, TableFull, Tables)


def _config(pools, listeners=("web",)):
    ps = {name: PoolConfig(name=name, backends=tuple(
        BackendConfig(url=f"http://127.0.0.1:{p}", host="127.0.0.1", port=p) for p in ports))
        for name, ports in pools.items()}
    first = next(iter(ps))
    ls = {n: ListenerConfig(name=n, port=0, default_pool=first) for n in listeners}
    return Config(listeners=ls, pools=ps)


def test_fold_keeps_totals_and_drops_gauges():
    t = Tables.create(4, 2, 3)
    a = t.backend_counters(1, 2)
    b = t.backend_counters(2, 2)
    a[B_REQUESTS] += 7
    a[B_ACTIVE] += 3
    b[B_REQUESTS] += 5
    t.listener_counters(1, 1)[L_CONNECTIONS] += 4
    assert t.backend_totals(2)[B_REQUESTS] == 12
    t.fold(1)
    assert t.backend_totals(2)[B_REQUESTS] == 12      # never goes backwards
    assert t.backend_totals(2)[B_ACTIVE] == 0         # what was open is gone
    assert list(a) == [0] * len(a)
    assert t.listener_totals(1)[L_CONNECTIONS] == 4
    with pytest.raises(ValueError):
        t.fold(0)
    with pytest.raises(IndexError):
        t.backend_counters(3, 0)


def test_layout_keeps_rows_of_kept_backends_and_zeroes_reused_ones():
    t = Tables.create(4, 2, 2)
    lay = Layout(t)
    rows, lrows = lay.assign(_config({"app": [1, 2]}))
    t.backend_counters(1, rows[("app", "127.0.0.1:1")])[B_REQUESTS] = 4
    t.backend_counters(1, rows[("app", "127.0.0.1:2")])[B_REQUESTS] = 9
    rows2, lrows2 = lay.assign(_config({"app": [2, 3]}))
    assert rows2[("app", "127.0.0.1:2")] == rows[("app", "127.0.0.1:2")]
    assert t.backend_totals(rows2[("app", "127.0.0.1:2")])[B_REQUESTS] == 9
    assert lrows2 == lrows
    # the row of :1 stays reserved one assign longer (old workers may still count on it)
    assert rows2[("app", "127.0.0.1:3")] != rows[("app", "127.0.0.1:1")]
    with pytest.raises(TableFull):
        lay.assign(_config({"app": [2, 3], "more": [4, 5, 6]}))
    assert lay.backends == rows2            # a refused assign changes nothing
    rows3, _ = lay.assign(_config({"app": [4, 5]}))
    assert rows[("app", "127.0.0.1:1")] in rows3.values()     # free again, and zeroed
    for r in rows3.values():
        assert t.backend_totals(r)[B_REQUESTS] == 0


def test_another_process_sees_and_writes_the_same_pages():
    t = Tables.create(4, 2, 2, shared=True)
    t.write_health(1, True, 250, 3, FLAG_UP, 12.5)
    t.bump()
    code = (
        "import os, sys\n"
        "from fastlb.runtime.shm import Tables\n"
        "t = Tables.attach(int(sys.argv[1]))\n"
        "print(t.version, *t.read_health(1))\n"
        "t.backend_counters(1, 3)[0] += 41\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(t.fd)], pass_fds=(t.fd,),
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert out == ["1", "1", "250", "3", str(FLAG_UP | FLAG_SET), "12.5"]
    assert t.backend_counters(1, 3)[0] == 41
    t.close()
