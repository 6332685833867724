"""The lab experiment `adaptation` on its --quick configuration, and the corruptions it uses."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from batchnorm.lab import registry
from batchnorm.lab.corruptions import KINDS, LEVELS, corrupt
from batchnorm.lab.data import load_dataset
from batchnorm.lab.registry import AGREES, DISAGREES, PARTLY, Context, NullProgress

pytestmark = pytest.mark.usefixtures("lab_runtime")  # (fixtures in conftest.py)


@pytest.fixture(scope="module")
def small():
    return load_dataset(max_train=300, max_test=120)


@pytest.fixture(scope="module")
def quick_run(small):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import batchnorm

        with batchnorm.use_backend("torch"):
            exp = registry.get("adaptation")
            progress = NullProgress()
            ctx = Context(data=small, seeds=[0, 1], quick=True, progress=progress)
            result = exp(ctx)
    finally:
        torch.set_num_threads(old)
    return exp, progress, json.loads(json.dumps(result, allow_nan=False))  # the report only sees JSON


def test_registered_with_a_one_line_help():
    exp = registry.get("adaptation")
    assert exp.help and "\n" not in exp.help and exp.report is not None
    assert set(exp.quick) <= set(exp.defaults)
    assert exp.config(quick=True)["severities"] == [3]


def test_quick_run_covers_every_set_method_and_seed(quick_run):
    exp, progress, res = quick_run
    cfg = exp.config(quick=True)
    assert res["sets"] == ["clean"] + [f"{k} 3" for k in KINDS]
    assert res["methods"] == ["source", "stats: replace", "stats: batch", "stats: blend N=16", "TENT"]
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    for r in res["runs"]:
        for s in res["sets"]:
            errs = r["sets"][s]["error"]
            assert set(errs) == set(res["methods"]) and all(0.0 <= e <= 1.0 for e in errs.values())
            assert len(r["sets"][s]["tent_entropy"]) == 2
        # the report's per-layer shift sees the corruption: brightness moves the first layer's mean
        assert r["sets"]["clean"]["first_layer_shift"] < r["sets"]["brightness 3"]["first_layer_shift"]
    assert progress.tasks["adaptation"].completed == 2 * (cfg["steps"] + len(res["sets"]))
    # the shift is real: the source model's error rises on the corrupted sets on average
    src = [r["sets"][s]["error"]["source"] for r in res["runs"] for s in res["sets"][1:]]
    clean = [r["sets"]["clean"]["error"]["source"] for r in res["runs"]]
    assert sum(src) / len(src) > sum(clean) / len(clean)


def test_report_from_json(quick_run):
    exp, _, res = quick_run
    section = exp.report(res)
    assert section.figures and section.figures[0][0] == "adaptation"
    assert len(section.figures[0][1].axes) == 2
    assert len(section.claims) == 4 and {c.verdict for c in section.claims} <= {AGREES, PARTLY, DISAGREES}
    assert "43.5" in section.claims[0].claim and "18.6" in section.claims[1].claim
    for c in section.claims:
        json.dumps(c.to_json(), allow_nan=False)
    import matplotlib.pyplot as plt

    plt.close(section.figures[0][1])


def test_verdicts_follow_the_numbers(quick_run):
    exp, _, res = quick_run
    worse = copy.deepcopy(res)
    for r in worse["runs"]:  # TENT worse than the batch statistics on one set only
        for s in worse["sets"][1:]:  # and adaptation made useless everywhere
            e = r["sets"][s]["error"]
            e["TENT"] = e["stats: batch"] + (0.5 if s == "blur 3" else 0.0)
            e["stats: replace"] = e["source"] + 0.1
    section = exp.report(worse)
    assert section.claims[0].verdict == DISAGREES
    assert section.claims[1].verdict == DISAGREES and "(worse on: blur 3)" in section.claims[1].measured
    better = copy.deepcopy(res)
    for r in better["runs"]:
        for s in better["sets"]:
            e = r["sets"][s]["error"]
            e["source"], e["stats: replace"] = 0.9, 0.2
            e["stats: batch"], e["stats: blend N=16"], e["TENT"] = 0.2, 0.19, 0.18
    section = exp.report(better)
    assert [c.verdict for c in section.claims[:3]] == [AGREES, AGREES, AGREES]
    assert "holds here" in section.text


def test_tent_with_a_vanishing_rate_and_the_blend_with_no_prior_are_the_batch_statistics(small):
    exp = registry.get("adaptation")
    ctx = Context(data=small, seeds=[0], quick=True,
                  options={"tent_lr": "1e-12", "prior": "0", "steps": "20", "corruptions": "contrast"})
    res = exp(ctx)
    assert res["methods"][3] == "stats: blend N=0"
    for s in res["sets"]:
        e = res["runs"][0]["sets"][s]["error"]
        assert e["TENT"] == e["stats: batch"] == e["stats: blend N=0"], (s, e)


def test_bad_options_are_rejected(small):
    exp = registry.get("adaptation")
    for opts, match in (({"corruptions": "fog"}, "unknown corruption"), ({"severities": "4"}, "severities")):
        with pytest.raises(ValueError, match=match):
            exp(Context(data=small, seeds=[0], quick=True, options=opts))


# -- corruptions ---------------------------------------------------------------------------------
def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g) * 3 - 1  # preprocessed range [-1, 2]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_every_corruption_changes_the_images_within_the_intensity_range(kind, severity):
    x = _images()
    y = corrupt(x, kind, severity, lo=-1.0, hi=2.0, seed=3)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(x, y)
    assert float(y.min()) >= -1.0 - 1e-6 and float(y.max()) <= 2.0 + 1e-6
    assert torch.equal(y, corrupt(x, kind, severity, lo=-1.0, hi=2.0, seed=3))  # reproducible
    assert torch.equal(x, _images())  # the input is not modified


def test_corruption_formulas():
    x = _images()
    u = (x.double() + 1) / 3
    c = LEVELS["contrast"][1]
    y = (corrupt(x, "contrast", 2, lo=-1.0, hi=2.0).double() + 1) / 3
    mean = u.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, (u - mean) * c + mean, rtol=1e-6, atol=1e-6)  # no clipping needed here
    b = LEVELS["brightness"][0]
    y = (corrupt(x, "brightness", 1, lo=-1.0, hi=2.0).double() + 1) / 3
    torch.testing.assert_close(y, (u + b).clamp(0, 1), rtol=1e-6, atol=1e-6)
    flat = torch.full((2, 1, 8, 8), 0.5)
    torch.testing.assert_close(corrupt(flat, "blur", 3, lo=0.0, hi=1.0), flat)  # blur keeps a constant image
    n1 = corrupt(x, "gaussian_noise", 1, lo=-1.0, hi=2.0, seed=1)
    n2 = corrupt(x, "gaussian_noise", 1, lo=-1.0, hi=2.0, seed=2)
    assert not torch.equal(n1, n2)
    mid = torch.full((200, 1, 8, 8), 0.5)  # far from the clip: the noise has the stated std
    noise = corrupt(mid, "gaussian_noise", 1, lo=0.0, hi=1.0) - 0.5
    assert abs(float(noise.std()) - LEVELS["gaussian_noise"][0]) < 0.01


def test_corruption_errors():
    x = _images()
    for kw, match in (({"kind": "fog"}, "unknown corruption"), ({"severity": 4}, "severity"),
                      ({"severity": True}, "severity"), ({"x": x[0]}, r"\(N, C, H, W\)"),
                      ({"lo": 1.0, "hi": 1.0}, "lo < hi")):
        args = {"x": x, "kind": "blur", "severity": 1, "lo": -1.0, "hi": 2.0, **kw}
        with pytest.raises(ValueError, match=match):
            corrupt(args.pop("x"), args.pop("kind"), args.pop("severity"), **args)
