"""Smoke test of the lab experiment `batch_family` on its tiny (--quick) configuration."""

from __future__ import annotations

import json

import pytest
import torch

from batchnorm.family.ghost import GhostBatchNorm2d
from batchnorm.lab import registry
from batchnorm.lab.data import load_dataset
from batchnorm.lab.registry import AGREES, DISAGREES, PARTLY, Context, NullProgress


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The lab runs single-threaded (batchnorm.lab.train.set_threads); tiny models only lose from
    # more threads, badly so on a loaded 2-core machine. Restore the session's setting afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def quick_run(_one_thread):
    exp = registry.get("batch_family")
    progress = NullProgress()
    ctx = Context(data=load_dataset(max_train=300, max_test=120), seeds=[0], quick=True, progress=progress)
    result = exp(ctx)
    return exp, ctx, progress, json.loads(json.dumps(result))  # the report only ever sees JSON


def test_registered_and_not_in_demo():
    names = [e.name for e in registry.registered()]
    assert "batch_family" in names
    assert "batch_family" not in [e.name for e in registry.demo_selection()]


def test_quick_run_covers_every_method_and_batch_size(quick_run):
    exp, _, progress, res = quick_run
    cfg = exp.config(quick=True)
    assert res["methods"] == cfg["methods"] == ["bn", "renorm", "ghost", "group", "layer"]
    assert res["batch_sizes"] == cfg["batch_sizes"]
    for m in res["methods"]:
        for b in res["batch_sizes"]:
            (run,) = res["runs"][m][str(b)]
            assert run["steps"] == cfg["max_steps"]
            assert 0.0 <= run["final_test_acc"] <= 1.0 and 0.0 <= run["batch_stats_test_acc"] <= 1.0
            assert run["lr"] == pytest.approx(cfg["lr"] * b / cfg["lr_batch"])
            assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == run["steps"]
    expected = len(res["methods"]) * len(res["batch_sizes"]) * cfg["max_steps"]
    assert progress.tasks["batch_family"].completed == expected
    # trained at all: better than chance (10 classes) for some configuration
    accs = [r["final_test_acc"] for by_b in res["runs"].values() for rs in by_b.values() for r in rs]
    assert max(accs) > 0.15


def test_report_from_json(quick_run):
    exp, _, _, res = quick_run
    section = exp.report(res)
    assert section.figures and section.figures[0][0] == "batch_family"
    assert len(section.figures[0][1].axes) == 2
    assert {c.verdict for c in section.claims} <= {AGREES, PARTLY, DISAGREES}
    assert any("Batch Renorm" in c.claim for c in section.claims)
    assert "BatchNorm: B=4" in section.text


def test_options_select_methods_and_sizes():
    exp = registry.get("batch_family")
    ctx = Context(data=load_dataset(max_train=120, max_test=60), seeds=[1], quick=True,
                  options={"methods": "bn,ghost", "batch_sizes": "8", "max_steps": "3"})
    res = exp(ctx)
    assert sorted(res["runs"]) == ["bn", "ghost"] and list(res["runs"]["bn"]) == ["8"]
    assert res["runs"]["ghost"]["8"][0]["steps"] == 3


def test_bad_options_are_rejected():
    exp = registry.get("batch_family")
    data = load_dataset(max_train=60, max_test=30)
    with pytest.raises(ValueError, match="unknown method 'batchnorm'"):
        exp(Context(data=data, seeds=[0], quick=True, options={"methods": "batchnorm"}))
    with pytest.raises(ValueError, match="batch sizes"):
        exp(Context(data=data, seeds=[0], quick=True, options={"batch_sizes": "1"}))


def test_methods_build_the_right_layers():
    from batchnorm.lab.exp_batch_family import _norm_factory

    cfg = registry.get("batch_family").config()
    layer = _norm_factory("renorm", cfg, steps=1000)(8)
    s = layer.schedule
    assert (s.warmup_steps, s.r_max_steps, s.d_max_steps) == (50, 400, 250)
    ghost = _norm_factory("ghost", cfg, steps=10)(8)
    assert isinstance(ghost, GhostBatchNorm2d) and ghost.virtual_batch_size == 16
    assert _norm_factory("layer", cfg, 10)(8).num_groups == 1
    assert _norm_factory("group", cfg, 10)(12).num_groups == 4  # gcd(8, 12): groups must divide C
