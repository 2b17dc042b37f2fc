"""Weight-only int8: the quantizer's rounding, the kernel against the dequantized weights, and a
quantized model that loads, runs and stays close to the float one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from falconet.errors import FalconetError
from falconet.kernels import cpu_kernels
from falconet.methods.quant.int8 import Int8Linear, quantize_int8
from falconet.methods.registry import QUANTIZATION_METHODS, catalogue
from falconet.models.linear import TILE, pack_weight_bf16
from falconet.models.loader import load_model

kernels = cpu_kernels()
has_kernel = kernels is not None and kernels.has_bf16_linear()


def test_round_to_nearest_per_output_channel():
    w = torch.randn(37, 64) * torch.linspace(0.01, 3, 37)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (37,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((37,), 127, dtype=torch.int8))  # max hits 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step


@pytest.mark.skipif(not has_kernel, reason="needs the AVX512-BF16 kernel")
@pytest.mark.parametrize("n,k", [(64, 64), (40, 96), (960, 576), (200, 2)])
@pytest.mark.parametrize("m", [1, 3, 4, 17, 300])
def test_kernel_matches_the_dequantized_weights(m, n, k):
    """Against the float32 product of x and the dequantized weight: within what torch's own bf16
    linear over that weight (rounded to bf16) gets, plus the weight's own bf16 rounding."""
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g)
    q, scale = quantize_int8(w)
    pad = -(-n // TILE) * TILE - n
    ours = kernels.linear_int8(x, pack_weight_bf16(q), F.pad(scale, (0, pad)), n, torch.empty(0))
    ref = x.float() @ (q.float() * scale[:, None]).T
    torch_err = (F.linear(x, (q.float() * scale[:, None]).bfloat16()).float() - ref).abs().max().item()
    assert ours.shape == (m, n) and ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max().item() <= max(torch_err, 1e-6) * 1.5


@pytest.mark.skipif(not has_kernel, reason="needs the AVX512-BF16 kernel")
def test_bias_rows_independence_and_bad_inputs():
    lin = nn.Linear(96, 40, bias=True)
    layer = Int8Linear(lin)
    x = torch.randn(9, 96).bfloat16()
    ref = F.linear(x.float(), layer.dequantized(torch.float32), lin.bias.float())
    torch.testing.assert_close(layer(x).float(), ref, atol=0.05, rtol=0.02)
    assert torch.equal(layer(x[4:5])[0], layer(x)[4])  # a row does not depend on the batch
    assert layer(x[:0]).shape == (0, 40)
    with pytest.raises(RuntimeError, match="linear_int8"):
        kernels.linear_int8(x, layer._packed, layer._scale[:16], 40, torch.empty(0))  # scale too short


def test_float32_activations_use_the_dequantized_weight():
    lin = nn.Linear(64, 24)
    layer = Int8Linear(lin)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(torch.float32), lin.bias))
    torch.testing.assert_close(layer(x), lin(x), atol=0.05, rtol=0.05)  # and near the float layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_stays_close_to_the_float_one(next_token_kl, dtype):
    kl, quant = next_token_kl("int8", dtype)
    assert not [m for m in quant.modules() if isinstance(m, nn.Linear)]
    assert any(isinstance(m, Int8Linear) for m in quant.modules())
    assert kl < 0.02, kl


def test_registered_and_unknown_names_fail_clearly(tiny_llama64_dir):
    assert "int8" in QUANTIZATION_METHODS.names()
    entry = next(m for m in catalogue() if m.kind == "quantization" and m.name == "int8")
    assert entry.exact is False and "int8" in entry.paper
    with pytest.raises(FalconetError, match="unknown quantization method"):
        load_model(tiny_llama64_dir, with_tokenizer=False, quantization="int3")


@pytest.mark.skipif(not has_kernel, reason="needs the AVX512-BF16 kernel")
@pytest.mark.parametrize("m", [2, 9, 64, 700])
def test_each_row_is_independent_of_the_batch(m):
    """Up to 8 rows widen int8 tiles in registers, more rows widen them once into a buffer: the
    same bf16 values either way, so a row's output is bitwise the same alone and in any batch."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 1536, generator=g).bfloat16()
    layer = Int8Linear(nn.Linear(1536, 96, bias=False))
    batch = layer(x)
    for i in (0, m // 2, m - 1):
        assert torch.equal(layer(x[i : i + 1].contiguous())[0], batch[i])
