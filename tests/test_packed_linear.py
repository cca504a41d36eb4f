"""PackedLinear (oneDNN-layout weights for CPU decoding) against float64 math."""

import pytest
import torch
from torch import nn

from rlhfkit.server.packed_linear import MIN_ROWS, PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 1, 48), (MIN_ROWS, 48), (5, 13, 48), (64, 1, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 37, bias=bias)
    packed = PackedLinear(lin)
    x = torch.randn(*shape)
    with torch.inference_mode():
        y = packed(x)
    ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    assert y.shape == (*shape[:-1], 37) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_autograd_uses_the_plain_weight():
    lin = nn.Linear(16, 8)
    packed = PackedLinear(lin)
    x = torch.randn(32, 16, requires_grad=True)
    packed(x).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


def test_pack_swaps_float32_linears_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), nn.Linear(4, 2).bfloat16())
    assert pack_linear_layers(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear  # bfloat16 stays as it was
    assert pack_linear_layers(model) == 0  # idempotent
