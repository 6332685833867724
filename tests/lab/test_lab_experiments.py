"""Every lab experiment smoke-runs on a tiny configuration; its report is made from the JSON alone."""

from __future__ import annotations

import json

import pytest

from batchnorm.lab import registry
from batchnorm.lab.common import reach_ratio
from batchnorm.lab.models import build
from batchnorm.lab.registry import AGREES, DISAGREES, PARTLY, Context, NullProgress
from batchnorm.lab.train import TrainConfig, train

# even smaller than --quick: a smoke run of each, one seed
TINY = {
    "convergence": {"steps": "20", "cnn": "true"},
    "figure1": {"steps": "20"},
    "lr_sweep": {"lrs": "0.1,100", "steps": "10"},
    "saturation": {"steps": "20"},
    "inference_stats": {"steps": "30"},
    "batch_size": {"batch_sizes": "2,8", "epochs": "0.1"},
}


pytestmark = pytest.mark.usefixtures("lab_runtime")  # (fixtures in conftest.py)


@pytest.mark.parametrize("name", list(TINY))
def test_experiment_smoke_and_report_from_json(name, digits, tmp_path):
    exp = registry.get(name)
    progress = NullProgress()
    ctx = Context(data=digits, seeds=[0], quick=True, out=tmp_path, progress=progress, options=TINY[name])
    result = exp(ctx)
    # progress was told about every unit of work it announced
    assert progress.tasks and all(t.completed > 0 for t in progress.tasks.values())
    text = json.dumps(result, allow_nan=False)  # plain, strict JSON
    section = exp.report(json.loads(text))
    assert section.title and section.text and section.figures
    assert section.claims, f"{name} states no claim"
    for c in section.claims:
        assert c.verdict in (AGREES, PARTLY, DISAGREES) and c.claim and c.measured
        json.dumps(c.to_json(), allow_nan=False)
    for _, fig in section.figures:
        assert len(fig.axes) >= 1
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_bn_reaches_baseline_accuracy_in_fewer_steps(digits):
    """Fixed seeds, digits: BN (both placements) first reaches the no-BN model's final accuracy earlier."""
    cfg = TrainConfig(steps=200, lr=0.05, batch_size=60, eval_every=10, seed=0)
    base = train(build("mlp", digits.image_shape, seed=0), digits, cfg)
    for kind in ("mlp_bn_after", "mlp_bn_before"):
        h = train(build(kind, digits.image_shape, seed=0), digits, cfg)
        r = reach_ratio(base, h)
        assert r["steps"] is not None and r["baseline_steps_to_target"] is not None
        assert r["steps"] < r["baseline_steps_to_target"], (kind, r)


def test_verdicts_follow_the_numbers():
    """The convergence verdict is computed: the same report flips when the numbers flip."""
    exp = registry.get("convergence")
    steps = list(range(0, 110, 10))
    slow = {"steps": steps, "test_acc": [0.1 + 0.08 * i for i in range(11)],
            "train_loss": [None] + [1.0] * 10, "final_test_acc": 0.9}
    fast = {"steps": steps, "test_acc": [0.1, 0.95] + [0.96] * 9, "train_loss": [None] + [0.5] * 10,
            "final_test_acc": 0.96}
    cfg = {"steps": 100, "lr": 0.05, "batch_size": 60, "eval_every": 10, "optimizer": "sgd", "cnn": False,
           "target_fraction": 1 / 3}
    good = {"config": cfg, "seeds": [0],
            "runs": {"mlp": [slow], "mlp_bn_after": [fast], "mlp_bn_before": [fast]}}
    bad = {"config": cfg, "seeds": [0],
           "runs": {"mlp": [fast], "mlp_bn_after": [slow], "mlp_bn_before": [slow]}}
    assert exp.report(good).claims[0].verdict == AGREES
    assert exp.report(bad).claims[0].verdict == DISAGREES


def test_inference_estimators_share_one_run(digits):
    """The shadow EMA with momentum 0.1 reproduces the module's own running statistics exactly."""
    exp = registry.get("inference_stats")
    ctx = Context(data=digits, seeds=[0], quick=True, options={"steps": "25", "momenta": "0.1,0.01"})
    res = exp(ctx)
    run = res["runs"][0]
    assert run["own_buffers_vs_shadow_ema"] is not None and run["own_buffers_vs_shadow_ema"] < 1e-6
    assert set(run["final_test_acc"]) >= {"EMA momentum 0.1", "EMA momentum 0.01", "cumulative (all batches)",
                                          "exact (recomputed)", "batch statistics (train mode)"}
    # the exact statistics are the reference: their distance to themselves is not reported, the others' is
    assert run["distance_to_exact"]["EMA momentum 0.1"]["mean_shift"] >= 0
