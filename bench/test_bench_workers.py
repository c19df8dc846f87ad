"""The scaling benchmark ``bench/workers.py``, quickly: W=1 and W=2, one round of 1 s.

Asserts nothing about speed. It checks what must hold whatever the speed:
every (W, target) was loaded and answered without a non-2xx response or a
socket error, fastlb and nginx really ran W worker processes (fastlb W=2 under
a master), CPU and RSS were read for every row, and the output says whether
the load generator had cores of its own. Skipped without wrk or nginx.
"""
import json

import pytest

import e2e
import workers


def test_cpu_plan_pins_only_with_room_for_the_load_generator():
    assert workers.cpu_plan(1, [0, 1, 2, 3]) == ([0], [1, 2, 3])
    assert workers.cpu_plan(3, list(range(8))) == ([0, 1, 2], [3, 4, 5, 6, 7])
    assert workers.cpu_plan(1, [0, 1, 2]) == (None, None)
    assert workers.cpu_plan(2, [0, 1]) == (None, None)
    assert workers.cpu_plan(4, list(range(9))) == (None, None)


def test_skips_with_install_hint_without_wrk(monkeypatch, capsys):
    real = e2e.find_tool
    monkeypatch.setattr(e2e, "find_tool", lambda name: None if name == "wrk" else real(name))
    assert workers.main(["--workers", "1", "--duration", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: wrk not installed")
    assert "apt-get install wrk nginx-light haproxy" in out


@pytest.mark.timeout(90)
def test_workers_1_and_2_side_by_side(tmp_path, capsys):
    missing = [t for t in ("wrk", "nginx") if e2e.find_tool(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {e2e.INSTALL_HINT}")
    md, js = tmp_path / "workers.md", tmp_path / "workers.json"
    status = workers.main(["--workers", "1,2", "--duration", "1", "--rounds", "1",
                           "--warmup", "0", "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr().out
    print(out)
    assert status == 0, out
    assert md.read_text() == out
    result = json.loads(js.read_text())
    rows = {(r["workers"], r["target"]): r for r in result["rows"]}
    fastlb = "fastlb-c" if "fastlb-c" in result["config"]["targets"] else "fastlb-py"
    for w in (1, 2):
        for t in result["config"]["targets"]:
            r = rows[(w, t)]
            assert r["requests"] > 0 and r["non2xx"] == 0 and r["socket_errors"] == 0, r
            assert r["cpu_us"] > 0 and r["cores"] > 0, r
            assert r["rss_idle_kib"] > 0 and r["rss_loaded_kib"] > 0, r
            assert f"| {w} | {t} | " in out
        assert rows[(w, "nginx")]["nworkers"] == w
        assert rows[(w, fastlb)]["nworkers"] == w
        assert "rps_vs_nginx" in rows[(w, fastlb)]
    assert rows[(1, fastlb)]["rss_master_kib"] is None      # W=1: one process, no master
    assert rows[(2, fastlb)]["rss_master_kib"] > 0
    cpus = result["config"]["cpus"]
    for w in (1, 2):
        if cpus >= 2 * w + 2:
            assert f"W={w}: proxies on CPUs" in out
    if cpus < 6:  # W=2 cannot be pinned apart from its load generator
        assert "share the cores" in out
