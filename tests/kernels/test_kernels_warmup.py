"""First use in a fresh cache (``batchnorm.kernels._warmup``): torch serves while a background process
compiles, the numba kernels take over once the ready marker is there, and an early exit leaves no
marker.

The story: with the background compile on, the first call on a new layout × dtype (of at least
NATIVE_BELOW values) answers "native" (torch's own kernel) and starts one compile process (checks
are rate-limited); the marker makes it "numba";
a failed compile falls back to compiling in-process; ``BATCHNORM_WARMUP=0`` and a forced numba
backend compile in-process as before; the marker is written atomically; a compile process killed
early leaves no marker. One end-to-end run in a fresh cache folder checks the whole story.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import batchnorm
from batchnorm.kernels import _warmup, cpu


class FakeChild:
    def __init__(self, code=None):
        self.code = code

    def poll(self):
        return self.code


@pytest.fixture
def warm(monkeypatch, tmp_path):
    """The background compile switched on, its state fresh, markers under tmp_path, no real spawn."""
    monkeypatch.setenv("BATCHNORM_WARMUP", "1")
    monkeypatch.setattr(_warmup, "_ready", set())
    monkeypatch.setattr(_warmup, "_children", {})
    monkeypatch.setattr(_warmup, "_last_check", {})
    monkeypatch.setattr(_warmup, "_RECHECK_S", 0.0)
    monkeypatch.setattr(_warmup, "marker_path", lambda kind, dtype: str(tmp_path / f"ready-{kind}-{dtype}"))
    spawned = []

    def spawn(kind, dtype):
        spawned.append((kind, dtype))
        return FakeChild()

    monkeypatch.setattr(_warmup, "_spawn", spawn)
    return tmp_path, spawned


def test_torch_serves_until_the_marker_appears(warm):
    tmp_path, spawned = warm
    x = torch.randn(32, 64, 16, 16)  # (at least NATIVE_BELOW["train"] values: smaller ones run native anyway)
    assert batchnorm.backend_for(x) == "native"
    assert batchnorm.backend_for(x) == "native"
    assert spawned == [("ncl", "f32")], "one background compile per layout × dtype"
    assert batchnorm.backend_for(x.double()) == "native" and spawned[-1] == ("ncl", "f64")
    y_torch = batchnorm.BatchNorm2d(64)(x)
    _warmup._write_marker(str(tmp_path / "ready-ncl-f32"))
    assert batchnorm.backend_for(x) == "numba"
    assert torch.allclose(batchnorm.BatchNorm2d(64)(x), y_torch, atol=1e-5)
    # channels-last: below the (M, C) crossover torch's kernel runs without asking for ours; above it
    # the (M, C) kernels' compile starts
    assert batchnorm.backend_for(x.contiguous(memory_format=torch.channels_last)) == "native"
    assert spawned[-1] == ("ncl", "f64"), "no compile for a layout that runs natively at this size"
    big = torch.empty(64, 64, 32, 32).contiguous(memory_format=torch.channels_last)  # 2^22 values
    assert batchnorm.backend_for(big) == "native"
    assert spawned[-1] == ("mc", "f32")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], "the marker is renamed into place"


def test_masked_bn_runs_the_composite_until_its_kernels_are_compiled(warm):
    from batchnorm.core.autograd import _masked_impl
    from batchnorm.kernels import masked, masked_cpu

    tmp_path, spawned = warm
    x = torch.randn(32, 64, 16, 16)
    mask = torch.rand(32, 16, 16) > 0.3
    m = batchnorm.BatchNorm2d(64)
    with batchnorm.use_backend("numba"):
        assert _masked_impl(x, 1, "identity") is masked_cpu, "a forced numba compiles in-process instead"
    _warmup._write_marker(str(tmp_path / "ready-ncl-f32"))  # (the plain kernels are ready)
    assert _masked_impl(x, 1, "identity") is masked
    assert ("masked", "f32") in spawned
    y_torch = m(x, mask=mask)  # the composite, while the masked kernels compile
    _warmup._write_marker(str(tmp_path / "ready-masked-f32"))
    assert _masked_impl(x, 1, "identity") is masked_cpu
    m2 = batchnorm.BatchNorm2d(64)
    assert torch.allclose(m2(x, mask=mask), y_torch, atol=1e-5)
    assert torch.allclose(m2.running_var, m.running_var, atol=1e-6)


def test_the_masked_kind_compiles_in_a_child_command(tmp_path):
    assert _warmup.main(["masked", "f64"]) == 2, "the masked kind compiles in _warmup_masked"
    out = subprocess.run([sys.executable, "-m", "batchnorm.kernels._warmup_masked", "masked", "f64"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [p for p in os.listdir(tmp_path) if p.startswith("batchnorm-ready-masked-f64")]


def test_checks_are_rate_limited(warm, monkeypatch):
    tmp_path, spawned = warm
    monkeypatch.setattr(_warmup, "_RECHECK_S", 3600.0)
    assert not _warmup.ready("ncl", "f32")
    _warmup._write_marker(str(tmp_path / "ready-ncl-f32"))
    assert not _warmup.ready("ncl", "f32"), "within the recheck interval the answer is cached"
    monkeypatch.setattr(_warmup, "_RECHECK_S", 0.0)
    assert _warmup.ready("ncl", "f32") and len(spawned) == 1


def test_a_failed_background_compile_falls_back_to_compiling_in_process(warm, monkeypatch):
    _, spawned = warm
    monkeypatch.setattr(_warmup, "_spawn", lambda kind, dtype: spawned.append(kind) or FakeChild(code=1))
    assert not _warmup.ready("mc", "f64")
    assert _warmup.ready("mc", "f64"), "the child exited without a marker: compile here instead"


def test_switched_off_or_forced_numba_compiles_in_process(warm, monkeypatch):
    x = torch.randn(4, 3)
    with batchnorm.use_backend("numba"):
        assert cpu.supports(x, 1, "relu"), "forcing numba must not refuse the input while warming"
    monkeypatch.setenv("BATCHNORM_WARMUP", "0")
    assert _warmup.ready("mc", "f32")
    assert not _warmup.enabled()
    monkeypatch.setenv("BATCHNORM_WARMUP", "off")
    assert not _warmup.enabled()


def test_bad_command_line_is_a_usage_error():
    assert _warmup.main(["nchw", "f32"]) == 2


def _env(cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), BATCHNORM_WARMUP="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env["PYTHONPATH"] = root
    return env


def test_a_killed_compile_leaves_no_marker(tmp_path):
    cmd = [sys.executable, "-m", "batchnorm.kernels._warmup", "ncl", "f64"]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # (numba's compile takes seconds: it is killed midway)
    proc.kill()
    proc.wait()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("batchnorm-ready")]


SCRIPT = r"""
import time, torch, batchnorm
x = torch.randn(32, 64, 16, 16, requires_grad=True)  # (>= NATIVE_BELOW["train"]: smaller runs native anyway)
m = batchnorm.BatchNorm2d(64)
t = time.perf_counter(); m(x).sum().backward(); first = time.perf_counter() - t
assert batchnorm.backend_for(x.detach()) == "native", "a fresh cache must not make the first step wait"
ref = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
t = time.perf_counter()
while batchnorm.backend_for(x.detach()) != "numba":
    assert time.perf_counter() - t < 240, "the background compile did not finish"
    time.sleep(0.25)
y = m(x)
assert torch.allclose(y, ref, atol=1e-5)
print(f"first {first:.2f}")
"""


def test_end_to_end_in_a_fresh_cache(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert [p for p in os.listdir(tmp_path) if p.startswith("batchnorm-ready-ncl-f32")]
