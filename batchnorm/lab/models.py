"""The lab's networks, built with this package's BN modules (:class:`batchnorm.BatchNorm1d` / ``2d``).

* :func:`mlp` — article 001's MLP (hidden 300 and 100, ReLU) in three variants::

      "none"    Flatten → Linear(300) → ReLU → Linear(100) → ReLU → Linear(10)
      "after"   Flatten → BN → Linear(300) → ReLU → BN → Linear(100) → ReLU → BN → Linear(10)
      "before"  Flatten → BN → Linear(300, bias=False) → BN → ReLU → Linear(100, bias=False) → BN
                → ReLU → Linear(10)

  ("after": BN after the activation, article 001's "approach 1"; "before": BN between the affine
  map and the activation, "approach 2", the placement of Ioffe & Szegedy, where the layer's bias is
  redundant because BN's β plays its role.) Both BN variants also normalise the input, as the
  article's Keras models do.
* :func:`cnn` — article 002's CNN, blocks of conv → BN → ReLU → max-pool (conv bias off with BN).
* :func:`sigmoid_mlp` — the network of Figure 1 of Ioffe & Szegedy (2015): three fully connected
  hidden layers of 100 sigmoid units, optionally with BN before each sigmoid, and an optional
  constant ``shift`` added to every pre-activation (article 004's "mean −6" saturation example).

Every builder takes ``norm=`` (a factory ``num_features -> nn.Module``) so other normalisations
(GroupNorm, LayerNorm, Batch Renorm, Ghost BN, ...) drop into the same architecture. Build under
a seed (``torch.manual_seed``) for reproducible initialisation; :func:`build` does it for you.

Example:
    >>> from batchnorm.lab.models import build
    >>> net = build("mlp_bn_before", in_shape=(1, 8, 8), num_classes=10, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from batchnorm import BatchNorm1d, BatchNorm2d
from batchnorm.core.modules import _BatchNorm

__all__ = [
    "MODEL_KINDS",
    "Shift",
    "bn_layers",
    "build",
    "cnn",
    "mlp",
    "sigmoid_layers",
    "sigmoid_mlp",
]

NormFactory = Callable[[int], nn.Module]


class Shift(nn.Module):
    """Adds a fixed constant to its input (not trained): ``y = x + shift``.

    Placed right after a ``Linear`` it moves that layer's pre-activations by ``shift`` — the
    "pre-activations of mean −6" of article 004 — without touching the initialisation.
    """

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift

    def extra_repr(self) -> str:
        return f"shift={self.shift}"


def _bn1d(momentum: float | None) -> NormFactory:
    return lambda c: BatchNorm1d(c, momentum=momentum)


def mlp(in_features: int, num_classes: int = 10, bn: str = "none", *, hidden: Sequence[int] = (300, 100),
        momentum: float | None = 0.1, norm: NormFactory | None = None) -> nn.Sequential:
    """Article 001's ReLU MLP; ``bn`` is ``"none"``, ``"after"`` or ``"before"`` (see the module doc).

    Args:
        in_features: flattened input size (64 for digits, 784 for MNIST).
        num_classes: output logits.
        bn: BN placement.
        hidden: hidden widths (article: 300, 100).
        momentum: BN momentum (PyTorch convention; None = cumulative average).
        norm: factory ``C -> module`` replacing ``BatchNorm1d(C, momentum=momentum)``.
    """
    if bn not in ("none", "after", "before"):
        raise ValueError(f"mlp: expected bn to be 'none', 'after' or 'before', got {bn!r}")
    make = norm or _bn1d(momentum)
    layers: list[nn.Module] = [nn.Flatten()]
    if bn != "none":
        layers.append(make(in_features))
    width = in_features
    for h in hidden:
        if bn == "before":
            layers += [nn.Linear(width, h, bias=False), make(h), nn.ReLU()]
        elif bn == "after":
            layers += [nn.Linear(width, h), nn.ReLU(), make(h)]
        else:
            layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(in_shape: Sequence[int], num_classes: int = 10, bn: bool = True, *,
        channels: Sequence[int] = (16, 32), momentum: float | None = 0.1,
        norm: NormFactory | None = None) -> nn.Sequential:
    """Article 002's CNN: per block ``conv3×3 → BN → ReLU → max-pool 2×2``, then a linear classifier.

    Args:
        in_shape: ``(C, H, W)`` of one image, e.g. ``(1, 8, 8)`` (digits) or ``(1, 28, 28)`` (MNIST).
        bn: with BN (conv bias off, β replaces it) or without (conv bias on).
        channels: output channels of each block; each block halves H and W.
        norm: factory ``C -> module`` replacing ``BatchNorm2d(C, momentum=momentum)``.
    """
    c, h, w = (int(v) for v in in_shape)
    if min(h, w) < 2 ** len(channels):
        raise ValueError(f"cnn: {len(channels)} pooling blocks need images of at least {2 ** len(channels)} "
                         f"pixels a side, got {h}x{w}; use fewer channels=")
    make = norm or (lambda k: BatchNorm2d(k, momentum=momentum))
    layers: list[nn.Module] = []
    for k in channels:
        layers.append(nn.Conv2d(c, k, 3, padding=1, bias=not bn))
        if bn:
            layers.append(make(k))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = k, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


def sigmoid_mlp(in_features: int, num_classes: int = 10, bn: bool = False, *,
                hidden: Sequence[int] = (100, 100, 100), shift: float = 0.0, momentum: float | None = 0.1,
                norm: NormFactory | None = None) -> nn.Sequential:
    """Figure 1 of Ioffe & Szegedy (2015): fully connected sigmoid layers, BN before each sigmoid.

    Per hidden layer: ``Linear → [Shift(shift)] → [BN] → Sigmoid``. Weights start as small
    Gaussians ``N(0, 1/fan_in)``, biases 0 (the paper: "small random Gaussian values"). With
    ``shift = −6`` the sigmoid inputs start around −6 where σ' ≈ 0.0025 (article 004); BN removes
    the shift, without BN the units start saturated.

    The sigmoid modules are ``nn.Sigmoid`` instances; :func:`sigmoid_layers` finds them (hook
    their *input* to see the distribution the paper plots).
    """
    make = norm or _bn1d(momentum)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        lin = nn.Linear(width, h, bias=not bn)
        nn.init.normal_(lin.weight, 0.0, 1.0 / math.sqrt(width))
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if shift:
            layers.append(Shift(shift))
        if bn:
            layers.append(make(h))
        layers.append(nn.Sigmoid())
        width = h
    out = nn.Linear(width, num_classes)
    nn.init.normal_(out.weight, 0.0, 1.0 / math.sqrt(width))
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


MODEL_KINDS = ("mlp", "mlp_bn_after", "mlp_bn_before", "cnn", "cnn_bn", "sigmoid", "sigmoid_bn")


def build(kind: str, in_shape: Sequence[int], num_classes: int = 10, *, seed: int | None = None,
          **kwargs: object) -> nn.Sequential:
    """Build a model by name (one of :data:`MODEL_KINDS`) under ``torch.manual_seed(seed)``.

    ``kwargs`` go to the builder (``hidden=``, ``momentum=``, ``shift=``, ``norm=``, ``channels=``).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"build: unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    if seed is not None:
        torch.manual_seed(seed)
    feats = math.prod(int(v) for v in in_shape)
    if kind.startswith("mlp"):
        bn = {"mlp": "none", "mlp_bn_after": "after", "mlp_bn_before": "before"}[kind]
        return mlp(feats, num_classes, bn, **kwargs)  # type: ignore[arg-type]
    if kind.startswith("cnn"):
        return cnn(in_shape, num_classes, kind == "cnn_bn", **kwargs)  # type: ignore[arg-type]
    return sigmoid_mlp(feats, num_classes, kind == "sigmoid_bn", **kwargs)  # type: ignore[arg-type]


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BN modules (this package's), in forward order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def sigmoid_layers(model: nn.Module) -> list[nn.Sigmoid]:
    """The model's ``nn.Sigmoid`` modules, in forward order."""
    return [m for m in model.modules() if isinstance(m, nn.Sigmoid)]
