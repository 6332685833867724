"""batchnorm: Batch Normalization as real software — exact, fast, observable.

The public surface is listed in ``__all__``. Importing the package loads torch and this package's
own small modules only; the numba kernels compile lazily on first use and the lab
(``batchnorm.lab``) is never imported from here.
"""

from . import functional, kernels, reference, stats
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .conventions import export_convention, load_convention
from .convert import convert_to_batchnorm, convert_to_torch
from .diagnostics import BNDiagnostics, Watch, diagnose
from .fold import find_foldable, fold_bn, fold_conv_bn
from .freeze import FrozenBatchNorm, freeze, unfreeze
from .functional import (
    RunningStats,
    batch_norm,
    batch_norm_eval,
    batch_norm_train,
    moments,
    update_running_stats,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm_train
from .inplace import InPlaceABN1d, InPlaceABN2d, InPlaceABN3d, inplace_abn_eval, inplace_abn_train
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
from .recalibrate import RecalibrationReport, recalibrate
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule, batch_renorm_train
from .sync import SyncBatchNorm, SyncBatchNormError, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "BNDiagnostics",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "RecalibrationReport",
    "RenormSchedule",
    "RunningStats",
    "SyncBatchNorm",
    "SyncBatchNormError",
    "Watch",
    "backend_for",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_train",
    "batch_renorm_train",
    "convert_sync_batchnorm",
    "convert_to_batchnorm",
    "convert_to_torch",
    "diagnose",
    "export_convention",
    "find_foldable",
    "fold_bn",
    "fold_conv_bn",
    "freeze",
    "functional",
    "get_backend",
    "ghost_batch_norm_train",
    "inplace_abn_eval",
    "inplace_abn_train",
    "kernels",
    "load_checkpoint",
    "load_convention",
    "moments",
    "read_checkpoint",
    "recalibrate",
    "reference",
    "save_checkpoint",
    "set_backend",
    "stats",
    "unfreeze",
    "update_running_stats",
    "use_backend",
]
