"""``batchnorm bench --small`` runs (quick mode) and reports every row × pass with a backend name."""

from __future__ import annotations

import json

from batchnorm.bench import layers, small


def test_small_quick_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "small.json"
    assert layers.main(["--small", "--quick", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len(small.QUICK_ROWS) * len(small.PASSES)
    for r in rows:
        assert r["ours_us"] > 0 and r["torch_us"] > 0 and r["ratio"] > 0
        assert r["backend"] in ("native", "numba", "torch")
    text = capsys.readouterr().out
    assert "torch/ours" in text and "BatchNormAct2d" in text and "64×128×16×16" in text
