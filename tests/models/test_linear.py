"""models.linear.Linear: bf16 through the packed kernel, everything else plain nn.Linear."""

import pytest
import torch
import torch.nn.functional as F

from falconet.models.linear import Linear, bf16_linear_kernels


def _layer(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return Linear(64, 40, bias=bias).to(dtype)


def test_float32_is_exactly_nn_linear():
    layer = _layer(torch.float32)
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._packed is None


@pytest.mark.skipif(bf16_linear_kernels() is None, reason="needs the AVX512-BF16 kernel")
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_goes_through_the_kernel_and_follows_weight_changes(bias):
    layer = _layer(torch.bfloat16, bias)
    x = torch.randn(2, 3, 64).bfloat16()
    with torch.inference_mode():
        out = layer(x)
    ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    assert out.shape == (2, 3, 40) and layer._packed is not None
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    with torch.no_grad():  # new weights (as load_weights writes them): repacked on next use
        layer.weight.mul_(-1)
    with torch.inference_mode():
        flipped = layer(x)
    ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    torch.testing.assert_close(flipped.float(), ref, atol=0.05, rtol=0.02)
