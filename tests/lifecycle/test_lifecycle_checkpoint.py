"""safetensors checkpoints with BN running statistics: round trip, metadata, and every rejection path."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from helpers.lifecycle_models import TinyResNet, randomize_bn
from safetensors.torch import load_file, save_file
from torch import nn

import batchnorm.core.modules as M
from batchnorm.lifecycle.checkpoint import FORMAT, _digest, load_checkpoint, read_checkpoint, save_checkpoint


def _model(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    model.extra = M.BatchNormAct1d(5, activation="leaky_relu", negative_slope=0.2, running_var_unbiased=False)
    return randomize_bn(model, seed=seed)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    same = all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    return sa.keys() == sb.keys() and same


def test_round_trip_restores_weights_and_running_statistics(tmp_path):
    src, dst = _model(0), _model(1)
    assert not _same_state(src, dst)
    path = tmp_path / "m.safetensors"
    save_checkpoint(src, path, metadata={"epoch": "12", "note": "präzise"})
    assert load_checkpoint(dst, path) == {"epoch": "12", "note": "präzise"}
    assert _same_state(src, dst)
    assert int(dst.bn1.num_batches_tracked) == 7
    x = torch.randn(2, 3, 8, 8)
    src.eval()
    dst.eval()
    assert torch.equal(src(x), dst(x))


def test_file_is_plain_safetensors_with_metadata_header(tmp_path):
    path = tmp_path / "m.safetensors"
    src = _model()
    save_checkpoint(src, path)
    plain = load_file(str(path))
    assert torch.equal(plain["bn1.running_var"], src.bn1.running_var)
    ck = read_checkpoint(path)
    assert ck.format_version == 2 and ck.metadata == {}
    assert ck.bn_conventions["extra"]["running_var_unbiased"] is False
    assert ck.bn_conventions["extra"]["activation"] == "leaky_relu"
    assert ck.bn_conventions["bn1"]["class"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert ck.bn_conventions["layer1.0.bn1"]["eps"] == 1e-5


def test_loading_runs_no_pickle(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)

    def boom(*a, **k):
        raise AssertionError("pickle must not run on load")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    dst = _model(1)
    load_checkpoint(dst, path)
    assert _same_state(dst, _model(0))


def test_tied_weights_and_float64_model(tmp_path):
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.BatchNorm1d(3), lin).double()
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path)
    other = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3)).double()
    load_checkpoint(other, path)
    assert torch.equal(other[0].weight, lin.weight) and torch.equal(other[2].weight, lin.weight)


def _rejects(model, path, match, **kw):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        load_checkpoint(model, path, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed by a rejected load"


def test_truncated_and_corrupted_files_are_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    data = path.read_bytes()
    dst = _model(1)
    for name, blob in [("trunc", data[:-7]), ("short", data[:10]), ("empty", b"")]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        _rejects(dst, p, "truncated or corrupted")
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # one bit of the last tensor's data
    p = tmp_path / "flip.safetensors"
    p.write_bytes(bytes(flipped))
    _rejects(dst, p, "sha256")
    head = bytearray(data)
    head[12] = ord("\x01")  # garbage inside the JSON header
    p = tmp_path / "head.safetensors"
    p.write_bytes(bytes(head))
    _rejects(dst, p, "truncated or corrupted")


def test_mismatched_models_are_rejected_with_every_problem_listed(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    bigger = _model(1)
    bigger.more = nn.BatchNorm1d(2)
    _rejects(bigger, path, r"missing keys .*more\.running_mean")
    smaller = _model(1)
    del smaller.extra
    _rejects(smaller, path, r"unexpected keys .*extra\.weight")
    wide = _model(1)
    wide.extra = M.BatchNormAct1d(6, activation="leaky_relu", negative_slope=0.2, running_var_unbiased=False)
    _rejects(wide, path, r"extra\.weight: shape \(5,\) in the file, \(6,\) in the model")
    dbl = _model(1).double()
    _rejects(dbl, path, "dtype torch.float32 in the file, torch.float64 in the model")


def test_bn_conventions_are_checked(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    unbiased = _model(1)
    unbiased.extra.running_var_unbiased = True
    _rejects(unbiased, path, "running_var_unbiased=False in the file, True in the model")
    eps = _model(1)
    eps.bn1.eps = 1e-3
    _rejects(eps, path, r"bn1: eps=1e-05 in the file, 0\.001 in the model")
    act = _model(1)
    act.extra.activation = "relu"
    _rejects(act, path, "activation='leaky_relu'")
    load_checkpoint(eps, path, check_conventions=False)
    assert _same_state(eps, _model(0))


def test_foreign_and_future_files(tmp_path):
    dst = _model(1)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in dst.state_dict().items()}, str(plain))
    _rejects(dst, plain, "not a batchnorm checkpoint")
    future = tmp_path / "future.safetensors"
    save_file({"a": torch.zeros(1)}, str(future), metadata={"format": FORMAT, "format_version": "3"})
    _rejects(dst, future, "format_version 3")
    bad = tmp_path / "bad.safetensors"
    save_file({"a": torch.zeros(1)}, str(bad), metadata={"format": FORMAT, "format_version": "one"})
    _rejects(dst, bad, "invalid format_version")
    conv = tmp_path / "conv.safetensors"
    save_checkpoint(dst, conv)
    ck = read_checkpoint(conv)
    header = {"format": FORMAT, "format_version": "1", "bn_conventions": "[not json",
              "sha256": _digest(ck.tensors)}
    save_file(ck.tensors, str(conv), metadata=header)
    _rejects(dst, conv, "unreadable bn_conventions")
    header["bn_conventions"] = json.dumps(["a list"])
    save_file(ck.tensors, str(conv), metadata=header)
    _rejects(dst, conv, "unreadable bn_conventions")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(dst, tmp_path / "nope.safetensors")


def test_save_errors_and_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    good = path.read_bytes()
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint(_model(1), path, metadata={"epoch": 3})
    with pytest.raises(TypeError, match="Module"):
        save_checkpoint({"a": torch.zeros(1)}, path)
    with pytest.raises(TypeError, match="Module"):
        load_checkpoint({"a": torch.zeros(1)}, path)
    import safetensors.torch as st

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_model(1), path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary file left


# -- issue 16: the header is covered, conventions are validated, the file behaves like open()'s ---------
def _header_and_tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("key", ["user.epoch", "bn_conventions", "format"])
def test_a_changed_header_entry_is_caught_by_the_digest(tmp_path, key):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path, metadata={"epoch": "12"})
    header, tensors = _header_and_tensors(path)
    if key == "bn_conventions":
        header[key] = header[key].replace('"eps": 1e-05', '"eps": 1e-03', 1)
    elif key == "format":
        header["format_version"] = "2"
        header["user.note"] = "added"
    else:
        header[key] = "13"  # one flipped bit: "12" -> "13"
    save_file(tensors, str(path), metadata=header)
    dst = _model(1)
    before = copy.deepcopy(dst.state_dict())
    _rejects(dst, path, "header entries do not match the sha256")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_version_1_files_still_load(tmp_path):
    from batchnorm.lifecycle.checkpoint import _bn_conventions

    src = _model(0)
    tensors = {k: v.contiguous().clone() for k, v in src.state_dict().items()}
    path = tmp_path / "v1.safetensors"
    header = {"format": FORMAT, "format_version": "1", "sha256": _digest(tensors),
              "bn_conventions": json.dumps(_bn_conventions(src))}
    save_file(tensors, str(path), metadata=header)
    dst = _model(1)
    load_checkpoint(dst, path)
    assert _same_state(src, dst)


@pytest.mark.parametrize("entry, match", [
    ("not an object", "expected an object"),
    ({"eps": "1e-5"}, "eps='1e-5' is not a number"),
    ({"running_var_unbiased": 1}, "running_var_unbiased=1 is not true or false"),
    ({"channel_axis": 1.5}, "channel_axis=1.5 is not an integer"),
    ({"surprise": 3}, "unknown key 'surprise'"),
    ({"eps": -1.0}, "eps=-1.0 is not a number >= 0"),
])
def test_malformed_bn_conventions_are_rejected(tmp_path, entry, match):
    path = tmp_path / "m.safetensors"
    src = _model(0)
    save_checkpoint(src, path)
    header, tensors = _header_and_tensors(path)
    conv = json.loads(header["bn_conventions"])
    conv["bn1"] = entry if isinstance(entry, str) else {**conv["bn1"], **entry}
    header["bn_conventions"] = json.dumps(conv)
    header["sha256"] = _digest(tensors, header)  # a well-formed digest: the entry itself is the problem
    save_file(tensors, str(path), metadata=header)
    _rejects(_model(1), path, "malformed bn_conventions: .*" + match)



def test_a_bn_conventions_entry_without_eps_is_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    header, tensors = _header_and_tensors(path)
    conv = json.loads(header["bn_conventions"])
    del conv["bn1"]["eps"]
    header["bn_conventions"] = json.dumps(conv)
    header["sha256"] = _digest(tensors, header)
    save_file(tensors, str(path), metadata=header)
    _rejects(_model(1), path, "missing 'eps'")


def test_file_mode_follows_the_umask_and_an_overwrite_keeps_it(tmp_path):
    import os
    import stat

    path = tmp_path / "m.safetensors"
    old = os.umask(0o027)
    try:
        save_checkpoint(_model(0), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o644)
    save_checkpoint(_model(1), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.safetensors"
    save_checkpoint(_model(0), real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    save_checkpoint(_model(1), link)
    assert link.is_symlink() and link.resolve() == real
    dst = _model(2)
    load_checkpoint(dst, real)
    assert _same_state(dst, _model(1))


def test_a_target_we_may_not_write_or_read_is_refused(tmp_path, monkeypatch):
    import os

    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    good = path.read_bytes()
    real_access = os.access
    # (the tests run as root, for whom mode bits do not deny access: ask access() what it would say)
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(path) else real_access(p, m))
    with pytest.raises(PermissionError, match="is not writable"):
        save_checkpoint(_model(1), path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(PermissionError, match="exists but is not readable"):
        load_checkpoint(_model(1), path)
    with pytest.raises(FileNotFoundError, match="a directory"):
        read_checkpoint(tmp_path)


def test_a_meta_device_model_is_refused_not_silently_skipped(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(0), path)
    with torch.device("meta"):
        meta = TinyResNet()
    meta.extra = M.BatchNormAct1d(5, activation="leaky_relu", negative_slope=0.2, running_var_unbiased=False)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        load_checkpoint(meta, path)


class _WithExtra(nn.Module):
    def __init__(self, tag="a"):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.tag = tag

    def get_extra_state(self):
        return {"tag": self.tag}

    def set_extra_state(self, state):
        self.tag = state["tag"]


def test_extra_state_round_trips_or_is_refused_clearly(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_WithExtra("saved"), path)
    dst = _WithExtra("other")
    load_checkpoint(dst, path)
    assert dst.tag == "saved"
    bad = _WithExtra(object())
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys .*'_extra_state'"):
        load_checkpoint(nn.Sequential(nn.BatchNorm1d(3)), path)
