"""The ``"numba"`` backend: fused CPU kernels for float32/float64 BN (+ activation), train and eval.

Same functions and signatures as :mod:`batchnorm.kernels.torch_backend` (the reference each kernel
must match; read them side by side)::

    train_forward  y = act(γ (x − μ_B) / sqrt(σ²_B + ε) + β),  returns (y, μ_B, σ²_B)
    backward       dz = dy · act'(z);  g = Σ dz,  h = Σ dz · x̂  (per channel)
                   dx = γ · invstd · (dz − g/n − x̂ · h/n),  dγ = h,  dβ = g
    eval_forward   y = act(γ (x − mean) / sqrt(var + ε) + β)   (given statistics)
    eval_backward  dx = γ · invstd · dz,  dγ = Σ dz · x̂,  dβ = Σ dz

Memory layouts (anything else — CUDA, float16/bfloat16, non-contiguous inputs, tensor
subclasses — is left to the torch backend by :func:`supports`):

* ``(N, C, L)``: a contiguous tensor with channels on any axis, viewed as ``(before, C, after)``
  (NCHW, NCDHW, (N, C, L), …). A thread owns a range of channels and takes them in blocks of
  about 2 MiB of data (one channel if a channel is larger); for each i it walks the block's
  channels ``x[i, cb:ce, :]`` as one contiguous stretch, so the statistics sweep and the normalise
  sweep of a block follow each other while the block is still in cache (2 MiB L2 per core here)
  and short runs (L = 784 for 28×28) do not restart the hardware prefetcher at every run.
* ``(M, C)``: channels innermost — (N, C) input, channels-last memory (NHWC/NDHWC with
  ``channel_axis=1``) or a logically channels-last tensor (``channel_axis=-1``). Threads own
  blocks of rows and keep per-channel vectors of partial sums, added up afterwards. The sums take
  ``R = max(1, 1024 // C)`` rows at a time as one stretch of ``R·C`` lanes (lane ``j·C + c`` is
  channel c), four stretches per update of the lane accumulators: with C = 64 a row is only 256
  bytes, and row-by-row loops ran at 60 % of a read-only pass (128×64×56×56 channels-last train
  forward 15.4 → 11.1 ms, backward 23.2 → 19.3 ms, kernels alone on 2 threads).

Passes over memory: train forward reads x once for the statistics and once more to write y (the
second read comes from cache in the ``(N, C, L)`` layout); the backward reads x and dy once for
g and h and once more to write dx; eval reads x and writes y. The backward needs only x, dy and
the per-channel mean and variance: relu/leaky_relu masks are recomputed from
``z = (x − mean)·γ·invstd + β`` (cheaper than reading y; the dx pass uses the very instructions of
the forward, so it sees the forward's mask bit for bit); ELU reads ``y`` for ``act'(z) = y + α``.
Outputs (y, dx) of at least :data:`STREAM_MIN_BYTES` (8 MiB) are written with **streaming stores**
(:mod:`batchnorm.kernels._stream`), which skip the read-for-ownership a plain store makes of each
line: 128×64×56×56 NCHW fwd+bwd 32.1 → 28.0 ms, eval 8.8 → 7.3 ms (2 threads, ``batchnorm bench``),
and still 1.1–1.5× faster when the next op reads the output (``batchnorm bench --stream``). The
rows must start on 64-byte lines (NCHW runs of L values with 16 | L for float32, 8 | L for float64;
channels-last rows of C channels likewise) and ELU keeps plain stores; elsewhere plain stores run.

Numerics, where they happen:

* Statistics in one sweep with a **shift**: with ``k`` = the channel's first value,
  ``S₁ = Σ (x − k)``, ``S₂ = Σ (x − k)²``, ``mean = k + S₁/n``, ``var = S₂/n − (S₁/n)²``. Because
  ``k`` is one of the data, ``|mean − k|`` is a few standard deviations and the subtraction does
  not cancel even when ``|mean| ≫ std`` (float32 data of mean 1e4 and std 1 keeps float32
  accuracy). If the shift happens to be far out (``(mean − k)² > 10⁶·var``, e.g. an outlier
  first value) the variance is recomputed two-pass, ``Σ (x − mean)² / n``, which is exact.
* The sums run in the input dtype over short stretches (runs of ≤ 4096 values, or blocks of 16
  rows) and every stretch's total is added in **float64**: float32 rounding stays that of a
  4096-term sum however large the batch. The variance is clamped at 0; NaN/Inf propagate (no
  ``nnan``/``ninf`` fast-math flags), so the ``nonfinite`` policies of the modules see them.
* Elementwise work is done in the input dtype (float32 SIMD lanes are twice as many as float64):
  ``z = ((x − hi) − lo)·(γ·invstd) + β`` where ``hi`` is the float64 mean rounded to the input
  dtype and ``lo = mean − hi``. ``x − hi`` is exact near the mean (Sterbenz), so the split mean
  keeps float32 outputs exact to rounding when ``|mean| ≫ std``. These loops are compiled with
  ``fastmath={"contract"}`` only (fused multiply-add, never re-association, which could merge
  ``hi`` and ``lo``); the sums use ``{"reassoc", "contract"}`` so that they vectorise, and take
  ``Σ dz·(x − hi)`` with ``lo·Σ dz`` subtracted afterwards in float64.
* The batch mean and variance are returned as **float64** tensors (the torch backend returns the
  accumulation dtype): the backward needs the mean to better than float32 precision when
  ``|mean| ≫ std``; running statistics are cast to their buffer dtype by the caller.

Activations: identity, relu and leaky_relu are one code path (``z`` if ``z > 0`` else
``neg·z`` with neg = 1, 0, slope), ELU a run-time code, and the smooth activations (SiLU,
Hardswish, GELU erf and tanh, Sigmoid, Tanh) further run-time codes evaluated in float64 from
``z`` by ``_cpu_common._smooth`` / ``_smooth_grad`` (their backward recomputes ``act'(z)`` from x,
never reads y, and keeps plain stores); activation, slope and α are run-time values, so each kernel
compiles once per dtype (float32, float64) and no more.

Residual: :func:`train_forward_residual` / :func:`eval_forward_residual` compute
``act(BN(x) + res)`` (identity, relu, leaky_relu) in the forward's own sweeps: the normalise sweep
reads the residual beside x (plain stores). Their backward is :mod:`batchnorm.core.residual`'s
(the activation's backward gives d(residual), then the BN backward of it).

First use: in a fresh cache :func:`supports` answers False while a background process compiles the
layout's kernels (:mod:`batchnorm.kernels._warmup`); torch's native kernel serves meanwhile.

Threads: the kernels are plain sequential numba functions over a range of channels or rows. A call
runs as **one OpenMP parallel region on torch's own thread team** (:mod:`batchnorm.kernels._omp`):
a numba ``cfunc`` per operation and dtype takes its share by ``omp_get_thread_num`` and, in the
``(M, C)`` layout, meets the team at a barrier between the statistics and the normalise sweep. On
a private thread pool the same kernels lost half their speed to torch's idle OpenMP workers, which
spin for milliseconds after every torch op (32×256×28×28 eval: 1.3 ms alone, 2.2–4.6 ms after a
torch op; on the team 0.95 ms either way, the speed of a torch copy). Where torch has no OpenMP
team to share (macOS/Windows builds, a forked child, ``BATCHNORM_OMP=0``) the same kernels run on
a small Python thread pool (``nogil``) with the same split. ``torch.get_num_threads()`` threads,
one for inputs under 64 Ki values; a channel is never split, so ``(N, C, L)`` results do not depend
on the thread count.

Allocation, measured for a 128×64×56×56 float32 output (103 MB) on 2 cores (medians, ms). Quiet
machine (``taskset -c 0,1``, same CPU family); "tuned" = ``mallopt(M_MMAP_MAX=0,
M_TRIM_THRESHOLD=1 GiB)`` before any allocation:

                                        glibc default   tuned
    copy_ into a preallocated tensor          8.6         9.5
    x.clone() (fresh pages)                  33.8         9.6
    native relu(batch_norm) fwd+bwd         172.8        80.8

and on the shared 2-core machine (``batchnorm bench --alloc``; contended, compare within the list):

    copy_ into a preallocated tensor             23.9
    torch.empty_like + copy_ (fresh pages)       54.2
    our pool's empty_like + copy_                24.0
    our train fwd+relu, torch.empty_like outputs 63.1
    our train fwd+relu, pool outputs (default)   25.0
    our train fwd+relu into one reused buffer    24.7

A tensor above glibc's mmap threshold (≤ 32 MiB) is a fresh ``mmap``: every 4 KiB page faults and
is zero-filled on first write. Choice: outputs (y, dx) come from :mod:`batchnorm.kernels._pool`,
which hands a buffer out again only when nothing else references it (autograd-safe by
construction), so a training loop writes into warm pages; it is as fast as a preallocated buffer.
Rejected: the glibc tuning also removes the faults (and halves native BN's time) but changes the
allocator of the whole process — freed memory is never returned to the OS — which a library must
not do behind a user's back (and ``mallopt`` is glibc-only; ``batchnorm bench --alloc`` shows its
effect); writing outputs in place of a temporary is unsafe while the caller still holds it.
Saved tensors: the training op saves x, γ, β, the per-channel mean and variance (C values each)
and y only for ELU — nothing of the input's size is allocated for the backward.

Compilation: lazily at first use, ``cache=True``, cache folder from
:mod:`batchnorm.kernels._numba_setup`. Importing :mod:`batchnorm` imports neither this module nor
numba. One callback per operation × layout × dtype is compiled, only when used. First use of one
layout and dtype (forward + backward), measured on the 2-core machine: cold (fresh cache) 5.9–6.5 s
for NCHW float32, 8.7–10.0 s for channels-last float32 (the same code on different days; 7.5 s more
when a model uses both); cached 0.28 s — 0.2 s of it importing numba. A cache hit is loaded
without numba's full target refresh (:func:`_load_cached_callback`), which would import all of
numba's NumPy support and, through it, SciPy's BLAS (0.6 s before); later calls pay nothing.

Code layout: :mod:`._cpu_common` (flags, constants, shared helpers), :mod:`._cpu_ncl` and
:mod:`._cpu_mc` (one memory layout each, beside its reference formula), :mod:`._cpu_team` (the
OpenMP team runner and the thread-pool fallback), and this module: the torch ↔ kernel glue
(layout plans, allocation, scratch, dispatch).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _pool
from ._numba_setup import configure

configure()  # the cache folder must be known before numba is imported

from . import _omp, _warmup  # noqa: E402
from ._cpu_common import _CODES, _KIND  # noqa: E402
from ._cpu_mc import _apply_mc, _constants_mc, _dx_mc, _grad_coefs_mc, _grad_sums_mc, _stats_mc, _sums_mc  # noqa: E402
from ._cpu_ncl import _backward_ncl, _forward_ncl  # noqa: E402
from ._cpu_team import _block, _parallel, _split, _team_address, _threads  # noqa: E402

__all__ = ["backward", "backward_residual", "eval_backward", "eval_forward", "eval_forward_residual", "name",
           "supports", "supports_backward_residual", "supports_residual", "train_forward",
           "train_forward_residual"]

name = "numba"


# =============================================================================================
# torch <-> kernel glue
# =============================================================================================
_CL = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def _plan(x: torch.Tensor, axis: int) -> tuple[str, tuple[int, ...] | None, tuple[int, ...]] | None:
    """How x's memory maps onto a kernel: ("ncl" | "mc", permutation to memory order, kernel shape)."""
    c = x.shape[axis]
    if x.is_contiguous():
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis + 1:])
        if inner == 1:
            return "mc", None, (outer, c)
        return "ncl", None, (outer, c, inner)
    if axis == 1 and x.ndim in _CL and x.is_contiguous(memory_format=_CL[x.ndim][0]):
        return "mc", _CL[x.ndim][1], (x.numel() // c, c)
    return None


def _np(t: torch.Tensor, plan) -> np.ndarray:
    """A numpy view (no copy) of ``t`` in the kernel's shape; raises if t does not follow the plan."""
    _, perm, shape = plan
    t = t.detach()
    if perm is not None:
        t = t.permute(perm)
    return t.view(shape).numpy()


def _like(src: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``src`` in x's dtype and (dense) memory layout (a copy only if it is not already).

    Gradients often arrive expanded (``y.sum().backward()`` gives a zero-stride dy): such a view
    is not dense, is copied, and so never costs a separate compilation for strided arrays.
    """
    src = src.detach()
    if src.dtype == x.dtype and src.shape == x.shape and src.stride() == x.stride():
        return src
    return _empty_like(x).copy_(src)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return _pool.empty_like(x)


def _vec(t: torch.Tensor | None, c: int, fill: float) -> torch.Tensor:
    """γ, β or statistics as a contiguous float64 (C,) tensor (no copy if already one; never written)."""
    if t is None:
        return torch.full((c,), fill, dtype=torch.float64)
    t = t.detach()
    if t.dim() != 1:
        t = t.reshape(c)
    if t.dtype != torch.float64:
        t = t.double()  # (2 µs against 4.4 µs for reshape + to + contiguous: six calls a training step)
    return t if t.is_contiguous() else t.contiguous()


_SV_CACHE: dict[tuple, torch.Tensor] = {}


def _sv(dtype, act: str, slope: float) -> torch.Tensor:
    """The kernels' scalar vector [0, 1, neg, α] in the input dtype (read-only; a few per model)."""
    key = (dtype, act, float(slope))
    sv = _SV_CACHE.get(key)
    if sv is None:
        neg = {"identity": 1.0, "relu": 0.0, "leaky_relu": slope}.get(act, 0.0)  # (others: not read)
        sv = _SV_CACHE.setdefault(key, torch.tensor([0.0, 1.0, neg, slope], dtype=dtype))
    return sv


@functools.lru_cache(maxsize=256)
def _scratch_layout(dtype, c: int, parts: int) -> tuple[int, dict[str, tuple[int, tuple[int, ...], type]]]:
    """Size in bytes of :func:`_scratch`'s buffer and where each table lies in it: name → (byte
    offset, shape, numpy dtype). The float64 tables first (8-byte aligned), ``cst`` last."""
    f64, n64 = np.float64, c * (1 + 2 * parts) if parts else 0
    dt = f64 if dtype == torch.float64 else np.float32
    tables = {"cst": (8 * n64, (6, c), dt)}
    if parts:
        tables.update(inv=(0, (c,), f64), p1=(8 * c, (parts, c), f64),
                      p2=(8 * c * (1 + parts), (parts, c), f64))
    return 8 * n64 + 6 * c * np.dtype(dt).itemsize, tables


def _scratch(dtype, c: int, parts: int) -> tuple[torch.Tensor, dict[str, int]]:
    """A call's scratch in one allocation (each torch allocation costs ~1 µs: a small layer's step
    made nine): the constant table ``cst`` (6, C) in the input dtype and, for the (M, C) kernels
    (``parts`` > 0), ``inv`` (C,) and the partial-sum tables ``p1``, ``p2`` (parts, C) in float64,
    which the kernels overwrite before they read them. Returns the buffer (keep it referenced until
    the task returns) and each table's address."""
    nbytes, tables = _scratch_layout(dtype, c, parts)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    base = ws.data_ptr()
    return ws, {name: base + off for name, (off, _, _) in tables.items()}


def _scratch_np(ws: torch.Tensor, dtype, c: int, parts: int) -> dict[str, np.ndarray]:
    """The tables of :func:`_scratch` as numpy views (for the Python thread pool)."""
    raw = ws.numpy()
    return {name: raw[off:off + math.prod(shape) * np.dtype(dt).itemsize].view(dt).reshape(shape)
            for name, (off, shape, dt) in _scratch_layout(dtype, c, parts)[1].items()}


def _env_bytes(name: str, default: int) -> int:
    value = _pool.env_amount(name, int, "a whole number of bytes", f"unset it or give e.g. {default}")
    return default if value is None else value


STREAM_MIN_BYTES = _env_bytes("BATCHNORM_STREAM_MIN_BYTES", 8 << 20)
"""Outputs (y, dx) of at least this many bytes are written with streaming stores (see
:mod:`batchnorm.kernels._stream`: they skip the read-for-ownership of each line but leave the
output out of cache for the next op; a loss below ~8 MB on the 2-core machine, a gain above). From
the environment variable ``BATCHNORM_STREAM_MIN_BYTES`` at import; assign to change it later (a
very large value turns streaming off). Results are the same to the last bit either way."""


def _streams(out: torch.Tensor, act: str, inner: int) -> bool:
    """Whether the kernels stream ``out``: large enough, a piecewise-linear activation (ELU's and the
    smooth activations' loops keep plain stores), and every run of ``inner`` values starts on a 64-byte
    line."""
    nbytes = out.numel() * out.element_size()
    return (nbytes >= STREAM_MIN_BYTES and _KIND[act] == 0 and out.data_ptr() % 64 == 0
            and inner * out.element_size() % 64 == 0)


def supports(x: torch.Tensor, channel_axis: int, act: str) -> bool:
    """float32/float64 CPU tensors, contiguous or channels-last, plain torch.Tensor (not a subclass) —
    once their layout's kernels are compiled: until then (first use in a fresh cache) False, while a
    background process compiles them (:mod:`batchnorm.kernels._warmup`), unless numba is forced."""
    if not (type(x) in (torch.Tensor, torch.nn.Parameter)
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.layout == torch.strided
            and x.numel() > 0
            and act in _CODES):
        return False
    plan = _plan(x, channel_axis % x.ndim)
    if plan is None:
        return False
    return _warmup.ready(plan[0], "f64" if x.dtype == torch.float64 else "f32") or _forced()


def _forced() -> bool:
    """Whether the numba backend is forced (it then compiles in-process rather than refuse the input)."""
    from . import get_backend

    return get_backend() == name


def _launch(op: str, arrays: dict[str, torch.Tensor | int], sizes: tuple[int, ...],
            flags: tuple[bool, bool, int, bool],
            eps: float, threads: int) -> None:
    """One team task: ``op`` over ``arrays`` (all dense, in x's memory order) on ``threads`` threads."""
    blk = _block(arrays, sizes, flags, eps)
    dtype = "f64" if arrays["x"].dtype == torch.float64 else "f32"
    _omp.run(_team_address(op, dtype), blk.buffer_info()[0], threads)


def _forward(x, mean, var, weight, bias, eps, axis, act, slope, train, res=None):
    """y = act(BN(x) [+ res]); writes the batch statistics into the float64 ``mean``/``var`` when
    ``train``. ``res``: a residual in x's dtype and memory layout (piecewise-linear activations)."""
    plan = _plan(x, axis)
    kind, _, shape = plan
    c = x.shape[axis]
    y = _empty_like(x)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    sv, ac = _sv(x.dtype, act, slope), _KIND[act]
    eps = float(eps)
    nt = _threads(x.numel(), c if kind == "ncl" else shape[0])
    stream = res is None and _streams(y, act, shape[-1])  # (the residual loop keeps plain stores)
    # cst; for (M, C) also inv and the partial sums, one row per thread (eval: never read)
    ws, scratch = _scratch(x.dtype, c, nt if kind == "mc" else 0)
    if _omp.runtime():
        arrays = {"x": x, "y": y, "mean": mean, "var": var, "w": w, "b": b, "sv": sv, **scratch}
        if res is not None:
            arrays["res"] = res
        sizes = shape if kind == "ncl" else (*shape, nt)
        _launch("forward_" + kind, arrays, sizes, (train, False, ac, stream), eps, nt)
        return y
    # the Python thread pool (no OpenMP team to share): the same kernels on numpy views
    xa, ya = _np(x, plan), _np(y, plan)
    ra, hasres = (xa, False) if res is None else (_np(res, plan), True)
    m, v, w, b, sv = (t.numpy() for t in (mean, var, w, b, sv))
    tables = _scratch_np(ws, x.dtype, c, nt if kind == "mc" else 0)
    cst = tables["cst"]
    if kind == "ncl":
        _parallel(_forward_ncl, [(xa, ra, ya, m, v, w, b, eps, train, ac, hasres, stream, cst, sv, lo, hi)
                                 for lo, hi in _split(c, nt)])
        return y
    parts = _split(shape[0], nt)
    if train:
        p1, p2 = tables["p1"], tables["p2"]
        _parallel(_sums_mc, [(xa, xa[0], p1[t], p2[t], sv, lo, hi) for t, (lo, hi) in enumerate(parts)])
        _stats_mc(xa, xa[0], p1, p2, m, v)
    _constants_mc(m, v, w, b, eps, cst, tables["inv"])
    _parallel(_apply_mc, [(xa, ra, ya, ac, hasres, stream, cst, sv, lo, hi) for lo, hi in parts])
    return y


def train_forward(x, weight, bias, eps, channel_axis, act, slope):
    """Training forward; returns ``(y, batch_mean, biased_batch_var)`` with float64 statistics."""
    c = x.shape[channel_axis]
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    y = _forward(x, mean, var, weight, bias, eps, channel_axis, act, slope, True)
    return y, mean, var


def eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β)`` with given statistics; output in x's dtype."""
    c = x.shape[channel_axis]
    return _forward(x, _vec(mean, c, 0.0), _vec(var, c, 1.0), weight, bias, eps, channel_axis, act, slope,
                    False)


def _backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope, train, residual=False):
    """dx, dγ, dβ (and, with ``residual``, d(residual) first: y = act(BN(x) + residual), act' read from
    ``y``)."""
    plan = _plan(x, axis)
    kind, _, shape = plan
    c = x.shape[axis]
    dy = _like(dy, x)
    dres = None
    if residual:
        if kind != "ncl":
            raise RuntimeError("batchnorm.kernels.cpu: the two-sweep residual backward runs (N, C, L) "
                               "layouts only; see supports_backward_residual")
        y = _like(y, x)
        dres = _empty_like(x)
    elif act == "elu":
        if y is None:  # ELU's derivative is read from its output; recompute it if not given
            y = eval_forward(x, mean, var, weight, bias, eps, axis, act, slope)
        y = _like(y, x)
    else:
        y = x  # not read; same array type keeps a single compiled specialisation
    dx = _empty_like(x)
    w, b = _vec(weight, c, 1.0), _vec(bias, c, 0.0)
    m, v = _vec(mean, c, 0.0), _vec(var, c, 1.0)
    dw = torch.empty(c, dtype=torch.float64)
    db = torch.empty(c, dtype=torch.float64)
    sums = train or weight is not None or bias is not None
    sv, ac = _sv(x.dtype, act, slope), _KIND[act]
    eps = float(eps)
    nt = _threads(x.numel(), c if kind == "ncl" else shape[0])
    stream = _streams(dx, act, shape[-1])
    ws, scratch = _scratch(x.dtype, c, nt if kind == "mc" else 0)
    if _omp.runtime():
        arrays = {"x": x, "dy": dy, "y": y, "dx": dx, "mean": m, "var": v, "w": w, "b": b, "sv": sv,
                  "dw": dw, "db": db, **scratch}
        if residual:
            arrays["dres"] = dres
        sizes = shape if kind == "ncl" else (*shape, nt)
        _launch("backward_" + kind, arrays, sizes, (train, sums, ac, stream), eps, nt)
    else:  # the Python thread pool
        xa, dya, ya, dxa = (_np(t, plan) for t in (x, dy, y, dx))
        dra = _np(dres, plan) if residual else dxa  # (not written without a residual)
        m_, v_, w_, b_, sv_, dw_, db_ = (t.numpy() for t in (m, v, w, b, sv, dw, db))
        tables = _scratch_np(ws, x.dtype, c, nt if kind == "mc" else 0)
        cst_ = tables["cst"]
        if kind == "ncl":
            args = (xa, dya, ya, dxa, m_, v_, w_, b_, eps, train, sums, ac, stream, cst_, sv_, dw_, db_)
            _parallel(_backward_ncl, [(*args, lo, hi, dra, residual) for lo, hi in _split(c, nt)])
        else:
            pg, ph, inv = tables["p1"], tables["p2"], tables["inv"]
            _constants_mc(m_, v_, w_, b_, eps, cst_, inv)
            parts = _split(shape[0], nt)
            if sums:
                _parallel(_grad_sums_mc, [(xa, dya, ya, ac, cst_, sv_, pg[t], ph[t], lo, hi)
                                          for t, (lo, hi) in enumerate(parts)])
            else:
                pg[:] = 0.0
                ph[:] = 0.0
            _grad_coefs_mc(pg, ph, w_, inv, shape[0], train, cst_, dw_, db_)
            _parallel(_dx_mc, [(xa, dya, ya, dxa, ac, stream, cst_, sv_, lo, hi) for lo, hi in parts])
    dweight = None if weight is None else dw.to(weight.dtype)
    dbias = None if bias is None else db.to(bias.dtype)
    if residual:
        return dx, dres, dweight, dbias
    return dx, dweight, dbias


def backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Training backward (dx, dγ, dβ) in two passes; ``mean``/``var`` are train_forward's statistics."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, True)


def eval_backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope):
    """Backward of :func:`eval_forward` w.r.t. x, γ, β (statistics are constants)."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, False)


# -- BN + residual add + activation ---------------------------------------------------------------
_RES_ACTS = ("identity", "relu", "leaky_relu")


def backward_residual(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, train=True):
    """``(dx, d(residual), dγ, dβ)`` of ``y = act(BN(x) + residual)`` in the two sweeps of BN + act's
    backward: the first reads x, dy and y and writes dz = dy·act'(z) — the residual's gradient — beside
    the sums; the second reads x and dz (a block of channels at a time, still in cache) and writes dx
    (``train``: batch statistics; else given ones). act' is read from y, as torch's
    ``threshold_backward``/``leaky_relu_backward`` do: identity, relu, leaky_relu with a slope ≥ 0.
    (N, C, L) layouts only (:func:`supports_backward_residual`)."""
    return _backward(dy, x, y, weight, bias, mean, var, eps, channel_axis, act, slope, train, residual=True)


RESIDUAL_BACKWARD_MIN_BYTES = 8 << 20
"""Inputs of at least this many bytes take :func:`backward_residual`; smaller ones the three sweeps
(torch's activation backward, then our BN backward). Measured with ``benchmarks/residual_backward.py``
(2 threads, float32, three-sweep time / fused time): NCHW inputs of 25 MB 1.02–1.25×, where one
tensor pass of eight is saved; at 6.4 MB, which stays in the last-level cache, the pass count
matters less than the fused first sweep's extra work (0.76–0.80×). The (M, C) layouts keep three
sweeps: a fused (M, C) version measured 0.83–1.06×, so it was not kept."""


def supports_backward_residual(x: torch.Tensor, channel_axis: int, act: str, slope: float) -> bool:
    """Whether the residual backward of ``x`` takes :func:`backward_residual`: a piecewise-linear
    activation whose act' can be read from y (slope ≥ 0), an (N, C, L) layout and at least
    :data:`RESIDUAL_BACKWARD_MIN_BYTES`."""
    if act not in _RES_ACTS or (act == "leaky_relu" and slope < 0):
        return False
    if x.numel() * x.element_size() < RESIDUAL_BACKWARD_MIN_BYTES:
        return False
    plan = _plan(x, channel_axis % x.ndim)
    return plan is not None and plan[0] == "ncl"


#: Where our kernels start to beat torch's native kernel, per (pass, memory plan, fused activation):
#: below ``CROSSOVER[mode, kind, act != "identity"]`` values ``"auto"`` runs the native kernel
#: (:func:`batchnorm.kernels.select`). ``kind`` is the plan's: ``"ncl"`` (channels-first, an inner
#: run per channel) or ``"mc"`` ((N, C) and channels-last memory). With an activation ours saves
#: torch's separate activation pass, so it wins earlier. Measured with ``python
#: benchmarks/crossover.py`` (our module on both backends, interleaved medians, 2 threads).
CROSSOVER: dict[tuple[str, str, bool], int] = {
    ("train", "ncl", False): 1 << 19, ("train", "ncl", True): 1 << 19,
    ("train", "mc", False): 1 << 22, ("train", "mc", True): 1 << 22,
    ("eval", "ncl", False): 1 << 23, ("eval", "ncl", True): 1 << 21,
    ("eval", "mc", False): 1 << 22, ("eval", "mc", True): 1 << 22,
}
# (2026-12-03, 2 threads, quiet: numba/native time ratios cross 1 between the sampled powers of
# two just below these; at 2^23 values ours is 4-7x faster in every layout, where torch's kernel
# falls out of cache. Below a crossover the native kernel *is* torch's: never slower than torch.)


def native_below(x: torch.Tensor, channel_axis: int, act: str, mode: str) -> int:
    """The size below which torch's native kernel is faster than ours for ``x``'s layout
    (:data:`CROSSOVER`; asked before :func:`supports`: any layout it would refuse counts as "ncl")."""
    nd = x.ndim
    axis = channel_axis % nd
    kind = "ncl"  # (what _plan would say, without its shape arithmetic: this runs on every call)
    if x.is_contiguous():
        if axis == nd - 1 or (x.shape[axis + 1] if axis + 2 == nd else math.prod(x.shape[axis + 1:])) == 1:
            kind = "mc"
    elif axis == 1 and nd in _CL and x.is_contiguous(memory_format=_CL[nd][0]):
        kind = "mc"
    return CROSSOVER[mode, kind, act != "identity"]


def supports_residual(x: torch.Tensor, res: torch.Tensor, channel_axis: int, act: str) -> bool:
    """Whether the fused ``act(BN(x) + res)`` kernels run these inputs: what :func:`supports` takes, a
    piecewise-linear activation (identity, relu, leaky_relu), and a plain CPU tensor of x's dtype and
    shape as the residual (in another memory layout than x's it is copied into x's first)."""
    return (act in _RES_ACTS and supports(x, channel_axis, act)
            and type(res) in (torch.Tensor, torch.nn.Parameter) and res.dtype == x.dtype
            and res.device == x.device and res.shape == x.shape)


def train_forward_residual(x, res, weight, bias, eps, channel_axis, act, slope):
    """``(act(BN(x) + res), batch_mean, biased_batch_var)`` in the passes of :func:`train_forward`: the
    statistics sweep reads x, the normalise sweep reads x and res and writes y (float64 statistics)."""
    c = x.shape[channel_axis]
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    y = _forward(x, mean, var, weight, bias, eps, channel_axis, act, slope, True, _like(res, x))
    return y, mean, var


def eval_forward_residual(x, res, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``act((x − mean) · γ / sqrt(var + ε) + β + res)`` with given statistics, one sweep."""
    c = x.shape[channel_axis]
    return _forward(x, _vec(mean, c, 0.0), _vec(var, c, 1.0), weight, bias, eps, channel_axis, act, slope,
                    False, _like(res, x))
