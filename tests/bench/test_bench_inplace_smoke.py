"""CI smoke test of ``batchnorm bench --inplace`` (batchnorm/benchmark_inplace.py).

Runs --quick end to end; the saved-bytes ratio is exact.

No timing assertions (CI machines are noisy). The saved-bytes figure is deterministic: the torch
stack saves the conv output, the BN output and the activation output of every block, InPlace-ABN
only the activation output (which the next conv saves anyway), so the ratio must be below 1 —
and for this 2-block stack it is exactly (1 + 2) / (1 + 2·2 + 1) = 0.5 up to the per-channel
vectors, which the parameter-free count below recomputes from the shapes.
"""

from __future__ import annotations

import batchnorm.bench.inplace as _bench_mod


def _load():
    return _bench_mod


def test_quick_run_prints_ratios_and_saves_less(capsys, tmp_path):
    bench = _load()
    out_json = tmp_path / "r.json"
    res = bench.main(["--quick", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert "saved-activation bytes ratio (iabn / torch):" in text
    assert "step time ratio (iabn / torch):" in text
    assert out_json.exists()
    st = res["stacks"]
    ratio = st["iabn"]["bytes_ratio"]
    assert 0 < ratio < 1
    assert st["iabn_copy"]["bytes_ratio"] < 1
    # full-size tensors: torch saves input + (x, bn_out) per block + act outputs of blocks 1..B-1
    n, c, h, w = res["shape"]
    blocks = res["blocks"]
    full = n * c * h * w * 4
    torch_full = (1 + 2 * blocks + blocks - 1) * full
    ours_full = (1 + blocks) * full
    assert torch_full <= st["torch"]["saved_activation_bytes"] <= torch_full + 64 * c * blocks
    assert ours_full <= st["iabn"]["saved_activation_bytes"] <= ours_full + 64 * c * blocks
    for k in ("torch", "iabn", "iabn_copy"):
        assert st[k]["step_ms_median"] > 0 and len(st[k]["step_ms_all"]) == res["repeats"]
