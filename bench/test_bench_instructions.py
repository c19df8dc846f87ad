"""Instruction counts per proxied request under pytest: ``bench/instructions.py``, tiny.

One row (``GET /`` with a 16-byte body), access logs off, 1 connection, 200
requests, 2 repeats, for fastlb, nginx and (when installed) haproxy. Skipped
unless FASTLB_BENCH_INSTRUCTIONS=1 and valgrind, callgrind_control, h2load
and nginx are installed: it takes a minute, most of it Python starting under
valgrind. It asserts what the tool must deliver, not how fast anything is:
every target measured, a positive count for each, the counts' ratios to
nginx, and repeats that agree within 0.5 %.
"""
import os

import pytest

import instructions

ENABLED = os.environ.get("FASTLB_BENCH_INSTRUCTIONS") == "1"


@pytest.mark.timeout(900)
def test_instructions_per_request(benchmark, capsys):
    """Benchmark 1 run of the callgrind comparison (one row, 200 requests, 2 repeats)."""
    if not ENABLED:
        pytest.skip("callgrind comparison is slow: set FASTLB_BENCH_INSTRUCTIONS=1 to run it")
    missing = instructions.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {instructions.APT_LINE}")

    result = benchmark.pedantic(
        instructions.run, kwargs=dict(rows=("small",), logs=(False,), connections=(1,), n=200,
                                      repeats=2, warmup=100),
        rounds=1, iterations=1)

    benchmark.extra_info["instructions"] = [
        {"row": c["row"], "log": c["log"], "connections": c["connections"],
         **{t: v["ir"] for t, v in c["targets"].items()}} for c in result["cells"]]
    with capsys.disabled():
        print("\n" + instructions.format_table(result))
    (cell,) = result["cells"]
    assert "nginx" in cell["targets"]
    assert "fastlb" in cell["targets"] or "compiled core not built" in " ".join(result["notes"])
    for t, v in cell["targets"].items():
        assert v["ir"] > 1000, (t, v)   # a proxied request is thousands of instructions
        assert len(v["repeats"]) == 2
        assert v["vs_nginx"] == pytest.approx(v["ir"] / cell["targets"]["nginx"]["ir"])
    assert result["agree"], f"repeats differ by {100 * result['max_spread']:.2f} %"
