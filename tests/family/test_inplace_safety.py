"""InPlace-ABN never stores what its policy forbids, and never writes into overlapping memory.

Issue 16, items 4 and 5: with ``nonfinite="skip"``/``"raise"`` a finite float32 input whose
variance overflows float32 (``x * 1e20``) must not put ``inf`` into the buffers (the policy judges
the values actually stored, as BatchNorm2d's does); an ``as_strided`` input whose elements share
memory is rejected for ``inplace=True`` before anything is written (and is correct with
``inplace=False``).
"""

from __future__ import annotations

import pytest
import torch
from helpers.core_util import assert_state_unchanged, snapshot
from helpers.util import assert_close
from hypothesis import given
from hypothesis import strategies as st

import batchnorm
from batchnorm.family.inplace import InPlaceABN2d, _may_overlap, inplace_abn_train


def _huge() -> torch.Tensor:
    return torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 1e20


def test_skip_leaves_the_buffers_when_the_stored_variance_would_overflow():
    m = InPlaceABN2d(3, nonfinite="skip")
    before = snapshot(m)
    y = m(_huge())
    assert torch.isfinite(y).all()
    assert_state_unchanged(before, m, "skip")
    ours = batchnorm.BatchNorm2d(3, nonfinite="skip")  # the same policy, the same result
    ours(_huge())
    assert torch.equal(ours.running_var, m.running_var) and int(ours.num_batches_tracked) == 0


def test_raise_names_the_stored_dtype_and_changes_nothing():
    m = InPlaceABN2d(3, nonfinite="raise")
    before = snapshot(m)
    with pytest.raises(FloatingPointError, match=r"would store \(torch.float32\).*overflows"):
        m(_huge())
    assert_state_unchanged(before, m, "raise")


def test_functional_skip_returns_the_old_statistics_and_update_still_stores_inf():
    rm, rv = torch.zeros(3), torch.ones(3)
    _, new = inplace_abn_train(_huge(), rm, rv, nonfinite="skip", inplace=False)
    assert new.mean is rm and new.var is rv
    _, new = inplace_abn_train(_huge(), rm, rv, nonfinite="update", inplace=False)  # as torch does
    assert torch.isinf(new.var).all()
    assert torch.equal(rv, torch.ones(3)), "the functional form wrote into the buffers"


def test_overlapping_input_is_rejected_in_place_and_correct_out_of_place():
    base = torch.randn(200, generator=torch.Generator().manual_seed(1))
    x = base.as_strided((2, 3, 4, 4), (3, 4, 1, 2))  # non-zero strides, elements shared
    ref = torch.nn.functional.leaky_relu(torch.nn.BatchNorm2d(3).eval()(x.contiguous()), 0.01)
    m = InPlaceABN2d(3).eval()
    kept = base.clone()
    with pytest.raises(ValueError, match=r"share memory \(strides \(3, 4, 1, 2\)"):
        m(x)
    assert torch.equal(base, kept), "the rejected call wrote into the input"
    with torch.no_grad():
        assert_close(InPlaceABN2d(3, inplace=False).eval()(x), ref, rtol=1e-6, atol=1e-6, what="out of place")


def test_overlap_check_known_layouts():
    base = torch.randn(400)
    assert _may_overlap(torch.randn(3).expand(2, 3))
    assert _may_overlap(base.as_strided((2, 3, 4, 4), (3, 4, 1, 2)))
    assert not _may_overlap(base.as_strided((3, 2), (2, 3)))  # fails the quick proof, exact check: disjoint
    assert not _may_overlap(torch.randn(4, 3, 5, 5).permute(0, 2, 3, 1))
    assert not _may_overlap(torch.randn(4, 6)[:, ::2])
    assert not _may_overlap(torch.randn(4, 6).flip(1))  # negative strides


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.lists(st.integers(0, 6), min_size=3, max_size=3))
def test_overlap_check_agrees_with_counting_offsets(shape, strides):
    strides = strides[: len(shape)]
    x = torch.zeros(200).as_strided(shape, strides)
    offsets = {sum(i * s for i, s in zip(idx, strides, strict=True)) for idx in torch.cartesian_prod(
        *[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist()}
    assert _may_overlap(x) == (len(offsets) != x.numel())
