"""``batchnorm bench --model`` runs end to end on a small ResNet (smoke test; no timing is asserted)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchnorm import cli
from batchnorm.bench import models as M


@pytest.fixture
def small_resnet(monkeypatch):
    """A one-block-per-stage ResNet (the local definition) so the smoke test stays fast."""
    monkeypatch.setattr(M, "build", lambda name, num_classes=1000: (
        M.ResNet(M.BasicBlock if name == "resnet18" else M.Bottleneck, (1, 1, 1, 1), num_classes), "test"))


def test_model_bench_prints_the_table_and_consistent_json(small_resnet, tmp_path, capsys):
    path = tmp_path / "models.json"
    old = torch.get_num_threads()
    try:
        argv = ["bench", "--model", "resnet18", "--quick", "--threads", "1", "--json", str(path)]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(old)
    out = capsys.readouterr().out
    for word in ("torch ms", "ours ms", "speed-up", "BN%", "folded", "resnet18", "nchw", "nhwc"):
        assert word in out, word
    data = json.loads(path.read_text())
    assert [r["layout"] for r in data["rows"]] == ["nchw", "nhwc"]
    for r in data["rows"]:
        assert r["train_speedup"] == pytest.approx(r["train_ms"]["torch"] / r["train_ms"]["ours"])
        for v in (*r["train_ms"].values(), *r["eval_img_s"].values()):
            assert math.isfinite(v) and v > 0
        assert 0 < r["torch_shares"]["bn"] < 1 and 0 <= r["torch_shares"]["add"] < 1
        assert r["eval_rel_err"] < 1e-4, "the converted model must compute the same numbers"


def test_the_converted_model_uses_the_fused_modules():
    model = M.ResNet(M.BasicBlock, (1, 1, 1, 1), 10)
    ours = M.convert(model)
    names = {type(m).__name__ for m in ours.modules()}
    assert {"FusedResidualBlock", "BatchNormAddAct2d", "BatchNormAct2d"} <= names
    assert "BasicBlock" not in names
    assert list(ours.state_dict()) == list(model.state_dict())


def test_unknown_or_unavailable_models_are_reported(monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        M.build("vgg")
    monkeypatch.setattr(M, "_torchvision_models", lambda: (None, "ImportError: no torchvision"))
    with pytest.raises(LookupError, match=r"efficientnet_b0 needs torchvision.*no torchvision"):
        M.build("efficientnet_b0")
    assert M.run(["mobilenet_v3_small"], 2, 32, 1, 0)["skipped"]["mobilenet_v3_small"].startswith(
        "mobilenet_v3_small needs torchvision")
    with pytest.raises(SystemExit):
        M.main(["--model", "resnet18", "--batch", "1"])


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
def test_torchvision_models_build_convert_and_train_one_step(name):
    """The torchvision models (imported through the nms/qnms workaround) build with random weights,
    convert (BN + activation fused) and run one training step on a tiny input."""
    try:
        model, source = M.build(name, num_classes=10)
    except LookupError as e:
        pytest.skip(str(e))
    assert source == "torchvision"
    ours = M.convert(model)
    assert "BatchNormAct2d" in {type(m).__name__ for m in ours.modules()}
    assert not any(type(m) is torch.nn.BatchNorm2d for m in ours.modules())
    torch.manual_seed(0)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():  # same weights and statistics: the same numbers
        model.eval(), ours.eval()
        ref = model(x)
        assert (ours(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    opt = torch.optim.SGD(ours.parameters(), lr=1e-3)
    ours.train()
    torch.nn.functional.cross_entropy(ours(x), target).backward()
    opt.step()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in ours.parameters())
