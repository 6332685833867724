"""batchnorm: Batch Normalization as real software — exact, fast, observable.

The public surface is listed in ``__all__``. Importing the package loads torch and this package's
own small modules only; the numba kernels compile lazily on first use and the lab
(``batchnorm.lab``) is never imported from here.
"""

from . import functional, kernels, reference, stats
from .functional import (
    RunningStats,
    batch_norm,
    batch_norm_eval,
    batch_norm_train,
    moments,
    update_running_stats,
)
from .kernels import backend_for, get_backend, set_backend, use_backend
from .modules import (
    CONVENTIONS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "RunningStats",
    "backend_for",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_train",
    "functional",
    "get_backend",
    "kernels",
    "moments",
    "reference",
    "set_backend",
    "stats",
    "update_running_stats",
    "use_backend",
]
