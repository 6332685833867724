"""Input validation shared by every op and module.

Every message names the op, what was expected, what came, and how to fix it. These checks run
before any state is touched, so a rejected call leaves parameters and buffers as they were.
Never ``assert`` here: asserts vanish under ``python -O``.
"""

from __future__ import annotations

import torch

_RANK_HINT = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
_MODULE_FOR_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}

ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu", "hardswish", "gelu", "gelu_tanh", "sigmoid",
               "tanh")
"""The fused activations: ``negative_slope`` is leaky_relu's slope and elu's α; the others take none
(``gelu`` is the exact erf form, ``gelu_tanh`` torch's ``approximate="tanh"``; ``silu`` is Swish-1)."""


def check_tensor(op: str, x: object, name: str = "input") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(x).__name__}; "
                        f"convert it with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point {name} (float16/bfloat16/float32/float64), "
                        f"got dtype {x.dtype}; cast it first, e.g. {name}.float()")
    return x


def check_input(
    op: str,
    x: object,
    *,
    ranks: tuple[int, ...] = (2, 3, 4, 5),
    channel_axis: int = 1,
    num_features: int | None = None,
    training: bool = False,
) -> tuple[torch.Tensor, int]:
    """Validate a BN input; return it with the channel axis made non-negative."""
    x = check_tensor(op, x)
    if x.ndim not in ranks:
        want = " or ".join(f"{r}-D {_RANK_HINT.get(r, '')}".strip() for r in ranks)
        hint = ""
        if x.ndim in _MODULE_FOR_RANK and len(ranks) < 4:
            hint = f"; use {_MODULE_FOR_RANK[x.ndim]} for {_RANK_HINT[x.ndim]} input"
        elif x.ndim not in _MODULE_FOR_RANK:
            hint = "; batch norm takes inputs of rank 2 to 5 with channels on one axis"
        raise ValueError(f"{op}: expected {want} input, got {x.ndim}-D input of shape {tuple(x.shape)}{hint}")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise TypeError(f"{op}: expected channel_axis to be an int, got {channel_axis!r} "
                        f"({type(channel_axis).__name__}); use 1 for channels-first or -1 for channels-last")
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(f"{op}: channel_axis={channel_axis} is out of range for a {x.ndim}-D input; "
                         f"use 1 for channels-first or -1 for channels-last")
    axis = channel_axis % x.ndim
    if x.numel() == 0:
        raise ValueError(f"{op}: got an empty input of shape {tuple(x.shape)}; batch statistics of no "
                         f"values are undefined - skip the call for empty batches")
    c = x.shape[axis]
    if num_features is not None and c != num_features:
        raise ValueError(f"{op}: expected {num_features} channels on axis {axis}, got {c} "
                         f"(input shape {tuple(x.shape)}); build the layer with num_features={c}, "
                         f"or set channel_axis to the axis that holds the channels")
    if training and x.numel() // c <= 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got input shape "
                         f"{tuple(x.shape)} (1 value per channel, variance undefined); use a batch of "
                         f"at least 2, or eval mode")
    return x, axis


def check_input_shape(op: str, input: torch.Tensor, *, ranks: tuple[int, ...], channel_axis: int,
                      num_features: int, training: bool = False) -> int:
    """:func:`check_input`'s checks (and messages) from shape and dtype alone, on a meta stand-in: safe
    under tracers (no ``numel`` to record) and for empty batches (whose empty dimensions other than
    the channels get 2 entries in the stand-in). Returns the channel axis, made non-negative."""
    nd, ca = input.ndim, channel_axis
    ax = ca % nd if nd and -nd <= ca < nd else None
    shape = [d if (d or i == ax) else 2 for i, d in enumerate(input.shape)]
    if ax is not None and shape[ax] == 0 and nd in ranks and input.is_floating_point():
        if num_features == 0:
            return ax  # a layer of 0 features: nothing more to check
        raise ValueError(f"{op}: expected {num_features} channels on axis {ax}, got 0 (input shape "
                         f"{tuple(input.shape)}); build the layer with num_features=0, or set "
                         f"channel_axis to the axis that holds the channels")
    stand_in = torch.empty(shape, dtype=input.dtype, device="meta")
    try:
        return check_input(op, stand_in, ranks=ranks, channel_axis=ca, num_features=num_features,
                           training=training)[1]
    except ValueError as e:  # the message names the real shape, not the stand-in's
        raise ValueError(str(e).replace(str(tuple(shape)), str(tuple(input.shape)))) from None


def check_channel_tensor(op: str, name: str, t: object, c: int, *, x: torch.Tensor | None = None) -> None:
    """``t`` must be None or a floating 1-D tensor of ``c`` elements (on ``x``'s device)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor or None, got {type(t).__name__}; "
                        f"convert it with torch.as_tensor(...)")
    if t.shape != (c,):
        raise ValueError(f"{op}: expected {name} of shape ({c},) for {c} channels, got shape "
                         f"{tuple(t.shape)}; it must hold one value per channel")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point {name}, got dtype {t.dtype}; cast it first, "
                        f"e.g. {name}.float()")
    if x is not None and t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; move them "
                         f"to one device (module.to(x.device))")


def check_eps(op: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"{op}: expected eps to be a number >= 0, got {eps!r}; typical values are 1e-5 "
                         f"(PyTorch) or 1e-3 (Keras)")
    return float(eps)


def check_momentum(op: str, momentum: object) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: expected momentum in [0, 1] or None (cumulative average), got "
                         f"{momentum!r}; PyTorch's momentum is the weight of the new batch (0.1), Keras's "
                         f"0.99 decay is momentum=0.01")
    return float(momentum)


def check_activation(op: str, activation: object, negative_slope: object) -> tuple[str, float]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float):
        raise TypeError(f"{op}: expected negative_slope to be a number, got {negative_slope!r}; pass a float "
                        f"such as 0.01 (leaky_relu's slope, or elu's alpha)")
    return str(activation), float(negative_slope)


def check_num_features(op: str, num_features: object) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ValueError(f"{op}: expected num_features to be a positive int, got {num_features!r}; pass the "
                         f"number of channels C of the input, e.g. x.shape[1]")
    return num_features


NONFINITE = ("update", "skip", "raise")


def check_nonfinite(op: str, nonfinite: object) -> str:
    if nonfinite not in NONFINITE:
        raise ValueError(f"{op}: expected nonfinite to be one of {NONFINITE}, got {nonfinite!r}: 'update' "
                         f"folds any batch into the running statistics (PyTorch), 'skip' ignores a batch "
                         f"whose statistics are NaN/Inf, 'raise' raises on it")
    return str(nonfinite)


def check_mask(op: str, mask: object, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A BN mask: a bool tensor with the input's shape less the channel axis (size-1 axes broadcast).

    For ``(N, C, L)`` input the mask is ``(N, L)``; for ``(N, C)`` it is ``(N,)``; for ``(N, C, H, W)``
    it is ``(N, H, W)`` or e.g. ``(N, 1, 1)`` (whole samples). True marks a valid position. The rank
    must match exactly (no implicit leading axes): an ``(N,)`` mask on ``(N, C, L)`` input would
    otherwise broadcast against L and silently mask the wrong positions.
    """
    want = tuple(s for d, s in enumerate(x.shape) if d != axis)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: expected mask to be a bool torch.Tensor of shape {want} (True = valid), got "
                        f"{type(mask).__name__}; e.g. mask = torch.arange(L)[None, :] < lengths[:, None]")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: expected a bool mask (True = valid position), got dtype {mask.dtype}; "
                        f"convert it with mask.bool() (or mask != 0)")
    if mask.ndim != len(want) or any(m not in (1, s) for m, s in zip(mask.shape, want)):
        raise ValueError(f"{op}: expected a mask of shape {want} (the input shape {tuple(x.shape)} without "
                         f"the channel axis {axis}; size-1 axes broadcast), got shape {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{op}: the mask is on {mask.device} but the input is on {x.device}; move it "
                         f"with mask.to(x.device)")
    return mask


_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def check_num_batches_tracked(op: str, nbt: object, *, like: torch.Tensor | None = None) -> None:
    """None, or the batch count as torch keeps it: a 0-d integer tensor (on ``like``'s device)."""
    if nbt is None:
        return
    if not isinstance(nbt, torch.Tensor):
        raise TypeError(f"{op}: expected num_batches_tracked to be a 0-d integer tensor or None, got "
                        f"{type(nbt).__name__} {nbt!r}; pass torch.tensor({nbt!r}) (the count is updated "
                        f"as a tensor, like BatchNorm's buffer)")
    if nbt.ndim != 0 or nbt.dtype not in _INT_DTYPES:
        raise ValueError(f"{op}: expected num_batches_tracked to be a 0-d integer tensor, got shape "
                         f"{tuple(nbt.shape)} and dtype {nbt.dtype}; use torch.tensor(0) at the start")
    if like is not None and nbt.device != like.device:
        raise ValueError(f"{op}: num_batches_tracked is on {nbt.device} but the statistics are on "
                         f"{like.device}; move them to one device")


def check_distinct(op: str, named: dict[str, torch.Tensor | None]) -> None:
    """No two of the tensors that will be written (or read while others are written) share memory:
    ``running_mean is running_var`` would fold both updates into one buffer. Runs on every training
    step, so it compares address ranges (absolute, no storage lookup) and looks at devices only
    where two ranges meet."""
    compiling = torch.compiler.is_compiling()  # fake tensors have no addresses: identity is what we know
    seen: list[tuple[str, torch.Tensor, int, int]] = []
    for k, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.numel():
            continue
        lo, hi = (0, 0) if compiling else _span(t)
        for k0, t0, lo0, hi0 in seen:
            if (t is t0) if compiling else (lo < hi0 and lo0 < hi and t.device == t0.device):
                raise ValueError(f"{op}: {k0} and {k} share memory (the same tensor or views of one); "
                                 f"each statistic needs its own buffer: pass {k}.clone()")
        seen.append((k, t, lo, hi))


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the address ranges the two can reach intersect (addresses are absolute: no storage
    lookup needed, which keeps this cheap on every training step)."""
    lo_a, hi_a = _span(a)
    lo_b, hi_b = _span(b)
    return lo_a < hi_b and lo_b < hi_a


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that ``t``'s elements occupy."""
    lo, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():  # the buffers' case
        return lo, lo + t.nbytes
    lo += sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0) * size
    return lo, lo + (sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1) * size
