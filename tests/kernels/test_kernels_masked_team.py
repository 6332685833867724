"""The masked BN kernels (kernels/masked_cpu.py) on both runners: torch's OpenMP team and the Python pool.

Both runners split the channels the same way (``_cpu_team._split``) and a channel is never split, so
each channel's sums and outputs come from the same sequential code: the results are **bit-identical**
(not merely equal to rounding), and both equal the float64 oracle (:mod:`batchnorm.reference`) on the
valid positions packed together. The pool runs where there is no team: ``BATCHNORM_OMP=0`` and a
forked child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers.util import assert_close

import batchnorm
from batchnorm import reference as R
from batchnorm.kernels import _omp

if "numba" not in batchnorm.kernels.available_backends():
    pytest.skip("numba is not installed", allow_module_level=True)

from batchnorm.kernels import masked_cpu

ACTS = [("identity", 0.01), ("relu", 0.01), ("leaky_relu", 0.1), ("elu", 0.7)]


def _case(dtype, seed=0, shape=(8, 6, 4200)):
    """A padded batch large enough for two threads (``_parts``), lengths including 0 and full."""
    g = torch.Generator().manual_seed(seed)
    n, c, L = shape
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 50).to(dtype)
    lengths = torch.tensor([L, 0, 1, L // 3, L - 1, 4097, 17, L // 2])[:n]
    mask = torch.arange(L)[None, :] < lengths[:, None]
    x = x.masked_fill(~mask[:, None, :], 7.0)  # finite padding
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).masked_fill(~mask[:, None, :], 0.0)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    return x, mask, dy, w, b


def _run(x, mask, dy, w, b, act, slope, clone=True):
    y, mean, var, count = masked_cpu.masked_forward(x, mask, w, b, 1e-5, 1, act, slope)
    dx, dw, db = masked_cpu.masked_backward(dy, x, y, mask, count, w, b, mean, var, 1e-5, 1, act, slope)
    if clone:  # (y, dx are pool buffers that a later call may reuse)
        y, dx = y.clone(), dx.clone()
    return {"y": y, "mean": mean, "var": var, "count": count, "dx": dx, "dgamma": dw, "dbeta": db}


def _pack(t, mask):
    return t.detach().double().transpose(1, 2)[mask].numpy()  # (n_valid, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act,slope", ACTS)
def test_openmp_team_and_python_pool_give_identical_bits_and_match_the_oracle(dtype, act, slope, monkeypatch):
    if not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    x, mask, dy, w, b = _case(dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert len(masked_cpu._parts(x)) == 2, "the case must run on two threads"
        out = {"team": _run(x, mask, dy, w, b, act, slope)}
        monkeypatch.setattr(_omp, "_state", {"lib": ""})  # the Python thread pool
        assert not _omp.runtime()
        out["pool"] = _run(x, mask, dy, w, b, act, slope)
    finally:
        torch.set_num_threads(old)
    for name, a in out["team"].items():
        assert torch.equal(a, out["pool"][name]), f"{name}: OpenMP team and Python pool differ"
    # both against the float64 oracle on the valid positions packed
    res = out["team"]
    xp, wn, bn = _pack(x, mask), w.double().numpy(), b.double().numpy()
    y_ref, mean_ref, var_ref = R.forward_train(xp, wn, bn, 1e-5, 1, act, slope)
    dx_ref, dw_ref, db_ref = R.backward(_pack(dy, mask), xp, wn, bn, 1e-5, 1, act, slope)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(res["mean"], mean_ref, rtol=tol, atol=tol, what="mean")
    assert_close(res["var"], var_ref, rtol=tol, atol=tol, what="var")
    assert float(res["count"]) == xp.shape[0]
    assert_close(_pack(res["y"], mask), y_ref, rtol=tol, atol=tol, what="y at valid positions")
    assert_close(_pack(res["dx"], mask), dx_ref, rtol=tol, atol=tol * np.abs(dx_ref).max(), what="dx")
    pad = ~mask[:, None, :].expand(x.shape)
    assert not res["dx"][pad].any(), "dx at padding (dy = 0 there) must be 0"
    big = tol * 10 * xp.shape[0] ** 0.5
    assert_close(res["dgamma"], dw_ref, rtol=big, atol=big, what="dgamma")
    assert_close(res["dbeta"], db_ref, rtol=big, atol=big, what="dbeta")


def test_team_results_do_not_depend_on_the_thread_count():
    """A channel is never split: 1 and 2 members give the same bits."""
    if not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    x, mask, dy, w, b = _case(torch.float32, seed=1)
    old = torch.get_num_threads()
    try:
        out = {}
        for nt in (1, 2):
            torch.set_num_threads(nt)
            assert len(masked_cpu._parts(x)) == nt
            out[nt] = _run(x, mask, dy, w, b, "relu", 0.0)
    finally:
        torch.set_num_threads(old)
    for name, a in out[1].items():
        assert torch.equal(a, out[2][name]), name


_CHILD = """
import sys, torch, numpy as np
from batchnorm.kernels import _omp, masked_cpu
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 6, 4200, generator=g)
mask = torch.arange(4200)[None, :] < torch.tensor([4200, 0, 1, 1400, 4199, 4097, 17, 2100])[:, None]
dy = torch.randn(x.shape, generator=g)
y, m, v, c = masked_cpu.masked_forward(x, mask, None, None, 1e-5, 1, "leaky_relu", 0.1)
dx = masked_cpu.masked_backward(dy, x, y, mask, c, None, None, m, v, 1e-5, 1, "leaky_relu", 0.1)[0]
np.savez(sys.argv[1], y=y.numpy(), m=m.numpy(), v=v.numpy(), dx=dx.numpy())
print(repr(_omp.runtime()))
"""


def test_batchnorm_omp_0_selects_the_pool_with_the_same_bits(tmp_path):
    outs = {}
    for flag in ("1", "0"):
        f = tmp_path / f"out{flag}.npz"
        env = {**os.environ, "BATCHNORM_OMP": flag}
        res = subprocess.run([sys.executable, "-c", _CHILD, str(f)], env=env, capture_output=True, text=True,
                             check=True)
        outs[flag] = (eval(res.stdout.strip().splitlines()[-1]), dict(np.load(f)))
    assert outs["0"][0] == "", "BATCHNORM_OMP=0 must select the Python thread pool"
    for k, a in outs["1"][1].items():
        assert np.array_equal(a, outs["0"][1][k]), k


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_masked_kernels_in_a_forked_child_use_the_pool_with_the_same_bits():
    x, mask, dy, w, b = _case(torch.float32, seed=2)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = _run(x, mask, dy, w, b, "elu", 0.7)  # on the team where there is one
        pid = os.fork()
        if pid == 0:  # child: no OpenMP team here, the pool must serve, with the same bits (no clone:
            # a large torch copy would run on torch's own OpenMP pool, which hangs after a fork)
            try:
                out = _run(x, mask, dy, w, b, "elu", 0.7, clone=False)
                ok = not _omp.runtime() and all(np.array_equal(out[k].numpy(), ref[k].numpy()) for k in ref)
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child hung in a masked kernel call")
            time.sleep(0.05)
    finally:
        torch.set_num_threads(old)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child's result differs (or it used OpenMP)"


@pytest.mark.parametrize("runner", ["team", "pool"])
def test_streamed_dx_equals_plain_stores(runner, monkeypatch):
    """Large dx (identity) is written with streaming stores (kernels/_stream.py): same bits as plain
    stores, on both runners."""
    from batchnorm.kernels import cpu

    if runner == "team" and not _omp.runtime():
        pytest.skip("torch here has no OpenMP team to run on")
    if runner == "pool":
        monkeypatch.setattr(_omp, "_state", {"lib": ""})
    x, mask, dy, w, b = _case(torch.float32, seed=3, shape=(8, 6, 4192))  # rows of 4192 floats: 64-byte lines
    plain = _run(x, mask, dy, w, b, "identity", 0.0)
    monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)
    streamed = False
    for _ in range(4):  # (a fresh pool buffer may be unaligned: then it does not stream; try a few)
        out = _run(x, mask, dy, w, b, "identity", 0.0, clone=False)
        streamed = cpu._streams(out["dx"], "identity", 4192)
        if streamed:
            break
    assert streamed, "the streamed path did not run"
    for name, a in plain.items():
        assert torch.equal(out[name], a), name
