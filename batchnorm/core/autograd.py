"""autograd Functions wiring BN's forward and hand-derived backward to the backends.

:class:`BatchNormTrainFn` saves only what the closed-form backward needs: the input ``x``, the
per-channel ``mean`` and ``var`` (C values each), γ and β, and the output ``y`` only when an
activation's derivative must be read from it. Its backward calls the selected backend's
``backward`` (article 003's formula); when a graph of the backward is requested
(``create_graph=True``, double backward) it instead evaluates the same formula with torch ops on
statistics recomputed differentiably from ``x``, so second derivatives are exact too.

:func:`train_apply` / :func:`eval_apply` are what the functional API calls: these Functions in
eager mode, and under ``torch.compile`` the custom ops of :mod:`batchnorm.core.ops` (the same kernels
and formulas, but opaque to the compiler, so a model compiles with ``fullgraph=True``).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad
from torch._C import _functorch as _ft

from .. import kernels
from ..kernels import masked, torch_backend


class BatchNormTrainFn(torch.autograd.Function):
    """``y, mean, var = BatchNormTrainFn.apply(x, weight, bias, eps, channel_axis, act, slope)``.

    ``mean`` and ``var`` (biased, accumulation dtype) are non-differentiable side outputs used to
    update running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, channel_axis, act, slope):
        backend = kernels.select(x, channel_axis, act)
        y, mean, var = backend.train_forward(x, weight, bias, eps, channel_axis, act, slope)
        ctx.backend = backend
        ctx.cfg = (eps, channel_axis, act, slope)
        ctx.save_for_backward(x, weight, bias, mean, var, y if act != "identity" else None)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, var, y = ctx.saved_tensors
        eps, axis, act, slope = ctx.cfg
        if dy is None:
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():
            dx, dw, db = torch_backend.differentiable_train_backward(dy, x, weight, bias, eps, axis, act,
                                                                     slope)
        elif _transformed() or _ft.is_legacy_batchedtensor(dy):  # vmap over the backward (batched
            # gradcheck, jacobians): the composite torch ops, which every transform can batch
            dx, dw, db = torch_backend.backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
        else:
            dx, dw, db = ctx.backend.backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
        return (dx if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None,
                None, None, None, None)


class BatchNormEvalFn(torch.autograd.Function):
    """``y = BatchNormEvalFn.apply(x, mean, var, weight, bias, eps, channel_axis, act, slope)``.

    Statistics are constants (running buffers); gradients flow to x, γ and β.
    """

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, channel_axis, act, slope):
        backend = kernels.select(x, channel_axis, act, "eval")
        y = backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope)
        ctx.backend = backend
        ctx.cfg = (eps, channel_axis, act, slope)
        ctx.save_for_backward(x, mean, var, weight, bias, y if act != "identity" else None)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight, bias, y = ctx.saved_tensors
        eps, axis, act, slope = ctx.cfg
        if dy is None:
            return (None,) * 9
        batched = _transformed() or _ft.is_legacy_batchedtensor(dy)
        backend = torch_backend if torch.is_grad_enabled() or batched else ctx.backend
        dx, dw, db = backend.eval_backward(dy, x, y, weight, bias, mean, var, eps, axis, act, slope)
        return (dx if ctx.needs_input_grad[0] else None, None, None,
                dw if ctx.needs_input_grad[3] else None,
                db if ctx.needs_input_grad[4] else None,
                None, None, None, None)


def _records(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (grad mode on, one of them needs grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (vmap, grad, jacrev, jvp, functional_call's callers) or a
    forward-mode AD level: tensors there are wrappers that our kernels cannot read."""
    return _ft.maybe_current_level() is not None or _fwad._current_level >= 0


def capturing(compiling: bool | None = None) -> bool:
    """Whether something other than eager execution is recording the ops: ``torch.jit.trace`` (also the
    TorchScript ONNX exporter), ``torch.export`` (also the dynamo ONNX exporter), or a functorch
    transform / forward-mode AD. There only standard torch ops give a correct graph (a numba kernel
    is invisible to a tracer and returns nothing a transform can differentiate), so the modules emit
    ``torch.nn.functional.batch_norm`` and the functional ops the composite reference. Under
    ``torch.compile`` (not exporting) this is False: our custom ops are kept whole there. Costs
    about 0.2 µs (``is_compiling`` first: Dynamo folds it, and would not trace ``_is_tracing``).
    ``compiling``: ``torch.compiler.is_compiling()`` if the caller has it already (a hot path that
    needs it too asks once)."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return torch.compiler.is_exporting()
    return torch._C._is_tracing() or _transformed()


def refuse_capture(op: str, input: object) -> None:
    """Raise if a graph is being captured or a transform runs (:func:`capturing`, or an fx Proxy): for
    a layer whose step runs kernels or buffer writes a tracer cannot record (InPlace-ABN; Batch Renorm
    and Ghost BN in training), a captured graph would silently compute something else."""
    if isinstance(input, torch.fx.Proxy) or capturing():
        raise RuntimeError(
            f"{op}: this step cannot be captured (torch.jit.trace/script, torch.export, ONNX export, "
            f"torch.fx, torch.func transforms): its kernels are invisible to the tracer, so the graph would "
            f"compute something else. Capture the eval-mode equivalent instead (batchnorm.convert_to_torch, "
            f"or batchnorm.onnx.prepare_for_export / batchnorm.onnx.export), or run the step eagerly or "
            f"under torch.compile")


def train_apply(x, weight, bias, eps, channel_axis, act, slope):
    """``(y, mean, var)`` of BN training: :class:`BatchNormTrainFn` eagerly, the custom op when compiling,
    the composite torch ops while a graph is captured or a transform runs (:func:`capturing`).

    With nothing to record (``no_grad``, or no input needs grad: recalibration, inference-style
    passes) the backend runs directly: the same call the Function's forward makes, without its
    ~10 µs of bookkeeping."""
    if capturing():
        return torch_backend.train_forward(x, weight, bias, eps, channel_axis, act, slope)
    if torch.compiler.is_compiling():
        from . import ops

        return ops.train_forward(x, weight, bias, eps, channel_axis, act, slope)
    if not _records(x, weight, bias):
        backend = kernels.select(x, channel_axis, act)
        return backend.train_forward(x, weight, bias, eps, channel_axis, act, slope)
    return BatchNormTrainFn.apply(x, weight, bias, eps, channel_axis, act, slope)


def eval_apply(x, mean, var, weight, bias, eps, channel_axis, act, slope):
    """``y`` of BN with given statistics: :class:`BatchNormEvalFn` eagerly, the custom op when compiling,
    the composite while capturing (and, with nothing to record, the backend directly, as in
    :func:`train_apply`)."""
    if capturing():
        return torch_backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope)
    if torch.compiler.is_compiling():
        from . import ops

        return ops.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope)
    if not _records(x, weight, bias):  # (the statistics are constants to autograd either way)
        backend = kernels.select(x, channel_axis, act, "eval")
        return backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope)
    return BatchNormEvalFn.apply(x, mean, var, weight, bias, eps, channel_axis, act, slope)


class MaskedBatchNormTrainFn(torch.autograd.Function):
    """``y, mean, var, count = MaskedBatchNormTrainFn.apply(x, mask, weight, bias, eps, axis, act, slope)``.

    Masked training BN (:mod:`batchnorm.kernels.masked`): statistics over ``mask``'s valid positions,
    every position normalised with them. ``mean``, ``var`` (biased) and the valid ``count`` (0-d) are
    non-differentiable side outputs for the running statistics. The output is normalised by the
    selected backend's ``eval_forward`` (a per-channel affine map once the statistics are known).
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, channel_axis, act, slope):
        y, mean, var, count = _masked_forward(x, mask, weight, bias, eps, channel_axis, act, slope)
        ctx.impl = _masked_impl(x, channel_axis, act)
        ctx.cfg = (eps, channel_axis, act, slope)
        ctx.save_for_backward(x, mask, weight, bias, mean, var, count, y if act != "identity" else None)
        ctx.mark_non_differentiable(mean, var, count)
        ctx.set_materialize_grads(False)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, mask, weight, bias, mean, var, count, y = ctx.saved_tensors
        eps, axis, act, slope = ctx.cfg
        if dy is None:
            return (None,) * 8
        if torch.is_grad_enabled():  # create_graph: differentiate through recomputed statistics
            dx, dw, db = masked.differentiable_masked_backward(dy, x, mask, weight, bias, eps, axis, act,
                                                               slope)
        else:
            dx, dw, db = ctx.impl.masked_backward(dy, x, y, mask, count, weight, bias, mean, var, eps, axis,
                                                  act, slope)
        return (dx if ctx.needs_input_grad[0] else None, None,
                dw if ctx.needs_input_grad[2] else None,
                db if ctx.needs_input_grad[3] else None,
                None, None, None, None)


def _masked_impl(x, channel_axis, act):
    """Who computes the masked statistics and backward: the numba kernels
    (:mod:`batchnorm.kernels.masked_cpu`, imported on first use) where the numba backend would run
    this input and it is channels-first contiguous, once they are compiled (in a fresh cache a
    background process compiles them, :mod:`batchnorm.kernels._warmup` kind ``"masked"``, unless
    numba is forced); the torch composite (:mod:`batchnorm.kernels.masked`) elsewhere, and always
    under ``torch.compile``."""
    if torch.compiler.is_compiling() or kernels.select(x, channel_axis, act).name != "numba":
        return masked
    from ..kernels import _warmup, masked_cpu

    if not masked_cpu.supports(x, channel_axis):
        return masked
    if not (_warmup.ready("masked", "f64" if x.dtype == torch.float64 else "f32")
            or kernels.get_backend() == "numba"):
        return masked
    return masked_cpu


def _masked_forward(x, mask, weight, bias, eps, channel_axis, act, slope):
    impl = _masked_impl(x, channel_axis, act)
    if impl is not masked:  # the fused kernel: statistics and output in one sweep per channel
        return impl.masked_forward(x, mask, weight, bias, eps, channel_axis, act, slope)
    mean, var, count = masked.masked_stats(x, mask, channel_axis)
    # (under torch.compile the composite normalisation is traced; the numba kernels are opaque to it)
    backend = torch_backend if torch.compiler.is_compiling() else kernels.select(x, channel_axis, act)
    y = backend.eval_forward(x, mean, var, weight, bias, eps, channel_axis, act, slope)
    return y, mean, var, count


def masked_train_apply(x, mask, weight, bias, eps, channel_axis, act, slope):
    """``(y, mean, var, count)`` of masked BN training: :class:`MaskedBatchNormTrainFn`, or (with
    nothing to record) the forward directly, as :func:`train_apply` does."""
    if not _records(x, weight, bias):
        return _masked_forward(x, mask, weight, bias, eps, channel_axis, act, slope)
    return MaskedBatchNormTrainFn.apply(x, mask, weight, bias, eps, channel_axis, act, slope)
