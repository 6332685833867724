"""The lab's IDX reader/writer and data loading: round trips, every malformed-file error, data sets."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from batchnorm.lab.data import (
    IdxFormatError,
    find_idx_files,
    iter_idx,
    load_dataset,
    load_idx_dataset,
    read_idx,
    write_idx,
)

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype, shape=(7, 5, 3)):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_type_code(tmp_path, dtype, gz):
    a = _sample(dtype)
    p = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(b, a)
    chunks = list(iter_idx(p, chunk_size=3))
    assert [c.shape[0] for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), a)


def test_header_bytes_are_lecun_format(tmp_path):
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    raw = write_idx(tmp_path / "h.idx", a).read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 2])
    assert struct.unpack(">II", raw[4:12]) == (2, 3)
    assert raw[12:14] == b"\x00\x00" and raw[14:16] == b"\x00\x01"  # big-endian values
    assert len(raw) == 12 + 6 * 2


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    a = _sample(np.uint8, (4, 2, 2))
    p = write_idx(tmp_path / "x.idx.gz", a)
    q = tmp_path / "renamed-idx3-ubyte"
    q.write_bytes(p.read_bytes())
    np.testing.assert_array_equal(read_idx(q), a)


def test_one_dimensional_labels(tmp_path):
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "y", y)), y)


# -- malformed files --------------------------------------------------------------------------
def _good(tmp_path, gz=False):
    a = _sample(np.uint8, (4, 3, 3))
    return write_idx(tmp_path / ("g.idx" + (".gz" if gz else "")), a), a


def _write_raw(path, data, gz=False):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic(tmp_path, gz):
    p, _ = _good(tmp_path)
    data = b"\x01\x02" + p.read_bytes()[2:]
    bad = _write_raw(tmp_path / "bad", data, gz)
    with pytest.raises(IdxFormatError, match=r"wrong magic number 0x0102.*not an IDX file"):
        read_idx(bad)


def test_wrong_dtype_code(tmp_path):
    p, _ = _good(tmp_path)
    data = bytearray(p.read_bytes())
    data[2] = 0x0A
    bad = _write_raw(tmp_path / "bad", bytes(data))
    with pytest.raises(IdxFormatError, match=r"unknown data type code 0x0A.*0x08 \(uint8\)"):
        read_idx(bad)
    with pytest.raises(IdxFormatError, match="unknown data type code"):
        next(iter_idx(bad))


def test_zero_dimensions(tmp_path):
    bad = _write_raw(tmp_path / "bad", bytes([0, 0, 8, 0]))
    with pytest.raises(IdxFormatError, match="declares 0 dimensions"):
        read_idx(bad)


@pytest.mark.parametrize("cut", [0, 3, 6, 10])
def test_truncated_header(tmp_path, cut):
    p, _ = _good(tmp_path)
    bad = _write_raw(tmp_path / "bad", p.read_bytes()[:cut])
    with pytest.raises(IdxFormatError, match="truncated header"):
        read_idx(bad)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    p, _ = _good(tmp_path)
    data = p.read_bytes()[:-5]
    bad = _write_raw(tmp_path / "bad", data, gz)
    msg = r"truncated payload: dimensions \(4, 3, 3\) of uint8 need 36 bytes.*has 31"
    with pytest.raises(IdxFormatError, match=msg):
        read_idx(bad)
    with pytest.raises(IdxFormatError, match="truncated payload"):
        list(iter_idx(bad, chunk_size=2))


def test_truncated_gzip_stream(tmp_path):
    p, _ = _good(tmp_path, gz=True)
    bad = tmp_path / "cut.gz"
    bad.write_bytes(p.read_bytes()[:-12])  # cuts the gzip trailer / deflate stream
    with pytest.raises(IdxFormatError, match=r"damaged|truncated"):
        read_idx(bad)


def test_dims_do_not_match_payload(tmp_path):
    p, _ = _good(tmp_path)
    bad = _write_raw(tmp_path / "bad", p.read_bytes() + b"\x00" * 7)
    with pytest.raises(IdxFormatError, match=r"do not match the payload size.*7 extra"):
        read_idx(bad)
    with pytest.raises(IdxFormatError, match="do not match the payload size"):
        list(iter_idx(bad))


def test_wrong_dtype_code_for_payload_is_a_size_mismatch(tmp_path):
    # a float32 file relabelled as float64 needs twice the bytes: reported as truncated
    a = np.ones((4, 2), dtype=np.float32)
    data = bytearray(write_idx(tmp_path / "f", a).read_bytes())
    data[2] = 0x0E
    bad = _write_raw(tmp_path / "bad", bytes(data))
    with pytest.raises(IdxFormatError, match=r"truncated payload.*float64"):
        read_idx(bad)


def test_missing_file_and_unwritable_dtype(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_idx(tmp_path / "nope")
    with pytest.raises(TypeError, match="no type code for dtype uint16"):
        write_idx(tmp_path / "u16", np.zeros(3, dtype=np.uint16))
    assert not (tmp_path / "u16").exists()


def test_bad_chunk_size(tmp_path):
    p, _ = _good(tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_idx(p, chunk_size=0))


# -- data sets ----------------------------------------------------------------------------------
def _mnist_dir(tmp_path, n_train=40, n_test=20, size=12, gz=True, sep="-"):
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()
    ext = ".gz" if gz else ""
    xtr = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    ytr = (np.arange(n_train) % 10).astype(np.uint8)
    xte = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    yte = (np.arange(n_test) % 10).astype(np.uint8)
    write_idx(d / f"train-images{sep}idx3-ubyte{ext}", xtr)
    write_idx(d / f"train-labels{sep}idx1-ubyte{ext}", ytr)
    write_idx(d / f"t10k-images{sep}idx3-ubyte{ext}", xte)
    write_idx(d / f"t10k-labels{sep}idx1-ubyte{ext}", yte)
    return d, xtr, ytr, xte, yte


@pytest.mark.parametrize("gz,sep", [(True, "-"), (False, ".")])
def test_load_mnist_directory(tmp_path, gz, sep):
    d, xtr, ytr, xte, _ = _mnist_dir(tmp_path, gz=gz, sep=sep)
    ds = load_dataset(str(d))
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (40, 1, 12, 12) and ds.x_test.shape == (20, 1, 12, 12)
    torch.testing.assert_close(ds.y_train, torch.from_numpy(ytr.astype(np.int64)))
    # z-score with the training images' global channel statistics (article 000)
    mean, std = xtr.astype(np.float64).mean(), xtr.astype(np.float64).std()
    assert abs(ds.stats["mean"][0] - mean) < 1e-9 and abs(ds.stats["std"][0] - std) < 1e-9
    expected = ((xte.astype(np.float64) - mean) / std).astype(np.float32)
    torch.testing.assert_close(ds.x_test[:, 0], torch.from_numpy(expected))


def test_load_explicit_files_two_and_four(tmp_path):
    d, *_ = _mnist_dir(tmp_path)
    f = find_idx_files(d)
    four = ",".join(str(f[k]) for k in ("train_images", "train_labels", "test_images", "test_labels"))
    assert load_dataset(four).x_train.shape[0] == 40
    two = load_dataset(f"{f['train_images']},{f['train_labels']}", preprocessing="minmax")
    assert two.x_train.shape[0] + two.x_test.shape[0] == 40
    assert float(two.x_train.min()) >= 0.0 and float(two.x_train.max()) <= 1.0


def test_label_image_count_mismatch(tmp_path):
    d, *_ = _mnist_dir(tmp_path)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"holds 40 images but .* holds 39 labels"):
        load_dataset(str(d))


def test_swapped_files_are_named(tmp_path):
    d, *_ = _mnist_dir(tmp_path)
    f = find_idx_files(d)
    with pytest.raises(IdxFormatError, match=r"expected images of 3 dimensions .* labels file"):
        load_idx_dataset([f["train_labels"], f["train_images"]])


def test_directory_missing_files(tmp_path):
    d, *_ = _mnist_dir(tmp_path)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset(str(d))
    with pytest.raises(FileNotFoundError, match="neither 'digits'"):
        load_dataset(str(tmp_path / "a,b,c"))


def test_digits_default():
    ds = load_dataset()
    assert ds.name == "digits" and ds.x_train.shape == (1347, 1, 8, 8) and ds.x_test.shape == (450, 1, 8, 8)
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    # stratified: every class in both splits in about the same proportion
    tr = torch.bincount(ds.y_train, minlength=10).double() / len(ds.y_train)
    te = torch.bincount(ds.y_test, minlength=10).double() / len(ds.y_test)
    assert float((tr - te).abs().max()) < 0.01


# -- issue 16: what a header may declare is bounded by the file; every bad file is an IdxFormatError ---
def _header(code: int, dims: list[int]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims", [[4_000_000_000, 4_000_000_000, 4_000_000_000],  # int64 overflows
                                  [60_000, 28, 28_000_000]])                      # 47 TB
def test_huge_declared_dims_are_refused_before_allocating(tmp_path, gz, dims):
    bad = _write_raw(tmp_path / "huge", _header(0x08, dims) + b"\x00" * 100, gz)
    with pytest.raises(IdxFormatError, match=r"truncated payload or corrupt header: dimensions .* need \d+"):
        read_idx(bad)
    with pytest.raises(IdxFormatError, match="truncated payload"):
        list(iter_idx(bad))


def test_a_lying_gzip_header_is_read_in_bounded_pieces(tmp_path):
    # declares 1 GB (a 0.8 MB .gz may hold that), holds 100 bytes: read piecewise, no 1 GB buffer
    bad = _write_raw(tmp_path / "lie.gz", _header(0x08, [1000, 1000, 1000]) + b"\x00" * 100, gz=True)
    assert bad.stat().st_size * 1032 < 10**9
    with pytest.raises(IdxFormatError, match="decompresses to at most"):
        read_idx(bad)


def test_255_dimensions_and_corrupt_gzip_data(tmp_path):
    bad = _write_raw(tmp_path / "dims", _header(0x08, [1] * 255))
    with pytest.raises(IdxFormatError, match="declares 255 dimensions; at most 64"):
        read_idx(bad)
    p, _ = _good(tmp_path, gz=True)
    data = bytearray(p.read_bytes())
    data[-30:-20] = b"\xff" * 10  # inside the deflate stream: zlib.error, not an OSError
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match="cannot decompress"):
        read_idx(corrupt)
    notgz = tmp_path / "notgz.gz"
    notgz.write_bytes(b"\x1f\x8b" + b"\x00" * 30)  # gzip magic, garbage after: BadGzipFile
    with pytest.raises(IdxFormatError, match="cannot decompress"):
        read_idx(notgz)


@pytest.mark.parametrize("what, images, labels, match", [
    ("0 records", np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.uint8), "holds 0 images"),
    ("0x0 images", np.zeros((3, 0, 0), np.uint8), np.zeros(3, np.uint8), r"shape \(0, 0\) have no pixels"),
    ("NaN images", np.array([[[np.nan, 1.0]]] * 3, np.float32), np.zeros(3, np.uint8), "NaN or infinite"),
    ("label 2e9", np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 2_000_000_000], np.int32),
     "found label 2000000000, .*at most 65536"),
    ("0 labels", np.zeros((3, 2, 2), np.uint8), np.zeros(0, np.uint8), "holds 0 labels"),
])
def test_data_sets_that_cannot_train_are_idx_format_errors(tmp_path, what, images, labels, match):
    xi = write_idx(tmp_path / "x", images)
    yl = write_idx(tmp_path / "y", labels)
    with pytest.raises(IdxFormatError, match=match):
        load_idx_dataset([xi, yl])


def test_the_cli_reports_a_corrupt_gz_without_a_traceback(tmp_path, capsys):
    from batchnorm.lab.cli import main

    bad = tmp_path / "imgs.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    labels = write_idx(tmp_path / "labels", np.zeros(3, dtype=np.uint8))
    rc = main(["run", "figure1", "--quick", "--data", f"{bad},{labels}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load --data" in err and "cannot decompress" in err and "Traceback" not in err
