"""Smoke test of `python -m batchnorm.bench.masked --quick` (masked vs plain BN on one padded tensor)."""

from __future__ import annotations

import math

from batchnorm.bench import masked


def test_quick_benchmark_prints_a_ratio(capsys):
    res = masked.main(["--quick"])
    out = capsys.readouterr().out
    assert "ratio" in out and "goal <= 1.5x" in out
    assert res["plain_ms"] > 0 and res["masked_ms"] > 0
    assert math.isclose(res["ratio"], res["masked_ms"] / res["plain_ms"])
    assert 0.0 < res["valid_fraction"] < 1.0  # the tensor really is padded
