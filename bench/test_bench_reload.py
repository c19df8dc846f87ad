"""Reload under load under pytest: ``bench/reload.py`` for a few seconds.

Asserts only what must hold whatever the speed: wrk saw no non-2xx
response and no socket error while fastlb reloaded its file every second,
and every reload was applied. Skipped when wrk or nginx is missing.
``FASTLB_BENCH_RELOAD_DURATION`` sets the seconds (default 6).
"""
import pytest

import e2e
import reload


@pytest.mark.timeout(180)
def test_reload_under_wrk_loses_nothing(capsys):
    missing = [t for t in ("wrk", "nginx", "taskset") if e2e.find_tool(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {e2e.INSTALL_HINT}")
    duration = e2e.env_int("FASTLB_BENCH_RELOAD_DURATION", 6)
    status = reload.main(["--duration", str(duration), "--every", "1"])
    out = capsys.readouterr().out
    print(out)
    assert status == 0, out
    assert "non-2xx 0, socket errors 0" in out
