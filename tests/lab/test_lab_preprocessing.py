"""Streaming per-channel dataset statistics and the three input normalisations (articles 000-003)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm.lab.preprocessing import ChannelStats, channel_stats, normalize
from batchnorm.stats import Moments


def _np_stats(x):
    axes = (0, *range(2, x.ndim))
    x64 = x.astype(np.float64)
    return x64.mean(axes), x64.var(axes), x64.min(axes), x64.max(axes)


def _check(st_, x, rtol=1e-12):
    mean, var, lo, hi = _np_stats(x)
    np.testing.assert_allclose(st_.mean, mean, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(st_.var, var, rtol=rtol, atol=1e-12)
    np.testing.assert_array_equal(st_.min, lo)
    np.testing.assert_array_equal(st_.max, hi)
    assert st_.count == x.size // x.shape[1] and st_.samples == x.shape[0]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunks_equal_numpy_images(chunk):
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(203, 3, 5, 4)).astype(np.float32)
    _check(channel_stats(x, chunk_size=chunk), x)


def test_uneven_and_empty_chunks_from_an_iterable():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 4)) for n in (1, 0, 13, 2, 40, 1)]
    st_ = channel_stats(iter(parts))
    _check(st_, np.concatenate(parts))


def test_large_offset_stays_exact():
    # mean 1e8, std 1: the one-pass E[x²] − E[x]² loses every digit in float64 (1e16 ≫ 2^53 · 1);
    # per-chunk two-pass moments merged with Chan's formula keep ~1e-9 relative accuracy
    rng = np.random.default_rng(2)
    x = 1e8 + rng.standard_normal((10_000, 2))
    st_ = channel_stats(x, chunk_size=333)
    mean, var, *_ = _np_stats(x)
    np.testing.assert_allclose(st_.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(st_.var, var, rtol=1e-9)
    naive = (x ** 2).mean(0) - x.mean(0) ** 2
    assert np.abs(naive - var).max() > 1e-3  # the formula we avoid really is wrong here


def test_float32_data_with_offset_accumulates_in_float64():
    x = (np.float32(1e4) + np.random.default_rng(3).standard_normal((5000, 1, 3, 3))).astype(np.float32)
    st_ = channel_stats(x, chunk_size=128)
    _, var, *_ = _np_stats(x)
    np.testing.assert_allclose(st_.var, var, rtol=1e-10)


def test_matches_moments_of_the_whole_tensor():
    x = torch.randn(50, 6, 3, dtype=torch.float64) * 3 + 1
    st_ = channel_stats(x, chunk_size=9)
    whole = Moments.of(x)
    np.testing.assert_allclose(st_.mean, whole.mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(st_.var, whole.var.numpy(), rtol=1e-12)


def test_memmap_streams(tmp_path):
    x = np.random.default_rng(4).normal(size=(500, 2, 4)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    _check(channel_stats(mm, chunk_size=64), x)


@given(st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=6),
       st.floats(min_value=-1e6, max_value=1e6))
def test_property_any_split_equals_numpy(sizes, offset):
    rng = np.random.default_rng(sum(sizes))
    total = max(sum(sizes), 1)
    x = offset + rng.standard_normal((total, 3, 2))
    parts, i = [], 0
    for n in sizes:
        parts.append(x[i:i + n])
        i += n
    parts.append(x[i:])
    _check(channel_stats(iter(parts)), x, rtol=1e-9)


def test_normalizations():
    rng = np.random.default_rng(5)
    x = np.stack([rng.uniform(0, 16, (300, 4, 4)), rng.normal(50, 5, (300, 4, 4))], axis=1)
    st_ = channel_stats(x)
    z = normalize(x, st_, "zscore").double()
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    m = normalize(x, st_, "minmax").double()
    torch.testing.assert_close(m.amin((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(m.amax((0, 2, 3)), torch.ones(2, dtype=torch.float64), atol=1e-7, rtol=0)
    mn = normalize(x, st_, "mean").double()
    torch.testing.assert_close(mn.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    rng_ = mn.amax((0, 2, 3)) - mn.amin((0, 2, 3))
    torch.testing.assert_close(rng_, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert normalize(x, st_, "none").dtype == torch.float32


def test_constant_channel_is_only_shifted():
    x = np.concatenate([np.full((10, 1, 2), 7.0), np.arange(20.0).reshape(10, 1, 2)], axis=1)
    st_ = channel_stats(x)
    for method in ("zscore", "minmax", "mean"):
        y = normalize(x, st_, method)
        assert torch.isfinite(y).all()
    assert float(normalize(x, st_, "zscore")[:, 0].abs().max()) == 0.0


def test_errors_leave_state_unchanged():
    st_ = ChannelStats()
    with pytest.raises(ValueError, match="no data seen yet"):
        _ = st_.mean
    st_.update(np.ones((4, 3)))
    before = (st_.count, st_.mean.copy(), st_.var.copy())
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1, got chunk of shape \(2, 4\)"):
        st_.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"expected a chunk of shape \(n, C, ...\)"):
        st_.update(np.ones(5))
    assert st_.count == before[0]
    np.testing.assert_array_equal(st_.mean, before[1])
    np.testing.assert_array_equal(st_.var, before[2])
    with pytest.raises(ValueError, match="unknown method 'l2'"):
        normalize(np.ones((2, 3)), st_, "l2")
    with pytest.raises(ValueError, match=r"expected input \(N, 3, ...\)"):
        normalize(np.ones((2, 4)), st_, "zscore")
    with pytest.raises(ValueError, match="chunk_size"):
        channel_stats(np.ones((2, 3)), chunk_size=0)
