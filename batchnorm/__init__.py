"""batchnorm: Batch Normalization as real software — exact, fast, observable.

The public surface is listed in ``__all__``. Importing the package loads torch and this package's
own small modules only; the numba kernels compile lazily on first use and the lab
(``batchnorm.lab``) is never imported from here.

Layout (imports only go down; see ``docs/architecture.md``)::

    lab/         experiments, data, report, CLI (never imported by the library)
    bench/       what ``batchnorm bench`` runs
    lifecycle/   recalibrate, freeze, fold, convert, checkpoint, conventions, onnx, diagnostics
    family/      renorm, ghost, inplace, sync, accumulate
    core/        functional, autograd + custom ops, modules
    kernels/     backend dispatch, numba CPU kernels, the torch composite reference
    stats.py, reference.py, _checks.py   the foundation every layer may import

The flat module paths of version 0.1 (``batchnorm.fold``, ``batchnorm.modules``, …) still import,
as aliases of the moved modules (:data:`_MOVED`), so user code and pickled models keep working.
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys

from . import kernels, reference, stats
from .core import functional
from .core.functional import (
    RunningStats,
    batch_norm,
    batch_norm_eval,
    batch_norm_train,
    moments,
    update_running_stats,
)
from .core.modules import (
    CONVENTIONS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)
from .core.residual import (
    BatchNormAddAct1d,
    BatchNormAddAct2d,
    BatchNormAddAct3d,
    batch_norm_add_act_eval,
    batch_norm_add_act_train,
)
from .family.accumulate import StatsAccumulator, accumulate_stats
from .family.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm_train
from .family.inplace import InPlaceABN1d, InPlaceABN2d, InPlaceABN3d, inplace_abn_eval, inplace_abn_train
from .family.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule, batch_renorm_train
from .family.sync import (
    SyncBatchNorm,
    SyncBatchNormError,
    SyncBatchNormJoinable,
    convert_sync_batchnorm,
    sync_join,
)
from .kernels import backend_for, get_backend, set_backend, use_backend
from .lifecycle.adapt import (
    AdaptationReport,
    LayerShift,
    OnlineAdaptation,
    TentResult,
    TentSession,
    adapt,
    adapt_step,
    configure_tent,
    tent,
)
from .lifecycle.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .lifecycle.conventions import export_convention, load_convention
from .lifecycle.convert import TimmBatchNormAct2d, convert_to_batchnorm, convert_to_torch, timm_norm_layer
from .lifecycle.diagnostics import BNDiagnostics, Watch, diagnose
from .lifecycle.fold import FoldWarning, find_foldable, fold_bn, fold_conv_bn
from .lifecycle.freeze import FrozenBatchNorm, freeze, unfreeze
from .lifecycle.fusers import register_fusers
from .lifecycle.recalibrate import RecalibrationReport, recalibrate
from .lifecycle.residual import (
    fuse_residual_blocks,
    fuse_sequential_activations,
    register_residual_block,
    residual_block_spec,
)
from .lifecycle.sync_stats import sync_running_stats

register_fusers()  # torch.ao.quantization.fuse_modules on our layers (torch has that table loaded already)

__version__ = "0.1.0"

#: Old flat module path (0.1) -> where the module lives now. ``import batchnorm.fold`` and pickles
#: that name ``batchnorm.modules.BatchNorm2d`` resolve to the same module objects as the new paths.
_MOVED = {
    "functional": "core.functional", "autograd": "core.autograd", "ops": "core.ops",
    "modules": "core.modules", "_bnlayers": "core._bnlayers",
    "renorm": "family.renorm", "ghost": "family.ghost", "inplace": "family.inplace", "sync": "family.sync",
    "recalibrate": "lifecycle.recalibrate", "freeze": "lifecycle.freeze", "fold": "lifecycle.fold",
    "convert": "lifecycle.convert", "checkpoint": "lifecycle.checkpoint",
    "conventions": "lifecycle.conventions", "onnx": "lifecycle.onnx", "diagnostics": "lifecycle.diagnostics",
    "benchmark": "bench.layers", "benchmark_inplace": "bench.inplace",
}


class _MovedModuleFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Resolves ``batchnorm.<old name>`` to the moved module, imported only when asked for."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head != __name__ or tail not in _MOVED:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = _importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system overwrites __spec__ with the alias's
        return module

    def exec_module(self, module):  # already executed under its new name; keep its own spec, so
        module.__spec__ = module.__spec__.loader_state  # relative imports inside it still resolve


if not any(isinstance(f, _MovedModuleFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder())
# Modules this file has imported anyway are aliased now: a first ``import batchnorm.recalibrate``
# must not make the import system set ``batchnorm.recalibrate`` (the function) to the module.
for _old, _new in _MOVED.items():
    if f"{__name__}.{_new}" in _sys.modules:
        _sys.modules.setdefault(f"{__name__}.{_old}", _sys.modules[f"{__name__}.{_new}"])


def __getattr__(name: str):
    # ``batchnorm.onnx.export(...)`` and other old module attributes (the functions ``freeze`` and
    # ``recalibrate`` keep their names: a module attribute is only looked up when nothing else is).
    if name in _MOVED:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONVENTIONS",
    "AdaptationReport",
    "BNDiagnostics",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormAddAct1d",
    "BatchNormAddAct2d",
    "BatchNormAddAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FoldWarning",
    "FrozenBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "LayerShift",
    "OnlineAdaptation",
    "RecalibrationReport",
    "RenormSchedule",
    "RunningStats",
    "StatsAccumulator",
    "SyncBatchNorm",
    "SyncBatchNormError",
    "SyncBatchNormJoinable",
    "TentResult",
    "TentSession",
    "TimmBatchNormAct2d",
    "Watch",
    "accumulate_stats",
    "adapt",
    "adapt_step",
    "backend_for",
    "batch_norm",
    "batch_norm_add_act_eval",
    "batch_norm_add_act_train",
    "batch_norm_eval",
    "batch_norm_train",
    "batch_renorm_train",
    "configure_tent",
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
    "fuse_residual_blocks",
    "fuse_sequential_activations",
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
    "register_fusers",
    "register_residual_block",
    "residual_block_spec",
    "save_checkpoint",
    "set_backend",
    "stats",
    "sync_join",
    "sync_running_stats",
    "tent",
    "timm_norm_layer",
    "unfreeze",
    "update_running_stats",
    "use_backend",
]
