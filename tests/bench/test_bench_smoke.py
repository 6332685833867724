"""``batchnorm bench --quick`` runs end to end (CI smoke test; no timing is asserted)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from batchnorm import cli
from batchnorm.bench import layers as benchmark


def test_quick_bench_prints_the_table_and_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--reps", "1", "--warmup", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("ours ms", "torch ms", "speed-up", "% bound", "train fwd", "fwd+bwd", "eval", "nhwc"):
        assert word in out, word
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert len(rows) == len(benchmark.QUICK_CASES) * len(benchmark.PASSES)
    assert {r["pass"] for r in rows} == set(benchmark.PASSES)
    for r in rows:
        assert r["backend"] == "numba"
        for k in ("ours_ms", "torch_ms", "copy_ms", "bound_ms"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["speedup"] == pytest.approx(r["torch_ms"] / r["ours_ms"])
        assert r["bound_frac"] == pytest.approx(r["bound_ms"] / r["ours_ms"])
        ratio = {"train fwd": 1.0, "bwd": 1.5, "fwd+bwd": 2.5, "eval": 1.0}[r["pass"]]
        assert r["bound_ms"] == pytest.approx(ratio * r["copy_ms"])
        assert r["err_y_ours"] < 1e-5 and r["err_dx_ours"] < 1e-5, "ours is off the float64 computation"
    assert data["meta"]["reps"] == 1 and data["meta"]["threads"] >= 1


def test_alloc_measurement_quick(capsys):
    assert benchmark.main(["--alloc", "--quick", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "pool" in out and "fresh pages" in out and "mallopt" in out


def test_case_option_measures_only_the_given_shapes(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--case", "6x5", "--case", "2x3x4x4:nhwc", "--case", "2x3x2x2x2:ndhwc",
            "--reps", "1", "--warmup", "0", "--no-compile", "--json", str(path)]
    assert benchmark.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shape"], r["layout"]) for r in rows[::len(benchmark.PASSES)]] == [
        ([6, 5], "nc"), ([2, 3, 4, 4], "nhwc"), ([2, 3, 2, 2, 2], "ndhwc")]
    assert all(r["backend"] == "numba" and r["err_y_ours"] < 1e-5 for r in rows)
    assert "2×3×4×4" in capsys.readouterr().out


@pytest.mark.parametrize("text,layout", [("4096x1024", "nc"), ("32X256x28x28", "nchw"), ("8×4×5", "nchw"),
                                         ("2x3x4x5:NHWC", "nhwc")])
def test_case_parsing(text, layout):
    shape, got = benchmark._parse_case(text)
    assert got == layout and len(shape) == len(text.split(":")[0].replace("×", "x").lower().split("x"))


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--threads", "0"], ["--nope"], ["--case", "4096"],
                                  ["--case", "4xa"], ["--case", "0x3"], ["--case", "2x3x4x5x6x7"],
                                  ["--case", "4x5:nhwc"], ["--case", "2x3x4:nhwc"],
                                  ["--case", "2x3x4x5:ndhwc"]])
def test_bad_arguments_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv)
    assert e.value.code == 2
    assert "usage: batchnorm bench" in capsys.readouterr().err


def test_script_wrapper(monkeypatch, capsys):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_stream_measurement_quick(capsys):
    from batchnorm.kernels import cpu

    before = cpu.STREAM_MIN_BYTES
    assert benchmark.main(["--stream", "--quick", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "Streaming stores" in out and "eval plain ms" in out and "BATCHNORM_STREAM_MIN_BYTES" in out
    assert before == cpu.STREAM_MIN_BYTES, "the measurement must restore the threshold"
