"""Save and load model weights *with* the BN running statistics, in the safetensors format.

Why not ``torch.save``: a ``.pt`` file is a pickle, and unpickling runs code from the file. A
safetensors file is a JSON header plus raw tensor bytes; loading it executes nothing
(https://github.com/huggingface/safetensors). Why not bare ``safetensors.torch.save_file``: BN
statistics are easy to lose or mix up, so this module adds

* **everything in** ``model.state_dict()``: parameters and buffers — ``running_mean``,
  ``running_var``, ``num_batches_tracked`` of every BN layer;
* **metadata in the header** (string values, as safetensors requires): ``format`` =
  ``"batchnorm.checkpoint"``, ``format_version`` (currently ``"1"``), ``bn_conventions`` — a JSON
  object giving, per BN layer, its class, ``eps``, ``momentum``, ``running_var_unbiased``,
  ``channel_axis``, activation — a ``sha256`` of all tensor bytes, and your own entries (``user.*``);
* **validation before any copy**: a truncated or corrupted file (bad header, bytes that do not match
  the digest), missing or unexpected keys, a shape or dtype that differs from the model, or BN
  conventions that differ from the model's layers raise a ValueError that lists every problem, and
  the model is left unchanged. Writes go to a temporary file that is renamed into place, so an
  interrupted save never leaves a half-written checkpoint under the target name.

Example:
    >>> save_checkpoint(model, "model.safetensors", metadata={"epoch": "12"})
    >>> load_checkpoint(model, "model.safetensors")
    {'epoch': '12'}

The files are ordinary safetensors files: ``safetensors.torch.load_file`` reads them too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

FORMAT = "batchnorm.checkpoint"  # the file-format tag of 0.1: never renamed with the module
FORMAT_VERSION = 1
_CONVENTION_KEYS = ("eps", "running_var_unbiased", "channel_axis", "activation", "negative_slope")


@dataclass
class Checkpoint:
    """A checkpoint read and verified by :func:`read_checkpoint` (tensors on the CPU)."""

    tensors: dict[str, torch.Tensor]
    bn_conventions: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    format_version: int


def _bn_conventions(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for name, m in _bnlayers.iter_bn(model):
        act, slope = _bnlayers.activation(m)
        out[name] = {
            "class": f"{type(m).__module__}.{type(m).__qualname__}",
            "num_features": int(m.num_features),
            "eps": float(m.eps),
            "momentum": getattr(m, "momentum", None),
            "affine": bool(m.affine),
            "track_running_stats": getattr(m, "running_mean", None) is not None,
            "running_var_unbiased": _bnlayers.running_var_unbiased(m),
            "channel_axis": _bnlayers.channel_axis(m),
            "activation": act,
            "negative_slope": slope,
        }
    return out


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{t.dtype!s}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
                    ) -> None:
    """Write ``model.state_dict()`` (weights and BN running statistics) to a safetensors file.

    Args:
        model: any ``nn.Module``.
        path: the file to write (replaced atomically if it exists).
        metadata: your own string entries for the header (e.g. ``{"epoch": "12"}``); returned by
            :func:`load_checkpoint`.
    """
    op = "save_checkpoint"
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    user = dict(metadata or {})
    for k, v in user.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{op}: metadata must map str to str (the safetensors header holds strings), got "
                            f"{k!r}: {type(v).__name__}; convert values with str() or json.dumps()")
    # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for k, t in tensors.items():
        if t.is_sparse or t.layout != torch.strided:
            raise ValueError(f"{op}: state_dict entry {k!r} is not a dense tensor ({t.layout}); safetensors "
                             f"stores dense tensors only")
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "bn_conventions": json.dumps(_bn_conventions(model), sort_keys=True),
        "sha256": _digest(tensors),
        **{f"user.{k}": v for k, v in user.items()},
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint and verify its header and digest; raises ValueError for a bad file.

    Nothing is loaded into any model; see :func:`load_checkpoint`.
    """
    op = "read_checkpoint"
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{op}: no checkpoint file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except SafetensorError as e:
        raise ValueError(f"{op}: {str(path)!r} is not a readable safetensors file ({e}); the file is "
                         f"truncated or corrupted, or not a checkpoint. Re-save it with save_checkpoint"
                         ) from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{op}: {str(path)!r} is a safetensors file but not a batchnorm checkpoint (header "
                         f"format={header.get('format')!r}, expected {FORMAT!r}); load plain safetensors "
                         f"files with safetensors.torch.load_file and model.load_state_dict")
    try:
        version = int(header.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{op}: {str(path)!r} has an invalid format_version "
                         f"{header.get('format_version')!r}") from None
    if version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{op}: {str(path)!r} has format_version {version}, this version of batchnorm reads "
                         f"1..{FORMAT_VERSION}; upgrade the batchnorm package")
    if header.get("sha256") != _digest(tensors):
        raise ValueError(f"{op}: {str(path)!r} is corrupted: its tensor bytes do not match the sha256 digest "
                         f"in its header. Restore the file from a good copy")
    try:
        conventions = json.loads(header.get("bn_conventions", "{}"))
        if not isinstance(conventions, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{op}: {str(path)!r} has an unreadable bn_conventions entry in its header"
                         ) from None
    user = {k[len("user."):]: v for k, v in header.items() if k.startswith("user.")}
    return Checkpoint(tensors=tensors, bn_conventions=conventions, metadata=user, format_version=version)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, check_conventions: bool = True
                    ) -> dict[str, str]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``; returns the user metadata.

    Everything is checked before anything is copied: the file (see :func:`read_checkpoint`), the keys
    (none missing, none unexpected), each tensor's shape and dtype (no silent casts: convert the
    model with ``model.to(dtype)`` first if you mean to), and — with ``check_conventions`` — that every
    BN layer's ``eps``, ``running_var_unbiased``, ``channel_axis`` and activation match those stored
    (a biased running variance loaded into a layer that expects an unbiased one would silently change
    further training; a different ``eps`` changes the outputs). On any problem a ValueError lists them
    all and the model is unchanged. Tensors are copied onto the model's devices.
    """
    op = "load_checkpoint"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    ckpt = read_checkpoint(path)
    own = model.state_dict()
    problems: list[str] = []
    missing = [k for k in own if k not in ckpt.tensors]
    unexpected = [k for k in ckpt.tensors if k not in own]
    if missing:
        problems.append(f"missing keys (in the model, not in the file): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not in the model): {unexpected}")
    for k, t in ckpt.tensors.items():
        if k not in own:
            continue
        if tuple(t.shape) != tuple(own[k].shape):
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, {tuple(own[k].shape)} in the model")
        elif t.dtype != own[k].dtype:
            problems.append(f"{k}: dtype {t.dtype} in the file, {own[k].dtype} in the model")
    if check_conventions:
        mine = _bn_conventions(model)
        for name, conv in mine.items():
            stored = ckpt.bn_conventions.get(name)
            if stored is None:
                continue  # a layer the file knows under no BN entry: its keys were checked above
            for key in _CONVENTION_KEYS:
                if key in stored and not _same(stored[key], conv[key]):
                    problems.append(f"BN layer {name or '<model>'}: {key}={stored[key]!r} in the file, "
                                    f"{conv[key]!r} in the model")
    if problems:
        more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        shown = "; ".join(problems[:20]) + more
        fix = (" (the BN conventions differ: build the model with the stored settings, or pass "
               "check_conventions=False to load the numbers anyway)" if any("BN layer" in p for p in problems)
               else "")
        raise ValueError(f"{op}: {str(path)!r} does not fit {type(model).__name__}, nothing was loaded: "
                         f"{shown}{fix}")
    with torch.no_grad():
        model.load_state_dict(ckpt.tensors, strict=True)
    return dict(ckpt.metadata)
