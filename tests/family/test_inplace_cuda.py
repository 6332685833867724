"""InPlace-ABN on CUDA (the torch path): parity with torch's BN + activation, in place, half precision.

Runs only where a CUDA device exists (CI has none; run on a GPU machine). The CPU tests cover
the same maths through both backends; this checks that the fallback really runs on the device.
"""

from __future__ import annotations

import pytest
import torch
from helpers.util import assert_close
from torch import nn

from batchnorm.family.inplace import InPlaceABN2d, inplace_backend_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.float16, 2e-2)])
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.01), ("elu", 1.0)])
def test_cuda_matches_torch_bn_plus_activation(dtype, tol, act, slope):
    dev = "cuda"
    x = torch.randn(8, 16, 12, 12, device=dev, dtype=torch.float32) * 2 + 1
    bn = nn.BatchNorm2d(16, device=dev)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    ours = InPlaceABN2d(16, device=dev, activation=act, negative_slope=slope)
    ours.load_state_dict(bn.state_dict())
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    bn, ours = bn.to(pdt), ours.to(pdt)
    tact = nn.LeakyReLU(slope) if act == "leaky_relu" else nn.ELU(slope)
    xr = x.to(bn.weight.dtype).clone().requires_grad_()
    yr = tact(bn(xr))
    dy = torch.randn_like(yr)
    yr.backward(dy)
    xo = x.to(dtype).clone().requires_grad_()
    xi = xo * 1
    assert inplace_backend_for(xi) == "torch"
    yo = ours(xi)  # float16 input with float32 parameters: statistics accumulate in float32
    assert yo.data_ptr() == xi.data_ptr()
    yo.backward(dy.to(dtype))
    assert_close(yo, yr, rtol=tol, atol=tol, what="y")
    assert_close(xo.grad, xr.grad, rtol=tol, atol=tol * 10, what="dx")
    assert_close(ours.weight.grad, bn.weight.grad, rtol=tol * 10, atol=tol * 100, what="dweight")
    assert_close(ours.running_var, bn.running_var, rtol=tol, atol=tol, what="running_var")
