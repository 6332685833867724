"""Data for the lab: the bundled handwritten digits, and MNIST / Fashion-MNIST from IDX files.

Nothing is downloaded. The default is scikit-learn's bundled digits (1,797 8×8 grey images, 10
classes, values 0–16), split once into a stratified train/test set with a fixed seed. MNIST and
Fashion-MNIST come from the IDX files the user points to (``--data``): a directory with the
standard names, or explicit files::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]     (also train-images.idx3-ubyte)
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

IDX layout (LeCun's format): 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
big-endian uint32, then the values big-endian in C order. :func:`read_idx` checks every part and
raises :class:`IdxFormatError` saying what is wrong and how to fix it. gzip is recognised by its
content, whatever the file name.

Every loader returns a :class:`Dataset` whose images are preprocessed with per-channel statistics
of the *training* images (:mod:`batchnorm.lab.preprocessing`), computed in one streaming pass.

Example:
    >>> ds = load_dataset()                       # digits, z-score
    >>> ds.x_train.shape, ds.num_classes
    (torch.Size([1347, 1, 8, 8]), 10)
    >>> ds = load_dataset("~/data/mnist", max_train=10000)
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .preprocessing import ChannelStats, channel_stats, normalize

__all__ = [
    "IDX_DTYPES",
    "Dataset",
    "IdxFormatError",
    "find_idx_files",
    "iter_idx",
    "load_dataset",
    "load_digits_arrays",
    "load_idx_dataset",
    "read_idx",
    "read_idx_header",
    "stratified_split",
    "write_idx",
]

#: IDX type code -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_FOR_KIND = {("u", 1): 0x08, ("i", 1): 0x09, ("i", 2): 0x0B, ("i", 4): 0x0C,
                  ("f", 4): 0x0D, ("f", 8): 0x0E}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """A file is not a well-formed IDX file (the message says which part and how to fix it)."""


# -- IDX ----------------------------------------------------------------------------------------
def _open(path: str | os.PathLike) -> BinaryIO:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"read_idx: no such file {str(p)!r}; point --data at a directory with the "
                                f"standard MNIST file names or at explicit IDX files")
    with open(p, "rb") as f:
        head = f.read(2)
    if head == _GZIP_MAGIC:
        return gzip.open(p, "rb")  # type: ignore[return-value]
    return open(p, "rb")  # handed to the caller, who closes it


_DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError; bad deflate data: zlib
_GZIP_MAX_RATIO = 1032  # deflate cannot expand more than ~1032:1: what a .gz of n bytes can hold
_MAX_NDIM = 64  # NumPy's limit on dimensions
_CHUNK = 16 << 20  # read in pieces: a lying header must not make us allocate what it declares


def _capacity(path: str | os.PathLike) -> tuple[int, str]:
    """Most payload bytes the file at ``path`` can hold, and how that was judged (for messages)."""
    p = Path(path).expanduser()
    size = p.stat().st_size
    with open(p, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    if gz:
        most = size * _GZIP_MAX_RATIO
        return most, f"a {size}-byte .gz file decompresses to at most {most}"
    return size, f"the file has {size} bytes"


def _declared_bytes(name: str, dtype: np.dtype, shape: tuple[int, ...], capacity: tuple[int, str]) -> int:
    """The payload size the header declares (exact Python ints: no int64 overflow), bounded by what
    the file can really hold — checked before anything of that size is allocated."""
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if expected > capacity[0]:
        raise IdxFormatError(f"read_idx: {name}: truncated payload or corrupt header: dimensions {shape} of "
                             f"{dtype.name} need {expected} bytes of data, but {capacity[1]}; re-copy or "
                             f"re-download the file")
    return expected


def _read_up_to(f: BinaryIO, n: int, name: str) -> bytes:
    parts, left = [], n
    try:
        while left > 0:
            part = f.read(min(left, _CHUNK))
            if not part:
                break
            parts.append(part)
            left -= len(part)
    except _DECOMPRESS_ERRORS as e:
        raise IdxFormatError(f"read_idx: {name}: cannot decompress ({type(e).__name__}: {e}); the .gz file "
                             f"is damaged or cut off: re-copy or re-download it") from None
    return b"".join(parts)


def read_idx_header(f: BinaryIO, name: str = "<stream>") -> tuple[np.dtype, tuple[int, ...]]:
    """Read and check the magic number and dimensions; leaves ``f`` at the first value."""
    try:
        magic = f.read(4)
    except _DECOMPRESS_ERRORS as e:  # broken gzip stream
        raise IdxFormatError(f"read_idx: {name}: cannot decompress ({e}); the .gz file is damaged") from None
    if len(magic) < 4:
        raise IdxFormatError(f"read_idx: {name}: truncated header: expected 4 magic bytes, got {len(magic)}; "
                             f"the file is empty or cut off")
    if magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(f"read_idx: {name}: wrong magic number 0x{magic.hex()}: an IDX file starts with "
                             f"two zero bytes (e.g. 0x00000803 for MNIST images); this is not an IDX file")
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({IDX_DTYPES[c].name})" for c in IDX_DTYPES)
        raise IdxFormatError(f"read_idx: {name}: unknown data type code 0x{code:02X} in the magic number "
                             f"0x{magic.hex()}; expected one of {known}")
    if ndim == 0:
        raise IdxFormatError(f"read_idx: {name}: the magic number 0x{magic.hex()} declares 0 dimensions; "
                             f"expected at least 1 (labels: 1, images: 3)")
    if ndim > _MAX_NDIM:
        raise IdxFormatError(f"read_idx: {name}: the magic number 0x{magic.hex()} declares {ndim} "
                             f"dimensions; at most {_MAX_NDIM} can be read (NumPy's limit; images have 3, "
                             f"labels 1): the header is corrupt")
    try:
        raw = f.read(4 * ndim)
    except _DECOMPRESS_ERRORS as e:
        raise IdxFormatError(f"read_idx: {name}: cannot decompress ({e}); the .gz file is damaged") from None
    if len(raw) < 4 * ndim:
        raise IdxFormatError(f"read_idx: {name}: truncated header: {ndim} dimensions need {4 * ndim} bytes, "
                             f"got {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
    return IDX_DTYPES[code], shape


def _payload_error(name: str, dtype: np.dtype, shape: tuple[int, ...], expected: int,
                   got: int) -> IdxFormatError:
    if got < expected:
        return IdxFormatError(f"read_idx: {name}: truncated payload: dimensions {shape} of {dtype.name} "
                              f"need {expected} bytes of data, the file has {got}; the file is cut off "
                              f"(re-copy or re-download it)")
    return IdxFormatError(f"read_idx: {name}: the dimensions {shape} of {dtype.name} do not match the "
                          f"payload size: they need {expected} bytes, the file has {got} "
                          f"({got - expected} extra); the header or the type code is wrong")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a whole IDX file (raw or gzip) into a native-endian numpy array, checking its format.

    Raises:
        IdxFormatError: wrong magic, unknown type code, truncated header or payload, or dimensions
            that do not match the payload size.
        FileNotFoundError: no such file.
    """
    name = str(path)
    with _open(path) as f:
        dtype, shape = read_idx_header(f, name)
        expected = _declared_bytes(name, dtype, shape, _capacity(path))
        payload = _read_up_to(f, expected + 1, name)
    if len(payload) != expected:
        got = len(payload)
        if got > expected:  # count the whole surplus for the message (bounded: the file's own size)
            with _open(path) as f:
                read_idx_header(f, name)
                got = expected
                while chunk := _read_up_to(f, _CHUNK, name):
                    got += len(chunk)
                got -= expected
        raise _payload_error(name, dtype, shape, expected, got)
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def iter_idx(path: str | os.PathLike, chunk_size: int = 4096) -> Iterator[np.ndarray]:
    """Yield an IDX file's records ``chunk_size`` at a time (memory: one chunk), checking the format.

    The file is checked as it streams: a short final read raises :class:`IdxFormatError`
    (truncated payload), as do trailing bytes after the last record.
    """
    name = str(path)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"iter_idx: expected chunk_size to be a positive int, got {chunk_size!r}")
    with _open(path) as f:
        dtype, shape = read_idx_header(f, name)
        expected = _declared_bytes(name, dtype, shape, _capacity(path))
        rec = expected // shape[0] if shape[0] else 0
        seen = 0
        for start in range(0, shape[0], chunk_size):
            k = min(chunk_size, shape[0] - start)
            buf = _read_up_to(f, k * rec, name)
            seen += len(buf)
            if len(buf) < k * rec:
                raise _payload_error(name, dtype, shape, expected, seen)
            yield np.frombuffer(buf, dtype=dtype).reshape((k, *shape[1:])).astype(dtype.newbyteorder("="))
        extra = len(_read_up_to(f, _CHUNK, name))
        if extra:
            raise _payload_error(name, dtype, shape, expected, expected + extra)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip if the name ends in ``.gz``); returns the path.

    The type code follows the dtype: uint8, int8, int16, int32, float32, float64.
    """
    a = np.asarray(array)
    key = (a.dtype.kind, a.dtype.itemsize)
    if key not in _CODE_FOR_KIND:
        raise TypeError(f"write_idx: IDX has no type code for dtype {a.dtype}; cast to one of uint8, int8, "
                        f"int16, int32, float32, float64")
    if a.ndim == 0 or a.ndim > 255:
        raise ValueError(f"write_idx: expected an array with 1 to 255 dimensions, got {a.ndim}")
    head = bytes([0, 0, _CODE_FOR_KIND[key], a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder(">")).tobytes()
    p = Path(path)
    if p.suffix == ".gz":
        with gzip.open(p, "wb") as f:
            f.write(head + body)
    else:
        p.write_bytes(head + body)
    return p


# -- data sets ---------------------------------------------------------------------------------
@dataclass
class Dataset:
    """A preprocessed, split image-classification data set.

    Attributes:
        name: "digits", "mnist" (any IDX set), ...
        x_train, x_test: float32 ``(N, C, H, W)`` preprocessed with ``stats`` of the training images.
        y_train, y_test: int64 ``(N,)`` class indices.
        num_classes: number of classes.
        preprocessing: "zscore", "minmax", "mean" or "none".
        stats: the per-channel training statistics used (JSON-ready dict).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    preprocessing: str = "zscore"
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def in_features(self) -> int:
        return int(np.prod(self.image_shape))

    def info(self) -> dict[str, Any]:
        """JSON-ready description (for results.json)."""
        return {"name": self.name, "n_train": int(self.x_train.shape[0]), "n_test": int(self.x_test.shape[0]),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "preprocessing": self.preprocessing, "stats": self.stats}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images ``(1797, 1, 8, 8)`` float64 in [0, 16], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images[:, None].astype(np.float64), d.target.astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/test index arrays with each class split in the same proportion (fixed ``seed``)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"stratified_split: expected 0 < test_fraction < 1, got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _as_images(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim in (3, 4):
        if a.shape[0] == 0:
            raise IdxFormatError(f"load_idx_dataset: {name}: holds 0 images (shape {a.shape}); a data set "
                                 f"needs at least one record per file")
        if 0 in a.shape[1:]:
            raise IdxFormatError(f"load_idx_dataset: {name}: images of shape {a.shape[1:]} have no pixels; "
                                 f"the header's dimensions are wrong")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise IdxFormatError(f"load_idx_dataset: {name}: {bad} pixel value(s) are NaN or infinite; clean "
                                 f"the images (e.g. np.nan_to_num) before writing the IDX file")
        return a[:, None] if a.ndim == 3 else a
    raise IdxFormatError(f"load_idx_dataset: {name}: expected images of 3 dimensions (N, H, W) or 4 "
                         f"(N, C, H, W), got {a.ndim} dimensions {a.shape}; is this a labels file?")


def _check_labels(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 1:
        raise IdxFormatError(f"load_idx_dataset: {name}: expected labels of 1 dimension (N,), got shape "
                             f"{a.shape}; is this an images file?")
    if a.dtype.kind not in "iu":
        raise IdxFormatError(f"load_idx_dataset: {name}: expected integer labels, got dtype {a.dtype}")
    if a.size == 0:
        raise IdxFormatError(f"load_idx_dataset: {name}: holds 0 labels; a data set needs at least one "
                             f"record")
    if a.min() < 0:
        raise IdxFormatError(f"load_idx_dataset: {name}: labels must be >= 0, found {int(a.min())}")
    if a.max() >= MAX_CLASSES:
        raise IdxFormatError(f"load_idx_dataset: {name}: found label {int(a.max())}, but labels are class "
                             f"indices 0..C-1 and the lab builds one output per class (at most "
                             f"{MAX_CLASSES}); the labels file is corrupt or not a labels file")
    return a.astype(np.int64)


#: Largest number of classes a labels file may imply (a label of 2e9 would mean a 2e9-way classifier).
MAX_CLASSES = 1 << 16


_STANDARD = {
    "train_images": ("train-images",),
    "train_labels": ("train-labels",),
    "test_images": ("t10k-images", "test-images"),
    "test_labels": ("t10k-labels", "test-labels"),
}


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The four standard MNIST/Fashion-MNIST files in ``directory`` (raw or .gz, '-' or '.' before idx)."""
    d = Path(directory).expanduser()
    found: dict[str, Path] = {}
    files = sorted(p for p in d.iterdir() if p.is_file())
    for key, prefixes in _STANDARD.items():
        for p in files:
            stem = p.name.replace(".", "-")
            if any(stem.startswith(pre + "-idx") for pre in prefixes):
                found.setdefault(key, p)
    missing = [k for k in _STANDARD if k not in found]
    if missing:
        names = ", ".join(f"{_STANDARD[k][0]}-idx{3 if 'images' in k else 1}-ubyte[.gz]" for k in missing)
        raise FileNotFoundError(f"load_dataset: {str(d)!r} lacks {names}; put the four standard MNIST files "
                                f"there or pass explicit files: "
                                f"--data TRAIN_IMAGES,TRAIN_LABELS[,TEST_IMAGES,TEST_LABELS]")
    return found


def load_idx_dataset(files: dict[str, Path] | list[str | os.PathLike], *, name: str = "idx",
                     preprocessing: str = "zscore", max_train: int | None = None, max_test: int | None = None,
                     chunk_size: int = 8192, seed: int = 0) -> Dataset:
    """Load an IDX data set from the 4 standard files, or from ``[train_images, train_labels]``
    (a stratified 25 % test split is then made with ``seed``) or ``[..., test_images, test_labels]``.

    The preprocessing statistics stream over the training images file ``chunk_size`` records at a
    time (:func:`iter_idx`), so they never need the data set in one piece.
    """
    if isinstance(files, dict):
        paths = [files["train_images"], files["train_labels"], files["test_images"], files["test_labels"]]
    else:
        paths = [Path(p).expanduser() for p in files]
    if len(paths) not in (2, 4):
        raise ValueError(f"load_idx_dataset: expected 2 files (images, labels) or 4 (train images, train "
                         f"labels, test images, test labels), got {len(paths)}")
    xs = _as_images(read_idx(paths[0]), str(paths[0]))
    ys = _check_labels(read_idx(paths[1]), str(paths[1]))
    if xs.shape[0] != ys.shape[0]:
        raise IdxFormatError(f"load_idx_dataset: {paths[0]} holds {xs.shape[0]} images but {paths[1]} holds "
                             f"{ys.shape[0]} labels; the counts must match (wrong pair of files?)")
    if len(paths) == 4:
        xt = _as_images(read_idx(paths[2]), str(paths[2]))
        yt = _check_labels(read_idx(paths[3]), str(paths[3]))
        if xt.shape[0] != yt.shape[0]:
            raise IdxFormatError(f"load_idx_dataset: {paths[2]} holds {xt.shape[0]} images but {paths[3]} "
                                 f"holds {yt.shape[0]} labels; the counts must match (wrong pair of files?)")
        if xt.shape[1:] != xs.shape[1:]:
            raise IdxFormatError(f"load_idx_dataset: train images are {xs.shape[1:]} but test images are "
                                 f"{xt.shape[1:]}; they must have the same shape")
        stats = None
        if max_train is None:  # stream the statistics straight from the file, one chunk in memory
            stats = channel_stats(_as_images(c, str(paths[0])) for c in iter_idx(paths[0], chunk_size))
    else:
        tr, te = stratified_split(ys, 0.25, seed)
        xs, ys, xt, yt = xs[tr], ys[tr], xs[te], ys[te]
        stats = None
    num_classes = int(max(ys.max(initial=0), yt.max(initial=0))) + 1
    return _finish(name, xs, ys, xt, yt, num_classes, preprocessing, max_train, max_test, chunk_size, seed,
                   stats)


def _finish(name: str, xs: np.ndarray, ys: np.ndarray, xt: np.ndarray, yt: np.ndarray, num_classes: int,
            preprocessing: str, max_train: int | None, max_test: int | None, chunk_size: int, seed: int,
            stats: ChannelStats | None) -> Dataset:
    rng = np.random.default_rng(seed)
    if max_train is not None and max_train < len(ys):
        keep = np.sort(rng.permutation(len(ys))[:max_train])
        xs, ys, stats = xs[keep], ys[keep], None
    if max_test is not None and max_test < len(yt):
        keep = np.sort(rng.permutation(len(yt))[:max_test])
        xt, yt = xt[keep], yt[keep]
    if stats is None:
        stats = channel_stats(xs, chunk_size)
    return Dataset(name=name, x_train=normalize(xs, stats, preprocessing), y_train=torch.from_numpy(ys),
                   x_test=normalize(xt, stats, preprocessing), y_test=torch.from_numpy(yt),
                   num_classes=num_classes, preprocessing=preprocessing, stats=stats.to_json())


def load_dataset(spec: str | os.PathLike | None = None, *, preprocessing: str = "zscore",
                 max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> Dataset:
    """The lab's data: ``None``/``"digits"`` for the bundled digits, else a directory of standard IDX
    files, or explicit files ``"train_images,train_labels[,test_images,test_labels]"``.

    Args:
        spec: what ``--data`` says.
        preprocessing: "zscore" (default), "minmax", "mean" or "none" (per-channel training stats).
        max_train, max_test: keep a random subset of this size (fixed ``seed``), e.g. to fit a budget.
        seed: seed of the digits split and of the subsets.
    """
    if spec is None or str(spec) == "digits":
        x, y = load_digits_arrays()
        tr, te = stratified_split(y, 0.25, seed)
        return _finish("digits", x[tr], y[tr], x[te], y[te], 10, preprocessing, max_train, max_test, 4096,
                       seed, None)
    s = str(spec)
    parts = [p for p in s.split(",") if p]
    if len(parts) == 1 and Path(parts[0]).expanduser().is_dir():
        d = Path(parts[0]).expanduser()
        name = "fashion-mnist" if "fashion" in d.name.lower() else "mnist"
        return load_idx_dataset(find_idx_files(d), name=name, preprocessing=preprocessing,
                                max_train=max_train, max_test=max_test, seed=seed)
    if len(parts) in (2, 4):
        return load_idx_dataset(parts, name="idx", preprocessing=preprocessing, max_train=max_train,
                                max_test=max_test, seed=seed)
    raise FileNotFoundError(f"load_dataset: --data {s!r} is neither 'digits', a directory with the standard "
                            f"MNIST files, nor 2 or 4 comma-separated IDX files "
                            f"(TRAIN_IMAGES,TRAIN_LABELS[,TEST_IMAGES,TEST_LABELS])")
