"""The native backend: torch's own fused batch-norm kernels (aten ``native_batch_norm`` family).

Where our numba kernels cannot run (CUDA, MPS, XPU, float16/bfloat16, strided views, tensor
subclasses) or would be slower (small inputs, where a call costs more than the arithmetic), a BN
op runs as *one* aten kernel forward and one backward — cuDNN/MIOpen on GPUs, torch's vectorised
CPU kernel here — instead of the ten-odd composite ops of :mod:`batchnorm.kernels.torch_backend`
(which stays the reference, selectable as ``"torch"``). The activation is a following in-place op
on the fresh output (forward) and one multiply by its derivative read from the output (backward).

Same signatures as every backend (see :mod:`batchnorm.kernels`). The statistics:

* the batch mean is ``native_batch_norm``'s ``save_mean`` (accumulation dtype);
* the biased batch variance comes from the *unbiased* one that ``native_batch_norm`` writes into a
  zero running-variance buffer with ``momentum=1`` (``r ← 0·r + 1·s``, exact), times ``(n−1)/n``:
  one rounding, where ``1/invstd² − ε`` would cancel catastrophically for ``var ≪ ε``;
* the backward takes ``invstd = 1/sqrt(var + ε)`` recomputed from that variance.

Channels on an axis other than 1 are moved there with ``movedim`` (a view: torch's kernels take the
strides as they come, channels-last included) and the results moved back.

Accuracy: torch's CPU kernel sums in float32 and normalises in the folded form
``x · (γ·invstd) + (β − mean·γ·invstd)``, whose float32 error grows with ``|mean|/std``
(measured on y: 7e-6 at 100, 2e-5 at 1e3, 6e-4 at 1e4, against ≤ 1e-5 for our numba kernels,
which accumulate in float64). So every op here checks the statistics: where
``max |mean|·invstd`` exceeds :data:`MAX_SHIFT` it is recomputed with the composite formulas in
float64 (float64 statistics returned), which costs more, but only for such data.
``tests/core/test_core_native.py`` holds the backend to the oracle per size class.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..stats import acc_dtype
from . import torch_backend
from .torch_backend import act_grad_from_output

name = "native"

_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

#: Above this ``max |mean| / sqrt(var + ε)`` torch's folded normalisation loses more than ~1e-5 (float32).
MAX_SHIFT = 64.0


_COND_CACHE: dict[int, tuple] = {}
_COND_CACHE_MAX = 512


def ill_conditioned(mean: torch.Tensor, var: torch.Tensor, eps: float) -> bool:
    """Whether torch's folded normalisation would be less accurate than ours for these statistics
    (``max |mean| / sqrt(var + ε)`` > :data:`MAX_SHIFT`).

    Asked on every native call with float32 data, so it is kept cheap: the answer is cached per
    (mean, var) pair of tensor objects and their version counters — running statistics in eval pay
    for it once, until they change — and computed with NumPy on the CPU (7 µs against 23 µs for the
    torch ops on 64 channels; it was 8 % of a ResNet-18 eval step's BN time). Weak references make
    sure a cache entry never answers for another tensor that reuses a freed one's ``id``."""
    key = id(mean)
    try:
        versions = (mean._version, var._version)
    except RuntimeError:  # inference tensors have no version counter: no caching
        return _ill_conditioned(mean, var, eps)
    hit = _COND_CACHE.get(key)
    if hit is not None and hit[0]() is mean and hit[1]() is var and hit[2] == versions and hit[3] == eps:
        return hit[4]
    answer = _ill_conditioned(mean, var, eps)
    if len(_COND_CACHE) >= _COND_CACHE_MAX:
        _COND_CACHE.clear()
    _COND_CACHE[key] = (weakref.ref(mean), weakref.ref(var), versions, eps, answer)
    return answer


def _ill_conditioned(mean: torch.Tensor, var: torch.Tensor, eps: float) -> bool:
    if (mean.device.type == "cpu" and var.device.type == "cpu" and mean.dtype in _NP_DTYPES
            and var.dtype in _NP_DTYPES):
        m = mean.detach().numpy()
        v = var.detach().numpy().astype(m.dtype, copy=False)
        with np.errstate(invalid="ignore", divide="ignore"):  # (as torch: var + ε ≤ 0 gives inf/NaN)
            r = (np.abs(m) / np.sqrt(v + eps)).max()
        return bool(r > MAX_SHIFT)  # (NaN: False, as with torch's max)
    with torch.no_grad():
        return bool((mean.abs() * torch.rsqrt(var.to(mean.dtype) + eps)).max() > MAX_SHIFT)


_NP_DTYPES = (torch.float32, torch.float64)


#: activations applied here in place after torch's kernel, with derivatives read from the output;
#: the smooth ones (silu, gelu, …) need z in the backward and run on the other backends
ACTIVATIONS = frozenset({"identity", "relu", "leaky_relu", "elu"})


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    """Any floating tensor on a device with torch's batch-norm kernels (every device torch ships), with
    an activation of :data:`ACTIVATIONS`."""
    return x.is_floating_point() and x.ndim >= 2 and act in ACTIVATIONS


def _to_c1(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t if axis == 1 else t.movedim(axis, 1)


def _from_c1(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t if axis == 1 else t.movedim(1, axis)


def _act_(y: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    """The activation in place on a fresh output (no autograd here: the backward is ours)."""
    if act == "relu":
        return y.relu_()
    if act == "leaky_relu":
        return torch._C._nn.leaky_relu_(y, slope)
    if act == "elu":
        return torch._C._nn.elu_(y, slope)
    return y


def _param(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    # torch's CPU kernel takes float32 parameters with reduced-precision input ("mixed type") or
    # parameters of the input's dtype; anything else is cast to the input's dtype.
    if t is None or t.dtype == x.dtype or (t.dtype == torch.float32 and x.dtype in _ACC):
        return t
    return t.to(x.dtype)


def _stats_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    if x.dtype in _ACC and (weight is None or weight.dtype != x.dtype):
        return torch.float32
    return x.dtype if weight is None else weight.dtype if weight.dtype == x.dtype else x.dtype


def _d(t):
    return None if t is None else t.to(torch.float64)


def _f64(fn, like, x, *args):
    """``fn`` (a composite formula) on float64 copies, the output rounded once to ``like``'s dtype."""
    return fn(_d(x), *(_d(a) if isinstance(a, torch.Tensor) else a for a in args)).to(like.dtype)


def _accurate_train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """The composite training forward in float64 (for |mean| ≫ std, where float32 sums lose the mean)."""
    y, mean, var = torch_backend.train_forward(_d(x), _d(weight), _d(bias), eps, channel_axis, act, slope)
    return y.to(x.dtype), mean, var  # (float64 statistics, as the numba kernels give: the backward needs
    # the mean to better than float32 precision here)


def train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """``(y, batch_mean, biased_batch_var)`` from one ``native_batch_norm`` call (+ the activation)."""
    xv = _to_c1(x, channel_axis)
    w, b = _param(weight, x), _param(bias, x)
    c = xv.shape[1]
    sd = _stats_dtype(x, w)
    rm = torch.zeros(c, dtype=sd, device=x.device)
    rv = torch.zeros(c, dtype=sd, device=x.device)
    y, mean, _ = torch.native_batch_norm(xv, w, b, rm, rv, True, 1.0, eps)
    n = xv.numel() // c
    var = rv.to(acc_dtype(x.dtype)) * ((n - 1) / n) if n > 1 else rv.to(acc_dtype(x.dtype)).zero_()
    mean = mean.to(acc_dtype(x.dtype))
    if x.dtype != torch.float64 and ill_conditioned(mean, var, eps):  # |mean| ≫ std: the float64 way
        return _accurate_train_forward(x, weight, bias, eps, channel_axis, act, slope)
    return _from_c1(_act_(y, act, slope), channel_axis), mean, var


def _backward(dy, x, y, weight, mean, var, eps, channel_axis, act, slope, train, need_w, need_b):
    dz = dy if act == "identity" else dy * act_grad_from_output(y, act, slope)
    xv, dzv = _to_c1(x, channel_axis), _to_c1(dz, channel_axis)
    w = _param(weight, x)
    sd = _stats_dtype(x, w)
    mask = [True, need_w, need_b]
    if train:  # invstd from the variance in float64 (C values), rounded once to the kernel's dtype
        invstd = torch.rsqrt(var.to(torch.float64) + eps).to(sd)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dzv, xv, w, None, None, mean.to(sd), invstd,
                                                               True, eps, mask)
    else:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dzv, xv, w, mean.to(sd), var.to(sd), None,
                                                               None, False, eps, mask)
    return _from_c1(dx, channel_axis), dw, db


def _accurate_grads(fn, dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    dx, dw, db = fn(_d(dy), _d(x), _d(y), _d(weight), _d(bias), _d(mean), _d(var), eps, channel_axis, act,
                    slope)
    return (dx.to(x.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Training backward: ``native_batch_norm_backward`` on ``dz = dy · act'(z)``."""
    if x.dtype != torch.float64 and ill_conditioned(mean, var, eps):
        return _accurate_grads(torch_backend.backward, dy, x, y, weight, bias, mean, var, eps, channel_axis,
                               act, slope)
    dx, dw, db = _backward(dy, x, y, weight, mean, var, eps, channel_axis, act, slope, True,
                           weight is not None, bias is not None)
    return (dx, None if weight is None else dw.to(weight.dtype),
            None if bias is None else db.to(bias.dtype))


def eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act(γ (x − mean)/sqrt(var + ε) + β)`` with given statistics, one native kernel."""
    if x.dtype != torch.float64 and ill_conditioned(mean, var, eps):
        return _f64(torch_backend.eval_forward, x, x, mean, var, weight, bias, eps, channel_axis, act, slope)
    xv = _to_c1(x, channel_axis)
    w, b = _param(weight, x), _param(bias, x)
    sd = _stats_dtype(x, w)
    y = torch.native_batch_norm(xv, w, b, mean.to(sd), var.to(sd), False, 0.0, eps)[0]
    return _from_c1(_act_(y, act, slope), channel_axis)


def eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Backward of :func:`eval_forward` w.r.t. x, γ, β (statistics constant)."""
    if x.dtype != torch.float64 and ill_conditioned(mean, var, eps):
        return _accurate_grads(torch_backend.eval_backward, dy, x, y, weight, bias, mean, var, eps,
                               channel_axis, act, slope)
    dx, dw, db = _backward(dy, x, y, weight, mean, var, eps, channel_axis, act, slope, False,
                           weight is not None, bias is not None)
    return (dx, None if weight is None else dw.to(weight.dtype),
            None if bias is None else db.to(bias.dtype))
