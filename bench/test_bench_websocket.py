"""WebSocket tunnels under pytest: a short run of ``bench/websocket.py``.

It asserts nothing about speed: every target is measured, no echo fails and
every idle tunnel opens. The figures go to ``benchmark.extra_info`` and are
printed. Skipped when ``websockets`` or ``taskset`` is missing; nginx is
optional (its rows are left out).
"""
import pytest

import websocket as wsbench


@pytest.mark.timeout(300)
def test_websocket_tunnels(benchmark, capsys):
    missing = wsbench.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {wsbench.INSTALL_HINT}")

    result = benchmark.pedantic(wsbench.run, kwargs=dict(
        sizes=(64, 16384), connections=4, duration=0.5, rounds=1, tunnels=50),
        rounds=1, iterations=1)

    with capsys.disabled():
        print("\n" + wsbench.format_markdown(result))
    benchmark.extra_info["websocket"] = {f"{t} {s}": r for (t, s), r in result["summary"].items()}
    benchmark.extra_info["tunnels"] = result["memory"]
    assert not wsbench.errors(result), wsbench.errors(result)
    measured = {t for t, _ in result["summary"]}
    assert {"direct", "fastlb-c"} <= measured or "fastlb-c skipped" in " ".join(result["notes"])
    for t, m in result["memory"].items():
        assert m["tunnels"] == 50, (t, m)
    for (t, _), r in result["summary"].items():
        assert r["mps"] > 0, (t, r)
