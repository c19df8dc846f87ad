"""Instruction counts per proxied request under pytest: ``bench/instructions.py``, tiny.

One row (``GET /`` with a 16-byte body), access logs off, 1 connection, 1000
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
    """Benchmark 1 run of the callgrind comparison (one row, 1000 requests, 2 repeats)."""
    if not ENABLED:
        pytest.skip("callgrind comparison is slow: set FASTLB_BENCH_INSTRUCTIONS=1 to run it")
    missing = instructions.missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {instructions.APT_LINE}")

    result = benchmark.pedantic(
        instructions.run, kwargs=dict(rows=("small",), logs=(False,), connections=(1,),
                                      n=1000, repeats=2),
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


def test_skips_cleanly_without_the_tools(tmp_path):
    """Without valgrind, callgrind_control and h2load on PATH the script names them,
    gives the apt-get line and exits 0 (no tool is needed for this test)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instructions.py")
    r = subprocess.run([sys.executable, script, "--rows", "small"], capture_output=True,
                       text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "valgrind, callgrind_control, h2load" in r.stdout
    assert instructions.APT_LINE in r.stdout


# A callgrind dump in the shape callgrind_control -d writes (compressed names,
# a call into the GC, a totals line that keeps costs from before the zero).
DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 1
cmd: python -m fastlb serve
part: 2

positions: line
events: Ir
summary: 1500

ob=(1) /usr/lib/libpython3.11.so
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 400
cfn=(2) gc_collect_main
calls=2 100
20 300
fn=(2)
100 200
cfn=(3) visit_decref
calls=5 1
1 100
fn=(3)
1 100
ob=(2) /usr/lib/libc.so.6
fl=(2) memcpy.S
fn=(4) __memcpy_avx_unaligned_erms
5 700
fn=(5) __memmove_avx_unaligned_erms
5 150

totals: 1550
"""


def test_read_dump(tmp_path):
    """summary/totals as written; self cost per function (call lines excluded); the GC's
    cost inclusive, counted once at the call from outside it."""
    path = tmp_path / "x.cg"
    path.write_text(DUMP)
    d = instructions.read_dump(str(path))
    assert d["summary"] == 1500 and d["totals"] == 1550
    own = {fn: ir for (fn, _), ir in d["self"].items()}
    assert own == {"_PyEval_EvalFrameDefault": 400, "gc_collect_main": 200,
                   "visit_decref": 100, "__memcpy_avx_unaligned_erms": 700,
                   "__memmove_avx_unaligned_erms": 150}
    assert d["gc"] == 300
    assert [ob for (fn, ob) in d["self"] if fn.startswith("__mem")] == ["/usr/lib/libc.so.6"] * 2
    top = instructions.top_functions(d, 10, count=2)
    assert top[0].split()[0] == "70" and "__memcpy_avx_unaligned_erms" in top[0]
