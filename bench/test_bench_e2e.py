"""End-to-end benchmark under pytest: runs ``bench/e2e.py`` once.

It asserts nothing about speed, only that wrk saw no non-2xx responses and no
socket errors. The figures go to ``benchmark.extra_info`` (see
``--benchmark-json``) and are printed. Skipped when wrk or nginx is missing,
and on CI (CI=true) unless FASTLB_BENCH_E2E=1: it takes a minute or two.
Rounds and duration come from FASTLB_BENCH_ROUNDS / FASTLB_BENCH_DURATION.
"""
import os

import pytest

import e2e

_TARGETS = len(e2e.ALL_TARGETS)
_BUDGET = (e2e.env_int("FASTLB_BENCH_ROUNDS", 3) * _TARGETS
           * (e2e.env_int("FASTLB_BENCH_DURATION", 5) + 5) + 180)


@pytest.mark.timeout(_BUDGET)
def test_e2e_proxies(benchmark, capsys):
    """Benchmark 1 run of the e2e comparison (wrk against direct, nginx, haproxy, fastlb)."""
    if os.environ.get("CI") == "true" and os.environ.get("FASTLB_BENCH_E2E") != "1":
        pytest.skip("end-to-end benchmark is slow: skipped on CI unless FASTLB_BENCH_E2E=1")
    missing = e2e.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {e2e.INSTALL_HINT}")

    result = benchmark.pedantic(e2e.run, rounds=1, iterations=1)

    benchmark.extra_info["e2e"] = result["summary"]
    benchmark.extra_info["e2e_config"] = result["config"]
    benchmark.extra_info["e2e_notes"] = result["notes"]
    with capsys.disabled():
        print("\n" + e2e.format_table(result))
    assert not e2e.errors(result), f"wrk saw errors (non2xx, socket): {e2e.errors(result)}"
