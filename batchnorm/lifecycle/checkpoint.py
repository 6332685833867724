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
  ``channel_axis``, activation — a ``sha256`` of all tensor bytes **and of every other header
  entry** (format version 2; version-1 files, whose digest covers only the tensors, still load),
  JSON-serialisable ``get_extra_state()`` values (``extra_state``), and your own entries (``user.*``);
* **validation before any copy**: a truncated or corrupted file (bad header, bytes that do not match
  the digest), missing or unexpected keys, a shape or dtype that differs from the model, or BN
  conventions that differ from the model's layers raise a ValueError that lists every problem, and
  the model is left unchanged. Writes go to a temporary file that is renamed into place, so an
  interrupted save never leaves a half-written checkpoint under the target name — with the file
  properties ``open(path, "wb")`` would give: a new file gets ``0o666 & ~umask``, an overwritten one
  keeps its mode, a target you may not write is refused (PermissionError, nothing written), and a
  symlink is followed (its target is replaced, the link stays).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import _bnlayers

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "load_checkpoint", "read_checkpoint", "save_checkpoint"]

FORMAT = "batchnorm.checkpoint"  # the file-format tag of 0.1: never renamed with the module
FORMAT_VERSION = 2  # 2: the digest covers the header too
_CONVENTION_KEYS = ("eps", "running_var_unbiased", "channel_axis", "activation", "negative_slope")


@dataclass
class Checkpoint:
    """A checkpoint read and verified by :func:`read_checkpoint` (tensors on the CPU)."""

    tensors: dict[str, torch.Tensor]
    bn_conventions: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    format_version: int
    extra_state: dict[str, Any] = field(default_factory=dict)  # state_dict entries that are no tensors


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


def _digest(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str] | None = None) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes) and, from version 2, every header entry but
    the digest itself (canonical JSON), so a flipped bit in metadata or conventions is caught."""
    h = hashlib.sha256()
    if header is not None:
        rest = {k: v for k, v in header.items() if k != "sha256"}
        h.update(json.dumps(rest, sort_keys=True).encode() + b"|")
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
    state = model.state_dict()
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}  # get_extra_state()
    try:
        extra_json = json.dumps(extra, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: the state_dict entries {sorted(extra)} are not tensors (a module's "
                        f"get_extra_state()) and not JSON-serialisable ({e}); a safetensors checkpoint holds "
                        f"tensors and strings only: return plain JSON values from get_extra_state, or use "
                        f"torch.save") from None
    # clone: tied weights share storage, which safetensors refuses; each key gets its own copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if k not in extra}
    for k, t in tensors.items():
        if t.is_sparse or t.layout != torch.strided:
            raise ValueError(f"{op}: state_dict entry {k!r} is not a dense tensor ({t.layout}); safetensors "
                             f"stores dense tensors only")
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "bn_conventions": json.dumps(_bn_conventions(model), sort_keys=True),
        **({"extra_state": extra_json} if extra else {}),
        **{f"user.{k}": v for k, v in user.items()},
    }
    header["sha256"] = _digest(tensors, header)
    path = Path(os.path.realpath(path))  # a symlink: write its target, as open() would
    if path.is_dir():
        raise IsADirectoryError(f"{op}: {str(path)!r} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{op}: {str(path)!r} is not writable (mode "
                                  f"{path.stat().st_mode & 0o777:o}); torch.save and open() would refuse it "
                                  f"too: chmod u+w it or save elsewhere")
        mode = path.stat().st_mode & 0o7777
    else:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.chmod(tmp, mode)  # mkstemp makes 0600: give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint and verify its header and digest; raises ValueError for a bad file.

    Nothing is loaded into any model; see :func:`load_checkpoint`.
    """
    op = "read_checkpoint"
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no checkpoint file"
        raise FileNotFoundError(f"{op}: {what} at {str(path)!r}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{op}: {str(path)!r} exists but is not readable (mode "
                              f"{path.stat().st_mode & 0o777:o}); chmod u+r it")
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
    if header.get("sha256") != _digest(tensors, header if version >= 2 else None):
        covered = "tensor bytes or header entries do" if version >= 2 else "tensor bytes do"
        raise ValueError(f"{op}: {str(path)!r} is corrupted: its {covered} not match the sha256 digest "
                         f"in its header. Restore the file from a good copy")
    try:
        conventions = json.loads(header.get("bn_conventions", "{}"))
        extra = json.loads(header.get("extra_state", "{}"))
        if not isinstance(conventions, dict) or not isinstance(extra, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{op}: {str(path)!r} has an unreadable bn_conventions or extra_state entry in its "
                         f"header") from None
    bad = [p for name, entry in conventions.items() for p in _convention_problems(name, entry)]
    if bad:
        raise ValueError(f"{op}: {str(path)!r} has malformed bn_conventions: {'; '.join(bad[:10])}")
    user = {k[len("user."):]: v for k, v in header.items() if k.startswith("user.")}
    return Checkpoint(tensors=tensors, bn_conventions=conventions, metadata=user, format_version=version,
                      extra_state=extra)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key -> (test, what it must be) for one entry of bn_conventions (what _bn_conventions writes)
_CONVENTION_TYPES = {
    "class": (lambda v: isinstance(v, str), "a string"),
    "num_features": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "eps": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: v is None or _is_num(v), "null or a number"),
    "affine": (lambda v: isinstance(v, bool), "true or false"),
    "track_running_stats": (lambda v: isinstance(v, bool), "true or false"),
    "running_var_unbiased": (lambda v: isinstance(v, bool), "true or false"),
    "channel_axis": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "activation": (lambda v: isinstance(v, str), "a string"),
    "negative_slope": (lambda v: _is_num(v), "a number"),
}


def _convention_problems(name: str, entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return [f"layer {name!r}: expected an object, got {type(entry).__name__}"]
    out = [f"layer {name!r}: unknown key {k!r}" for k in entry if k not in _CONVENTION_TYPES]
    out += [f"layer {name!r}: missing {k!r}" for k in _CONVENTION_KEYS if k not in entry]
    out += [f"layer {name!r}: {k}={entry[k]!r} is not {what}" for k, (ok, what) in _CONVENTION_TYPES.items()
            if k in entry and not ok(entry[k])]
    return out


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
    meta = [k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise ValueError(f"{op}: {type(model).__name__} has tensors on the meta device ({meta[:3]}...), "
                         f"which hold no data: copying into them would silently do nothing. Allocate them "
                         f"first with model.to_empty(device='cpu'), then load")
    ckpt = read_checkpoint(path)
    own = model.state_dict()
    incoming = {**ckpt.tensors, **ckpt.extra_state}
    problems: list[str] = []
    missing = [k for k in own if k not in incoming]
    unexpected = [k for k in incoming if k not in own]
    if missing:
        problems.append(f"missing keys (in the model, not in the file): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not in the model): {unexpected}")
    for k, t in ckpt.tensors.items():
        if k not in own:
            continue
        if not isinstance(own[k], torch.Tensor):
            problems.append(f"{k}: a tensor in the file, extra state ({type(own[k]).__name__}) in the model")
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
        model.load_state_dict(incoming, strict=True)
    return dict(ckpt.metadata)
