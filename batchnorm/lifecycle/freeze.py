"""Freeze BN layers: normalise with the running statistics, never update them, even after ``model.train()``.

Fine-tuning with small batches (detection, segmentation, few-shot) usually freezes BN: the batch
statistics of 2 images are too noisy to normalise with, let alone to average into the population
estimates. ``model.eval()`` alone does not survive the ``model.train()`` every training loop calls,
so freezing here **replaces** each BN layer by a :class:`FrozenBatchNorm` (as torchvision's and
detectron2's ``FrozenBatchNorm2d``), whose forward is always

.. math:: y = \\mathrm{act}\\Big(γ \\frac{x − μ_{run}}{\\sqrt{σ²_{run} + ε}} + β\\Big)

whatever ``self.training`` says. Gradients flow to the input; γ and β are trainable only with
``train_affine=True`` (they stay ``nn.Parameter`` either way, so the state_dict keys — ``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` — are those of the original
layer, and a frozen model loads a BN checkpoint and back).

Why a replacement and not a flag: it works identically for our modules and ``torch.nn.BatchNorm*``
(torch's forward consults no flag of ours), it is visible in ``print(model)``, and exporters, folding
(:mod:`batchnorm.lifecycle.fold`) and checkpoints see a plain inference-mode BN.

``freeze(model)`` changes the model in place and returns it; ``unfreeze(model)`` puts the original
modules back (their class, hyper-parameters and hooks), re-sharing the frozen layers' current
parameters and buffers (so dtype/device changes made while frozen are kept) and restoring each
parameter's original ``requires_grad``. Every layer is validated before anything is replaced.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> model = freeze(model)
    >>> model.train()[1]
    FrozenBatchNorm(8, eps=1e-05, ranks=(4,), train_affine=False)
    >>> model = unfreeze(model)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_activation, check_eps, check_input, check_input_shape, check_num_features
from ..core import _bnlayers
from ..core import functional as F
from ..core.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    _BatchNorm,
)
from ..kernels import torch_backend

__all__ = ["FrozenBatchNorm", "freeze", "unfreeze"]

_TORCH_RANKS = ((nn.BatchNorm1d, (2, 3)), (nn.BatchNorm2d, (4,)), (nn.BatchNorm3d, (5,)))
_PLAIN_BY_RANKS = {(2, 3): BatchNorm1d, (4,): BatchNorm2d, (5,): BatchNorm3d}
_ACT_BY_RANKS = {(2, 3): BatchNormAct1d, (4,): BatchNormAct2d, (5,): BatchNormAct3d}


def _check_train_affine(op: str, train_affine: object) -> None:
    if not isinstance(train_affine, bool):
        raise TypeError(f"{op}: expected train_affine to be True or False, got {train_affine!r} "
                        f"({type(train_affine).__name__}); a string such as 'no' would count as True")


class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics: ``act(γ (x − μ_run)/sqrt(σ²_run + ε) + β)`` in train *and* eval mode.

    Args:
        num_features: C.
        eps: added to the running variance inside the square root. Default 1e-5.
        affine: hold γ and β (init 1 and 0). Default True.
        channel_axis: the channel axis (1, or -1 for channels-last). Default 1.
        activation, negative_slope: fused activation as in :class:`batchnorm.BatchNormAct2d`
            (default ``"identity"``).
        ranks: accepted input ranks (``(4,)`` for a frozen BatchNorm2d). Default 2 to 5.
        train_affine: whether γ and β get gradients. Default False.
        device, dtype: factory arguments.

    Shape: like the layer it replaces. Buffers/keys: those of ``torch.nn.BatchNorm2d``.

    Use :func:`freeze` / :meth:`from_module` to build one from a trained layer.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        channel_axis: int = 1,
        activation: str = "identity",
        negative_slope: float = 0.01,
        ranks: Sequence[int] = (2, 3, 4, 5),
        train_affine: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        op = type(self).__name__
        _check_train_affine(op, train_affine)
        self.num_features = check_num_features(op, num_features)
        self.eps = check_eps(op, eps)
        self.affine = bool(affine)
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise TypeError(f"{op}: expected channel_axis to be an int (1 or -1), got {channel_axis!r}")
        self.channel_axis = channel_axis
        self.activation, self.negative_slope = check_activation(op, activation, negative_slope)
        ranks = tuple(ranks)
        if not ranks or any(isinstance(r, bool) or r not in (2, 3, 4, 5) for r in ranks):
            raise ValueError(f"{op}: expected ranks to be a non-empty subset of (2, 3, 4, 5), got {ranks!r}")
        self.ranks = ranks
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory), requires_grad=bool(train_affine))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory), requires_grad=bool(train_affine))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # The module this one replaced (not a submodule: no duplicate keys, not moved by .to()).
        self.__dict__["_original"] = None
        self.__dict__["_original_requires_grad"] = None

    _version = 2  # as torch's _NormBase: version-1 state dicts have no num_batches_tracked

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            # what BatchNorm* and torch do for a state dict saved before the counter existed
            nbt = self.num_batches_tracked
            state_dict[key] = nbt if not nbt.is_meta else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def train_affine(self) -> bool:
        return self.weight is not None and bool(self.weight.requires_grad)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if not self.affine:
            s += ", affine=False"
        if self.activation != "identity":
            s += f", activation={self.activation!r}"
            if self.activation in ("leaky_relu", "elu"):
                s += f", negative_slope={self.negative_slope}"
        if self.channel_axis != 1:
            s += f", channel_axis={self.channel_axis}"
        return s + f", ranks={self.ranks}, train_affine={self.train_affine}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.numel() == 0:
            return self._forward_empty(input)
        x, axis = check_input(type(self).__name__, input, ranks=self.ranks, channel_axis=self.channel_axis,
                              num_features=self.num_features)
        return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps,
                                 channel_axis=axis, activation=self.activation,
                                 negative_slope=self.negative_slope)

    def _forward_empty(self, input: torch.Tensor) -> torch.Tensor:
        """An empty batch (``N = 0``), as the BatchNorm* layers: an empty output connected to the graph
        (an empty ``dx``, zero ``dγ``/``dβ``), buffers untouched. The checks are ``check_input``'s, run
        on a stand-in whose empty non-channel dimensions hold 2 entries (``check_input_shape``)."""
        axis = check_input_shape(type(self).__name__, input, ranks=self.ranks, channel_axis=self.channel_axis,
                                 num_features=self.num_features)
        if input.shape[axis] == 0:  # a layer of 0 features
            return input.clone()
        w, b = self.weight, self.bias
        w = w if w is None or w.dtype == input.dtype else w.to(input.dtype)
        b = b if b is None or b.dtype == input.dtype else b.to(input.dtype)
        rm, rv = self.running_mean.to(input.dtype), self.running_var.to(input.dtype)
        y = nn.functional.batch_norm(input.movedim(axis, 1), rm, rv, w, b, False, 0.0, self.eps)
        return torch_backend.act_forward(y.movedim(1, axis), self.activation, self.negative_slope)

    # -- conversion both ways -------------------------------------------------------------------
    @classmethod
    def from_module(cls, bn: nn.Module, *, train_affine: bool = False) -> FrozenBatchNorm:
        """A frozen layer that **shares** ``bn``'s parameters and buffers (see :func:`freeze`)."""
        _check_train_affine("FrozenBatchNorm.from_module", train_affine)
        _check_freezable("FrozenBatchNorm.from_module", "", bn)
        if isinstance(bn, FrozenBatchNorm):
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(bool(train_affine))
            return bn
        ranks = _ranks_of(bn)
        ref = bn.running_mean
        new = cls(bn.num_features, bn.eps, bn.affine, channel_axis=_bnlayers.channel_axis(bn),
                  activation=_bnlayers.activation(bn)[0], negative_slope=_bnlayers.activation(bn)[1],
                  ranks=ranks, device=ref.device, dtype=ref.dtype)
        grads = None
        if bn.affine:
            grads = (bn.weight.requires_grad, bn.bias.requires_grad)
            new.weight = bn.weight
            new.bias = bn.bias
            bn.weight.requires_grad_(bool(train_affine))
            bn.bias.requires_grad_(bool(train_affine))
        new.running_mean = bn.running_mean
        new.running_var = bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        new.__dict__["_original"] = bn
        new.__dict__["_original_requires_grad"] = grads
        return new

    def to_module(self) -> nn.Module:
        """The trainable BN layer back: the original module if this one came from :func:`freeze`, else a
        :class:`batchnorm.BatchNorm1d/2d/3d` (``BatchNormAct*`` with an activation) chosen by ``ranks``.

        The result shares this layer's current parameters and buffers and takes its train/eval mode.
        """
        orig = self._original
        if orig is None:
            table = _ACT_BY_RANKS if self.activation != "identity" else _PLAIN_BY_RANKS
            cls = table.get(self.ranks)
            if cls is None:
                raise ValueError(f"FrozenBatchNorm.to_module: ranks={self.ranks} name no single BatchNorm "
                                 f"class; build the layer with ranks=(2, 3), (4,) or (5,), or freeze an "
                                 f"existing layer with freeze()/from_module() to restore the original")
            kw = {"activation": self.activation, "negative_slope": self.negative_slope} \
                if self.activation != "identity" else {}
            orig = cls(self.num_features, self.eps, affine=self.affine, channel_axis=self.channel_axis,
                       device=self.running_mean.device, dtype=self.running_mean.dtype, **kw)
        if self.affine:
            orig.weight = self.weight
            orig.bias = self.bias
            grads = self._original_requires_grad
            if grads is not None:
                self.weight.requires_grad_(grads[0])
                self.bias.requires_grad_(grads[1])
            else:
                self.weight.requires_grad_(True)
                self.bias.requires_grad_(True)
        orig.running_mean = self.running_mean
        orig.running_var = self.running_var
        orig.num_batches_tracked = self.num_batches_tracked
        orig.train(self.training)
        return orig


_bnlayers.register_bn_type(FrozenBatchNorm)


def _ranks_of(bn: nn.Module) -> tuple[int, ...]:
    if isinstance(bn, _BatchNorm):
        return tuple(type(bn)._ranks)
    for cls, ranks in _TORCH_RANKS:
        if isinstance(bn, cls):
            return ranks
    return (2, 3, 4, 5)  # SyncBatchNorm and other rank-agnostic layers


def _check_freezable(op: str, name: str, m: nn.Module) -> None:
    label = f"layer {name or '<model>'} ({type(m).__name__})"
    if not _bnlayers.is_bn(m):
        raise TypeError(f"{op}: {label} is not a batch-norm layer")
    if isinstance(m, FrozenBatchNorm):
        return
    rm = getattr(m, "running_mean", None)
    if rm is None:
        raise ValueError(f"{op}: {label} has no running statistics (track_running_stats=False), so there "
                         f"is nothing to freeze it with; build it with track_running_stats=True and train or "
                         f"recalibrate it (batchnorm.recalibrate) first, or leave it out with layers=[...]")
    if isinstance(rm, nn.parameter.UninitializedTensorMixin):
        raise ValueError(f"{op}: {label} is a lazy layer that has not run yet; run one forward pass first")


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def freeze(model: nn.Module, *, layers: Sequence[str] | None = None, train_affine: bool = False) -> nn.Module:
    """Replace BN layers of ``model`` by :class:`FrozenBatchNorm` (in place; returns the model).

    Args:
        model: any ``nn.Module`` (our BN modules and ``torch.nn.BatchNorm*`` are frozen alike); a model
            that is itself a BN layer is returned frozen.
        layers: qualified names (as in ``named_modules()``) of the BN layers to freeze; default all.
        train_affine: keep γ and β trainable (``requires_grad=True``); default False (no gradient).

    Raises ValueError, with the model unchanged, for layers without running statistics or names that
    are not BN layers. Layers already frozen only get ``train_affine`` applied.
    """
    op = "batchnorm.freeze"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    _check_train_affine(op, train_affine)
    found = dict(_bnlayers.iter_bn(model))
    names = list(_bnlayers.select_layers(op, found, layers))
    for n in names:
        _check_freezable(op, n, found[n])
    for n in names:
        model = _replace(model, n, FrozenBatchNorm.from_module(found[n], train_affine=train_affine))
    return model


def unfreeze(model: nn.Module, *, layers: Sequence[str] | None = None) -> nn.Module:
    """Put trainable BN layers back in place of every :class:`FrozenBatchNorm` (or those named in ``layers``).

    The original modules come back (see :meth:`FrozenBatchNorm.to_module`), sharing the frozen layers'
    current tensors, in the model's current train/eval mode, with their parameters' original
    ``requires_grad``. Returns the model (or the unfrozen layer if ``model`` is a FrozenBatchNorm).
    """
    op = "batchnorm.unfreeze"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)}
    names = list(_bnlayers.select_layers(op, frozen, layers, "frozen BN layers"))
    for n in names:  # validate first: a layer that cannot be restored must not leave a half-done model
        m = frozen[n]
        if m._original is None and (_ACT_BY_RANKS if m.activation != "identity" else _PLAIN_BY_RANKS).get(
                m.ranks) is None:
            m.to_module()  # raises the explanatory error
    for n in names:
        model = _replace(model, n, frozen[n].to_module())
    return model
