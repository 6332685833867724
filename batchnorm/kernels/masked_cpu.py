"""numba CPU kernels of masked BN (padded batches): the statistics and the backward, per channel.

The torch composite path (:mod:`batchnorm.kernels.masked`) costs ~12× plain BN on the benchmark
shape (``python -m batchnorm.bench.masked``: ``(64, 256, 400)`` float32, 30 % padding) because each
``torch.where`` and reduction is a pass over memory. These kernels do what the formulas need in as
few passes as plain BN's: per channel (channels split over threads, as the plain kernels are),

* statistics: one pass of shifted sums (float64 accumulators, shift = the channel's first valid
  value, a second centred pass where the shift was too far from the mean); padded values are
  selected away, never multiplied by 0, so they cannot poison a sum; the output (a per-channel
  affine map, then the activation) is written right after each channel's statistics;
* backward: one pass for ``g = Σ dz`` and ``h = Σ dz·x̂`` over every position, one writing
  ``dx = γ·invstd·(dz − m·(g + x̂·h)/n)``, with ``dz = dy·act'(y)`` read from the output.

Threads: as for the plain kernels (:mod:`batchnorm.kernels.cpu`), a call is **one OpenMP parallel
region on torch's own team** (:mod:`batchnorm.kernels._omp`; numba C callbacks, one per operation
and dtype, below); where there is no team (``BATCHNORM_OMP=0``, a forked child, non-OpenMP torch)
the same kernels run on the Python thread pool (``_cpu_team._parallel``). Both split the channels
the same way and never split a channel, so both give the same bits (for any thread count).
Measured on the 2-core machine, kernels alone, (64, 256, 400) float32, 2 threads, medians (ms):
forward 3.0 team / 4.4 pool, backward 3.5 team / 6.5 pool (the pool's threads meet torch's
spinning OpenMP workers; at 1 thread both are the same). Large outputs (y, dx; identity only) are
written with streaming stores, as the plain kernels do (backward 4.5 → 3.8 ms).

Fusion: the forward already takes statistics and output one channel at a time, so the output pass
re-reads the channel from cache; all statistics first and then all outputs measured 10–13 % slower
(forward kernel alone, 1 thread: 5.2–5.4 against 5.7–6.1 ms). A single pass is not possible (every
output needs its channel's statistics).

Layout: channels-first contiguous input viewed as ``(N, C, L)`` (``(N, C)`` is ``L = 1``, NCHW is
``L = H·W``), float32 or float64, the mask materialised as ``(N, L)`` uint8. Anything else runs the
torch path (same results up to rounding; the tests hold both to the float64 oracle).
"""

from __future__ import annotations

import numpy as np
import torch

from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

import array  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402

import numba as nb  # noqa: E402
from numba import carray  # noqa: E402

from . import _omp, _pool, _stream  # noqa: E402
from ._cpu_team import _at, _compile_callback, _parallel, _split  # noqa: E402
from .cpu import _streams  # noqa: E402

_FLAGS = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"contract"}}
_SUM_FLAGS = {**_FLAGS, "fastmath": {"reassoc", "contract"}}  # sums may re-associate (vectorise)
_ACT = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3}
_MIN_PER_THREAD = 1 << 15


_CHUNK = 4096  # values summed in the input dtype before the partial sum joins the float64 total


@nb.njit(**_SUM_FLAGS)
def _masked_run_sums(xr, mr, k, zero):
    """Σ (v − k) and Σ (v − k)² over the valid values of a contiguous run (≤ _CHUNK values), in the
    input dtype (a 1-D run indexed from 0: the loop vectorises)."""
    r1 = zero
    r2 = zero
    for j in range(xr.shape[0]):
        d = xr[j] - k
        d = d if mr[j] != 0 else zero
        r1 += d
        r2 += d * d
    return r1, r2


@nb.njit(**_SUM_FLAGS)
def _stats(x, m, n, first, mean, var, zero, c0, c1):
    """Per channel c in [c0, c1): mean and biased variance of x[:, c, :] where m (N, L) is nonzero.

    One pass of shifted sums ``Σ (v − k)`` and ``Σ (v − k)²`` with ``k`` the channel's first valid
    value (so ``|mean − k|`` is of the order of the spread), summed in the input dtype over runs of
    at most ``_CHUNK`` values (that vectorises) and in float64 across runs. Where the shift is still
    far from the mean (``(mean − k)² > 1e6 · var``: cancellation could cost digits) a second pass
    centred on the mean recomputes the variance in float64. ``n`` is the valid count (at least 1),
    ``first`` the flat (N, L) index of the first valid position (-1: none).
    """
    N, _, L = x.shape
    for c in range(c0, c1):
        k = zero if first < 0 else x[first // L, c, first % L]
        s1 = 0.0
        s2 = 0.0
        for i in range(N):
            for j0 in range(0, L, _CHUNK):
                r1, r2 = _masked_run_sums(x[i, c, j0:j0 + _CHUNK], m[i, j0:j0 + _CHUNK], k, zero)
                s1 += r1
                s2 += r2
        r = s1 / n
        mu = k + r
        v = max(s2 / n - r * r, 0.0)
        if r * r > 1e6 * v:
            s1 = 0.0
            s2 = 0.0
            for i in range(N):
                for j in range(L):
                    d = x[i, c, j] - mu if m[i, j] != 0 else 0.0
                    s1 += d
                    s2 += d * d
            r = s1 / n
            mu = mu + r
            v = max(s2 / n - r * r, 0.0)
        mean[c] = mu
        var[c] = v


@nb.njit(**_FLAGS)
def _dz(dyv, yv, act, slope, zero):
    if act == 0 or yv > zero:
        return dyv
    if act == 1:
        return zero
    if act == 2:
        return dyv * slope
    return dyv * (yv + slope)


@nb.njit(**_SUM_FLAGS)
def _run_grad_sums(dyr, yr, xr, k, act, slope, zero):
    """Σ dz and Σ dz·(x − k) over a contiguous run (every position), in the input dtype."""
    r1 = zero
    r2 = zero
    if act == 0:  # (a loop of its own: the activation's branch would keep it from vectorising)
        for j in range(dyr.shape[0]):
            dz = dyr[j]
            r1 += dz
            r2 += dz * (xr[j] - k)
    else:
        for j in range(dyr.shape[0]):
            dz = _dz(dyr[j], yr[j], act, slope, zero)
            r1 += dz
            r2 += dz * (xr[j] - k)
    return r1, r2


@nb.njit(**_SUM_FLAGS)
def _grad_sums(x, dy, y, k, act, slope, g, h, zero, c0, c1):
    """Per channel, over every position: ``g = Σ dz`` and ``Σ dz·(x − k)`` (``k`` the mean rounded to
    the input dtype, so ``x − k`` is exact near the mean), summed in the input dtype over runs of at
    most ``_CHUNK`` values and in float64 across runs."""
    N, _, L = x.shape
    for c in range(c0, c1):
        kc = k[c]
        sg = 0.0
        sh = 0.0
        for i in range(N):
            for j0 in range(0, L, _CHUNK):
                r1, r2 = _run_grad_sums(dy[i, c, j0:j0 + _CHUNK], y[i, c, j0:j0 + _CHUNK],
                                        x[i, c, j0:j0 + _CHUNK], kc, act, slope, zero)
                sg += r1
                sh += r2
        g[c] = sg
        h[c] = sh


@nb.njit(**_FLAGS)
def _act(z, act, slope, zero):
    if act == 0 or z > zero:
        return z
    if act == 1:
        return zero
    if act == 2:
        return z * slope
    return slope * np.expm1(z)


@nb.njit(**_FLAGS)
def _forward(x, m, n, first, y, w, b, eps, act, slope, mean, var, tmp, zero, nt, c0, c1):
    """Statistics (:func:`_stats`) and output of channels [c0, c1), one channel at a time: the
    output pass reads the channel again while it is still in cache (one channel of the benchmark
    shape is 100 KB), so memory sees about one read of x and one write of y, as for plain BN."""
    for c in range(c0, c1):
        _stats(x, m, n, first, mean, var, zero, c, c + 1)
        invstd = 1.0 / np.sqrt(var[c] + eps)
        tmp[0] = mean[c]
        tmp[1] = mean[c] - tmp[0]
        tmp[2] = invstd * w[c]
        tmp[3] = b[c]
        k, lo, sc, bc = tmp[0], tmp[1], tmp[2], tmp[3]
        N, _, L = x.shape
        # (loops over 1-D rows indexed from 0 vectorise; 3-D indexing in the loop did not, measured)
        if act == 0 and nt:  # streaming stores: no read-for-ownership of y's lines
            for i in range(N):
                xr, yr = x[i, c], y[i, c]
                for j in range(L):
                    _stream.store(yr, j, ((xr[j] - k) - lo) * sc + bc)
        elif act == 0:  # (a loop of its own: the activation's branch would keep it from vectorising)
            for i in range(N):
                xr, yr = x[i, c], y[i, c]
                for j in range(L):
                    yr[j] = ((xr[j] - k) - lo) * sc + bc
        else:
            for i in range(N):
                xr, yr = x[i, c], y[i, c]
                for j in range(L):
                    yr[j] = _act(((xr[j] - k) - lo) * sc + bc, act, slope, zero)
    if nt:
        _stream.fence()


@nb.njit(**_FLAGS)
def _backward(x, dy, y, m, k, lo, invstd, scale, n, act, slope, g, h, dx, tmp, zero, nt, c0, c1):
    """Backward of channels [c0, c1), one channel at a time (its sums, then its dx while the channel
    is still in cache): ``g``, ``h`` (float64) and ``dx``. ``nt``: stream dx (identity only; every
    run dx[i, c] must start on a 64-byte line)."""
    for c in range(c0, c1):
        _grad_sums(x, dy, y, k, act, slope, g, h, zero, c, c + 1)
        hc = (h[c] - lo[c] * g[c]) * invstd[c]  # Σ dz·x̂ = (Σ dz·(x − k) − (μ − k)·Σ dz)·invstd
        h[c] = hc
        tmp[0] = k[c]
        tmp[1] = lo[c]
        tmp[2] = invstd[c]
        tmp[3] = scale[c]
        tmp[4] = g[c] / n
        tmp[5] = hc / n
        kc, loc, iv, sc, gn, hn = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4], tmp[5]
        N, _, L = x.shape
        if act == 0 and nt:  # streaming stores: no read-for-ownership of dx's lines
            for i in range(N):
                xr, dyr, mr, dxr = x[i, c], dy[i, c], m[i], dx[i, c]
                for j in range(L):
                    dz = dyr[j]
                    xh = ((xr[j] - kc) - loc) * iv
                    v = dz - (gn + xh * hn)
                    _stream.store(dxr, j, sc * (v if mr[j] != 0 else dz))
        elif act == 0:
            for i in range(N):
                xr, dyr, mr, dxr = x[i, c], dy[i, c], m[i], dx[i, c]
                for j in range(L):
                    dz = dyr[j]
                    xh = ((xr[j] - kc) - loc) * iv
                    v = dz - (gn + xh * hn)
                    dxr[j] = sc * (v if mr[j] != 0 else dz)
        else:
            for i in range(N):
                xr, dyr, yr, mr, dxr = x[i, c], dy[i, c], y[i, c], m[i], dx[i, c]
                for j in range(L):
                    dz = _dz(dyr[j], yr[j], act, slope, zero)
                    xh = ((xr[j] - kc) - loc) * iv
                    v = dz - (gn + xh * hn)
                    dxr[j] = sc * (v if mr[j] != 0 else dz)
    if nt:
        _stream.fence()


# =============================================================================================
# Team tasks (see batchnorm.kernels._cpu_team): each operation is one OpenMP parallel region on
# torch's own team; member t of nt takes channels [t·C/nt, (t+1)·C/nt), the split of the thread
# pool path (_split), and runs the very kernels above on them. A channel is never split and each
# channel's work is the same sequential code either way, so the two runners give the same bits.
# The argument block is int64: sizes, addresses, and float64 values as their bits.
# =============================================================================================
_MBLOCK = 26
(_M_N, _M_C, _M_L, _M_X, _M_M, _M_Y, _M_DY, _M_DX, _M_W, _M_B, _M_MEAN, _M_VAR, _M_K, _M_LO, _M_INV,
 _M_SCALE, _M_G, _M_H, _M_TMP, _M_EPS, _M_ACT, _M_SLOPE, _M_COUNT, _M_FIRST, _M_NT, _M_THR) = range(_MBLOCK)
# _M_EPS, _M_SLOPE, _M_COUNT: float64 bits; _M_TMP: a (_M_THR, 8) scratch table in x's dtype, one row
# per member (the kernels' ``tmp``: the per-channel constants rounded to x's dtype)


@nb.njit(**_FLAGS)
def _team_masked_forward_body(blk, dt):
    N, C, L = blk[_M_N], blk[_M_C], blk[_M_L]
    t, nt = _omp.thread_num(), _omp.num_threads()
    c0, c1 = t * C // nt, (t + 1) * C // nt
    f64 = np.float64
    fv = blk.view(f64)
    tmp = _at(blk[_M_TMP], (blk[_M_THR], 8), dt)
    _forward(_at(blk[_M_X], (N, C, L), dt), _at(blk[_M_M], (N, L), np.uint8), fv[_M_COUNT], blk[_M_FIRST],
             _at(blk[_M_Y], (N, C, L), dt), _at(blk[_M_W], C, f64), _at(blk[_M_B], C, f64), fv[_M_EPS],
             blk[_M_ACT], dt(fv[_M_SLOPE]), _at(blk[_M_MEAN], C, f64), _at(blk[_M_VAR], C, f64), tmp[t],
             dt(0), blk[_M_NT] != 0, c0, c1)


@nb.njit(**_FLAGS)
def _team_masked_backward_body(blk, dt):
    N, C, L = blk[_M_N], blk[_M_C], blk[_M_L]
    t, nt = _omp.thread_num(), _omp.num_threads()
    c0, c1 = t * C // nt, (t + 1) * C // nt
    f64 = np.float64
    fv = blk.view(f64)
    sh = (N, C, L)
    tmp = _at(blk[_M_TMP], (blk[_M_THR], 8), dt)
    _backward(_at(blk[_M_X], sh, dt), _at(blk[_M_DY], sh, dt), _at(blk[_M_Y], sh, dt),
              _at(blk[_M_M], (N, L), np.uint8), _at(blk[_M_K], C, dt), _at(blk[_M_LO], C, f64),
              _at(blk[_M_INV], C, f64), _at(blk[_M_SCALE], C, f64), fv[_M_COUNT], blk[_M_ACT],
              dt(fv[_M_SLOPE]), _at(blk[_M_G], C, f64), _at(blk[_M_H], C, f64), _at(blk[_M_DX], sh, dt),
              tmp[t], dt(0), blk[_M_NT] != 0, c0, c1)


# The callbacks ``void fn(int64 *block)`` (module-level functions: numba's cache keys on them).
def _team_masked_forward_f32(data):
    _team_masked_forward_body(carray(data, _MBLOCK), np.float32)


def _team_masked_forward_f64(data):
    _team_masked_forward_body(carray(data, _MBLOCK), np.float64)


def _team_masked_backward_f32(data):
    _team_masked_backward_body(carray(data, _MBLOCK), np.float32)


def _team_masked_backward_f64(data):
    _team_masked_backward_body(carray(data, _MBLOCK), np.float64)


_TEAM_FNS = {(fn.__name__[13:-4], fn.__name__[-3:]): fn for fn in (
    _team_masked_forward_f32, _team_masked_forward_f64, _team_masked_backward_f32, _team_masked_backward_f64)}
_team_cfuncs: dict[tuple[str, str], int] = {}
_team_lock = threading.Lock()


def _team_address(op: str, dtype: str) -> int:
    """The compiled callback of ``op`` ("forward" | "backward") for ``dtype`` ("f32" | "f64")."""
    key = (op, dtype)
    addr = _team_cfuncs.get(key)
    if addr is None:
        with _team_lock:
            if key not in _team_cfuncs:
                _team_cfuncs[key] = _compile_callback(_TEAM_FNS[key])
            addr = _team_cfuncs[key]
    return addr


def _bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _launch(op: str, x: np.ndarray, nt: int, slots: dict[int, int], threads: int) -> None:
    """One team task: ``op`` on ``threads`` members; ``slots``: block entry → value (addresses, bits)."""
    vals = [0] * _MBLOCK
    vals[_M_N], vals[_M_C], vals[_M_L] = x.shape
    vals[_M_THR] = nt
    for k, v in slots.items():
        vals[k] = v
    blk = array.array("q", vals)
    dtype = "f64" if x.dtype == np.float64 else "f32"
    _omp.run(_team_address(op, dtype), blk.buffer_info()[0], threads)


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def supports(x: torch.Tensor, channel_axis: int) -> bool:
    """Channels-first contiguous float32/float64 CPU tensors (plain, not a subclass). (Whether the
    kernels are compiled yet is the caller's question: :func:`batchnorm.core.autograd._masked_impl`
    asks :mod:`batchnorm.kernels._warmup`, kind ``"masked"``.)"""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and channel_axis == 1 and x.is_contiguous() and x.numel() > 0)


def _ncl(t: torch.Tensor):
    return t.detach().reshape(t.shape[0], t.shape[1], -1).numpy()


def _mask_nl(mask: torch.Tensor, x: torch.Tensor):
    full = (x.shape[0], *x.shape[2:])
    return mask.expand(full).contiguous().view(torch.uint8).reshape(x.shape[0], -1).numpy()


def _parts(x: torch.Tensor) -> list[tuple[int, int]]:
    c = x.shape[1]
    nt = max(1, min(torch.get_num_threads(), c, x.numel() // _MIN_PER_THREAD))
    return _split(c, nt)


def masked_forward(x, mask, weight, bias, eps, channel_axis, act, slope):
    """``(y, mean, biased_var, count)`` of masked training BN (statistics returned in the input dtype,
    the accumulation dtype here, as :func:`batchnorm.kernels.masked.masked_stats` does)."""
    c = x.shape[1]
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.detach().double()
    b = torch.zeros(c, dtype=torch.float64) if bias is None else bias.detach().double()
    y = _pool.empty_like(x)  # recycled pages: fresh 4 KiB page faults cost as much as the kernel
    xn, mn, yn = _ncl(x), _mask_nl(mask, x), _ncl(y)
    mv, vv, wv, bv = mean.numpy(), var.numpy(), w.numpy(), b.numpy()
    zero, sl, code = xn.dtype.type(0), xn.dtype.type(slope), _ACT[act]
    valid = np.flatnonzero(mn)
    n, first = max(valid.size, 1), int(valid[0]) if valid.size else -1
    parts = _parts(x)
    nt = act == "identity" and _streams(y, act, xn.shape[2])
    if _omp.runtime():  # one region on torch's OpenMP team
        tmp = np.zeros((len(parts), 8), xn.dtype)
        _launch("forward", xn, len(parts), {
            _M_X: _addr(xn), _M_M: _addr(mn), _M_Y: _addr(yn), _M_W: _addr(wv), _M_B: _addr(bv),
            _M_MEAN: _addr(mv), _M_VAR: _addr(vv), _M_TMP: _addr(tmp), _M_EPS: _bits(eps), _M_ACT: code,
            _M_SLOPE: _bits(slope), _M_COUNT: _bits(n), _M_FIRST: first, _M_NT: int(nt)}, len(parts))
    else:  # the Python thread pool (no OpenMP team to share): the same kernels, the same split
        tmps = [np.zeros(4, xn.dtype) for _ in parts]
        _parallel(lambda c0, c1, t: _forward(xn, mn, n, first, yn, wv, bv, float(eps), code, sl, mv, vv, t,
                                             zero, nt, c0, c1),
                  [(c0, c1, t) for (c0, c1), t in zip(parts, tmps)])
    count = torch.tensor(float(valid.size), dtype=x.dtype)
    return y, mean.to(x.dtype), var.to(x.dtype), count


def masked_backward(dy, x, y, mask, count, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Same contract as :func:`batchnorm.kernels.masked.masked_backward` (``y`` must be the output
    for a non-identity activation; it is not read for identity)."""
    c = x.shape[1]
    mean64 = mean.double()
    invstd = torch.rsqrt(var.double() + eps)
    scale = invstd if weight is None else invstd * weight.detach().double()
    k = mean64.to(x.dtype)
    lo = mean64 - k.double()
    g = torch.empty(c, dtype=torch.float64)
    h = torch.empty(c, dtype=torch.float64)
    xn, dyn = _ncl(x), _ncl(dy.contiguous())
    yn = dyn if y is None else _ncl(y.contiguous())
    mn = _mask_nl(mask, x)
    dx = _pool.empty_like(x)
    dxn = _ncl(dx)
    code = _ACT[act]
    zero, sl = xn.dtype.type(0), xn.dtype.type(slope)
    kn, lon, ivn, scn, gv, hv = k.numpy(), lo.numpy(), invstd.numpy(), scale.numpy(), g.numpy(), h.numpy()
    n = float(count)
    parts = _parts(x)
    nt = act == "identity" and _streams(dx, act, xn.shape[2])
    if _omp.runtime():  # one region on torch's OpenMP team
        tmp = np.zeros((len(parts), 8), xn.dtype)
        _launch("backward", xn, len(parts), {
            _M_X: _addr(xn), _M_DY: _addr(dyn), _M_Y: _addr(yn), _M_M: _addr(mn), _M_K: _addr(kn),
            _M_LO: _addr(lon), _M_INV: _addr(ivn), _M_SCALE: _addr(scn), _M_G: _addr(gv), _M_H: _addr(hv),
            _M_DX: _addr(dxn), _M_TMP: _addr(tmp), _M_ACT: code, _M_SLOPE: _bits(slope),
            _M_COUNT: _bits(n), _M_NT: int(nt)}, len(parts))
    else:  # the Python thread pool
        tmps = [np.zeros(6, xn.dtype) for _ in parts]
        _parallel(lambda c0, c1, t: _backward(xn, dyn, yn, mn, kn, lon, ivn, scn, n, code, sl, gv, hv, dxn, t,
                                              zero, nt, c0, c1),
                  [(c0, c1, t) for (c0, c1), t in zip(parts, tmps)])
    dweight = None if weight is None else h.to(weight.dtype)
    dbias = None if bias is None else g.to(bias.dtype)
    return dx, dweight, dbias
