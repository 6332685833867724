"""Corrupted test sets made offline from the lab's data, after Hendrycks & Dietterich's CIFAR-10-C.

Hendrycks & Dietterich ("Benchmarking neural network robustness to common corruptions and
perturbations", ICLR 2019) apply 15 corruptions at 5 severities to the test images; TENT's and
Schneider et al.'s tables are measured on them. Here four of the kinds, on the lab's small
grey-level images, at three severities each (the levels are scaled for 8×8 digits so that the
source model's error rises clearly, as at CIFAR-10-C severities 3-5):

======================  ==========================================  ========================
kind                    on intensities ``u ∈ [0, 1]``                  severities 1, 2, 3
======================  ==========================================  ========================
``gaussian_noise``      ``u + σ·z``, ``z ~ N(0, 1)`` per pixel         σ = 0.15, 0.30, 0.45
``contrast``            ``(u − ū)·c + ū``, ``ū`` the image's mean      c = 0.5, 0.3, 0.15
``brightness``          ``u + b``                                      b = 0.2, 0.4, 0.6
``blur``                Gaussian blur of std ``s`` pixels (edge pad)   s = 0.6, 1.0, 1.5
======================  ==========================================  ========================

Every result is clipped to ``[0, 1]``. The data set's images are already preprocessed (z-score by
default), so intensities are recovered with the training set's range: ``u = (x − lo)/(hi − lo)`` with
``lo, hi`` the minimum and maximum of the preprocessed training images, and mapped back after the
corruption — the same for every preprocessing method and for IDX data. Noise comes from a private
generator seeded by the caller (the global RNG is untouched), so a test set is reproducible.

Example:
    >>> xc = corrupt(ds.x_test, "contrast", 2, lo=float(ds.x_train.min()), hi=float(ds.x_train.max()))
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = ["KINDS", "LEVELS", "corrupt"]

LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.15, 0.30, 0.45),
    "contrast": (0.5, 0.3, 0.15),
    "brightness": (0.2, 0.4, 0.6),
    "blur": (0.6, 1.0, 1.5),
}
KINDS = tuple(LEVELS)


def _blur(u: torch.Tensor, s: float) -> torch.Tensor:
    r = max(1, math.ceil(2 * s))
    t = torch.arange(-r, r + 1, dtype=u.dtype)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum()
    c = u.shape[1]
    flat = u.reshape(-1, 1, *u.shape[2:])  # every channel alone
    flat = F.pad(flat, (r, r, r, r), mode="replicate")
    flat = F.conv2d(flat, k.view(1, 1, 1, -1))
    flat = F.conv2d(flat, k.view(1, 1, -1, 1))
    return flat.reshape(-1, c, *u.shape[2:])


def corrupt(x: torch.Tensor, kind: str, severity: int, *, lo: float, hi: float,
            seed: int = 0) -> torch.Tensor:
    """A corrupted copy of the images ``x`` ``(N, C, H, W)``; see the module docstring.

    Args:
        x: preprocessed images.
        kind: one of :data:`KINDS`.
        severity: 1, 2 or 3.
        lo, hi: the preprocessed value of intensity 0 and 1 (the training images' min and max).
        seed: seed of the noise.
    """
    if kind not in LEVELS:
        raise ValueError(f"corrupt: unknown corruption {kind!r}; expected one of {KINDS}")
    if isinstance(severity, bool) or severity not in (1, 2, 3):
        raise ValueError(f"corrupt: expected severity 1, 2 or 3, got {severity!r}")
    if not (isinstance(x, torch.Tensor) and x.ndim == 4 and x.is_floating_point()):
        raise ValueError(f"corrupt: expected float images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"corrupt: expected finite lo < hi (the intensity range), got lo={lo!r}, hi={hi!r}")
    level = LEVELS[kind][severity - 1]
    u = (x.double() - lo) / (hi - lo)
    if kind == "gaussian_noise":
        g = torch.Generator().manual_seed(int(seed))
        u = u + level * torch.randn(u.shape, generator=g, dtype=u.dtype)
    elif kind == "contrast":
        mean = u.mean(dim=(1, 2, 3), keepdim=True)
        u = (u - mean) * level + mean
    elif kind == "brightness":
        u = u + level
    else:
        u = _blur(u, level)
    return (u.clamp(0.0, 1.0) * (hi - lo) + lo).to(x.dtype)
