"""The torch.compile column of ``batchnorm bench`` (``batchnorm.bench.compiled``): wiring and reporting.

Inductor's compile takes tens of seconds, so the table's wiring is tested with a stand-in contender
(plain eager BN+ReLU) and the failure path (no C++ compiler) with one that raises; the real inductor
run is ``batchnorm bench --compile``.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as TF

from batchnorm.bench import compiled
from batchnorm.bench import layers as benchmark


def _eager_contenders(x, x0, w, b, rm, rv, dy):
    def fwd():
        return torch.relu(TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True))

    def ev():
        with torch.no_grad():
            return torch.relu(TF.batch_norm(x0, rm, rv, w, b, training=False))

    out = fwd()
    fns = {"train fwd": fwd, "bwd": lambda: torch.autograd.grad(out, (x, w, b), dy, retain_graph=True),
           "fwd+bwd": lambda: torch.autograd.grad(fwd(), (x, w, b), dy), "eval": ev}
    return fns, {"compile_train_s": 0.5, "compile_eval_s": 0.25}


def test_compile_column_is_measured_and_printed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(compiled, "contenders", _eager_contenders)
    path = tmp_path / "b.json"
    argv = ["--compile", "--case", "4x3x2x2", "--reps", "1", "--warmup", "0", "--json", str(path)]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "compile ms" in out and "vs compile" in out and "compiling took 1 s" in out
    for r in json.loads(path.read_text())["rows"]:
        assert r["compiled_ms"] > 0 and r["vs_compiled"] == r["compiled_ms"] / r["ours_ms"]


def test_compile_column_is_left_out_with_the_reason(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(compiled, "contenders", lambda *a: (None, {"error": "InvalidCxxCompiler: no g++"}))
    assert benchmark.main(["--compile", "--case", "6x5", "--reps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile column left out: InvalidCxxCompiler: no g++" in out and "vs compile" not in out


def test_quick_leaves_the_compile_column_out_by_default(monkeypatch, capsys):
    def boom(*a):
        raise AssertionError("--quick must not compile")

    monkeypatch.setattr(compiled, "contenders", boom)
    assert benchmark.main(["--quick", "--case", "6x5", "--reps", "1", "--warmup", "0"]) == 0
    assert "compile ms" not in capsys.readouterr().out
