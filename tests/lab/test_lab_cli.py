"""`batchnorm demo` / `batchnorm run` end to end: report.html, PNGs, results.json; rebuilt from JSON."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm.cli import main as top_main
from batchnorm.lab import registry
from batchnorm.lab.cli import main
from batchnorm.lab.data import write_idx

MINE = ["convergence", "figure1", "lr_sweep", "saturation", "inference_stats", "batch_size"]


@pytest.fixture(autouse=True)
def _restore_runtime():
    # the CLI sets the torch thread count and the kernel backend for its process; put them back
    threads, backend = torch.get_num_threads(), batchnorm.get_backend()
    yield
    torch.set_num_threads(threads)
    batchnorm.set_backend(backend)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "bn-report"
    rc = main(["demo", "--quick", "--seeds", "1", "--jobs", "1", "--no-progress", "--out", str(out),
               "--only", ",".join(MINE)])
    assert rc == 0
    return out


def test_demo_quick_writes_report_pngs_and_json(demo_dir):
    html = (demo_dir / "report.html").read_text()
    pngs = sorted(p.name for p in demo_dir.glob("*.png"))
    assert pngs == sorted(f"{n}.png" for n in MINE)
    # self-contained: every figure embedded as base64 PNG, no external references
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(pngs)
    assert all(base64.b64decode(e)[:8] == b"\x89PNG\r\n\x1a\n" for e in embedded)
    assert not re.search(r'src="(?!data:)', html) and "<link" not in html
    results = json.loads((demo_dir / "results.json").read_text())  # strict JSON (no NaN)
    assert list(results["experiments"]) == MINE
    assert results["meta"]["data"]["name"] == "digits" and results["meta"]["seeds"] == [0]
    for name in MINE:
        entry = results["experiments"][name]
        assert entry["error"] is None and entry["result"] and entry["wall_s"] >= 0
    claims = results["claims"]
    assert {c["experiment"] for c in claims} == set(MINE)
    for c in claims:
        assert c["verdict"] in ("agrees", "partly", "does not agree")
        assert c["claim"] in html.replace("&#x27;", "'").replace("&quot;", '"').replace("&gt;", ">").replace(
            "&lt;", "<").replace("&amp;", "&")


def test_report_is_rebuilt_from_results_json_alone(demo_dir, tmp_path, monkeypatch):
    # training is impossible during the rebuild: the report needs nothing but the JSON
    import batchnorm.lab.train as train_mod

    def _no_training(*a, **k):
        raise AssertionError("the report must not train")

    monkeypatch.setattr(train_mod, "train", _no_training)
    for name in MINE:
        monkeypatch.setattr(registry.get(name), "run", _no_training)
    src = json.loads((demo_dir / "results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps(src))
    rc = main(["demo", "--from-results", str(tmp_path / "results.json"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in demo_dir.glob("*.png"))
    again = json.loads((tmp_path / "results.json").read_text())
    assert [(c["experiment"], c["verdict"], c["measured"]) for c in again["claims"]] == \
        [(c["experiment"], c["verdict"], c["measured"]) for c in src["claims"]]


def test_help_lists_every_experiment(capsys):
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for e in registry.registered():
        assert re.search(rf"^  {re.escape(e.name)}\s+{re.escape(e.help[:30])}", out, re.M), e.name
        assert "options: " in out
    assert top_main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for name in MINE:
        assert name in out
    assert "--data" in out and "--seeds" in out and "--quick" in out and "--out" in out


def test_usage_errors(capsys, tmp_path):
    assert main(["run", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    assert main(["run", "figure1", "--set", "stepz=3", "--out", str(tmp_path / "o")]) == 2
    assert "no selected experiment has an option 'stepz'" in capsys.readouterr().err
    assert main(["run", "figure1", "--set", "steps=many", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read 'many' as int" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert main(["run", "figure1", "--seeds", "0"]) == 2
    assert main(["demo", "--bogus"]) == 2
    assert not (tmp_path / "o").exists()  # nothing written on a usage error


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "imgs"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 20)
    labels = write_idx(tmp_path / "labels", np.zeros(3, dtype=np.uint8))
    rc = main(["run", "figure1", "--quick", "--data", f"{bad},{labels}", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load --data" in err and "wrong magic number 0x08030000" in err


def test_run_on_idx_data_with_two_jobs(tmp_path):
    """`batchnorm run` on MNIST-format files the test writes, two experiments in two worker processes."""
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    ytr, yte = np.arange(300) % 10, np.arange(100) % 10
    # class-dependent blobs on 12x12 images, so the networks can learn something
    proto = rng.integers(0, 256, (10, 12, 12))
    xtr = np.clip(proto[ytr] + rng.normal(0, 40, (300, 12, 12)), 0, 255).astype(np.uint8)
    xte = np.clip(proto[yte] + rng.normal(0, 40, (100, 12, 12)), 0, 255).astype(np.uint8)
    write_idx(d / "train-images-idx3-ubyte.gz", xtr)
    write_idx(d / "train-labels-idx1-ubyte.gz", ytr.astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte", xte)
    write_idx(d / "t10k-labels-idx1-ubyte", yte.astype(np.uint8))
    out = tmp_path / "out"
    rc = main(["run", "convergence", "figure1", "--quick", "--seeds", "1", "--jobs", "2", "--no-progress",
               "--data", str(d), "--set", "convergence.cnn=true", "--set", "steps=20", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["data"]["name"] == "mnist" and res["meta"]["data"]["image_shape"] == [1, 12, 12]
    assert res["meta"]["jobs"] == 2 and list(res["experiments"]) == ["convergence", "figure1"]
    assert res["experiments"]["convergence"]["config"]["steps"] == 20
    assert "cnn_bn" in res["experiments"]["convergence"]["result"]["runs"]
    assert (out / "convergence.png").is_file() and (out / "figure1.png").is_file()
