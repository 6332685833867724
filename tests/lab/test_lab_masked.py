"""The lab experiment `masked` (issue 17): its --quick run, the data it builds, and its report from JSON."""

from __future__ import annotations

import json

import pytest
import torch

import batchnorm
from batchnorm.lab import registry
from batchnorm.lab.data import load_dataset
from batchnorm.lab.exp_masked import SeqNet, _claims, make_sequences
from batchnorm.lab.registry import AGREES, DISAGREES, PARTLY, Context, NullProgress


@pytest.fixture(scope="module")
def quick_run():
    # as the lab runs (see the lab_runtime fixture): one thread, the composite torch backend
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = registry.get("masked")
        progress = NullProgress()
        ctx = Context(data=load_dataset(max_train=200, max_test=80), seeds=[0], quick=True, progress=progress)
        with batchnorm.use_backend("torch"):
            result = exp(ctx)
    finally:
        torch.set_num_threads(old)
    return exp, progress, json.loads(json.dumps(result))  # the report only ever sees JSON


def test_registered_not_in_demo():
    assert "masked" in [e.name for e in registry.registered()]
    assert "masked" not in [e.name for e in registry.demo_selection()]


def test_quick_run(quick_run):
    exp, progress, res = quick_run
    cfg = exp.config(quick=True)
    assert res["methods"] == ["plain", "masked"]
    for m in res["methods"]:
        (run,) = res["runs"][m]
        assert 0 <= run["eval_acc"] <= 1 and 0 <= run["train_mode_acc"] <= 1
        assert run["gap"] == pytest.approx(run["train_mode_acc"] - run["eval_acc"])
        assert run["steps"][-1] == cfg["steps"] and len(run["test_acc"]) == len(run["steps"])
    assert progress.tasks["masked"].completed == 2 * cfg["steps"]
    assert 0.2 < res["test_valid_fraction"] < 1.0  # the test batches do carry padding


def test_report_from_json(quick_run):
    exp, _, res = quick_run
    section = exp.report(res)
    assert section.figures[0][0] == "masked" and len(section.figures[0][1].axes) == 2
    assert len(section.claims) == 2 and {c.verdict for c in section.claims} <= {AGREES, PARTLY, DISAGREES}
    assert "masked BN" in section.text


def _result(gaps_plain, gaps_masked, acc_plain, acc_masked):
    def runs(gaps, accs):
        return [{"gap": g, "eval_acc": a, "train_mode_acc": a + g} for g, a in zip(gaps, accs)]
    return {"runs": {"plain": runs(gaps_plain, acc_plain), "masked": runs(gaps_masked, acc_masked)}}


def test_verdicts_follow_the_numbers():
    clear = _claims(_result([0.10, 0.12], [0.0, 0.01], [0.80, 0.80], [0.85, 0.85]))
    assert [c.verdict for c in clear] == [AGREES, AGREES]
    # gaps of either sign are sizes: masked gaps of -0.1/+0.1 are not "no gap"
    worse = _claims(_result([0.01, 0.01], [-0.1, 0.1], [0.9, 0.9], [0.7, 0.7]))
    assert [c.verdict for c in worse] == [DISAGREES, DISAGREES]
    assert worse[0].numbers["gap_masked"] == pytest.approx(0.1)


def test_sequences_and_the_mask():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(5 * 8 * 8, dtype=torch.float32).reshape(5, 1, 8, 8)
    batches = make_sequences(images, 3, 4, 2, g)
    assert [b[2].numel() for b in batches] == [2, 2]  # the 5th sample alone would be a batch of 1
    for x, mask, idx in batches:
        lengths = mask.sum(1)
        assert x.shape[:2] == (2, 8) and mask.shape == (2, x.shape[2])
        assert int(lengths.min()) >= 3 and x.shape[2] <= int(lengths.max()) + 4
        for k, i in enumerate(idx.tolist()):
            ln = int(lengths[k])
            rows = x[k, :, :ln].T  # consecutive rows of image i
            start = int(rows[0, 0] - images[i, 0, 0, 0]) // 8
            assert torch.equal(rows, images[i, 0, start:start + ln])
            assert not x[k, :, ln:].any()


def test_masked_net_ignores_padding_and_plain_net_does_not():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 4, 2])[:, None]
    x = x * mask[:, None]
    longer = torch.cat([x, torch.zeros(4, 8, 5)], 2)  # the same batch with 5 more padded steps
    mask2 = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    for masked, same in ((True, True), (False, False)):
        torch.manual_seed(1)
        net = SeqNet(8, 10, 6, masked)
        a, b = net(x, mask), net(longer, mask2)
        assert torch.allclose(a, b, atol=1e-5) is same


def test_bad_options():
    exp = registry.get("masked")
    data = load_dataset(max_train=40, max_test=20)
    with pytest.raises(ValueError, match="min_len in \\[1, 8\\]"):
        exp(Context(data=data, seeds=[0], quick=True, options={"min_len": "9"}))
    with pytest.raises(ValueError, match="batch_size >= 2"):
        exp(Context(data=data, seeds=[0], quick=True, options={"batch_size": "1"}))
