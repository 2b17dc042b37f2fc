"""The packed-weight bf16 linear kernel against float32 matmuls and torch's own bf16 path."""

import pytest
import torch
import torch.nn.functional as F

from falconet.kernels import cpu_kernels
from falconet.models.linear import pack_weight_bf16

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.has_bf16_linear(), reason="needs the AVX512-BF16 kernel"
)
NO_BIAS = torch.empty(0)


def _data(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


@pytest.mark.parametrize("n,k", [(64, 64), (40, 96), (960, 576), (200, 2)])
@pytest.mark.parametrize("m", [1, 3, 4, 6, 11, 17, 300])
def test_matches_float32_matmul_as_closely_as_torch(m, n, k):
    """Error against the float32 product of the same bf16 inputs: no worse than torch's bf16
    linear (both accumulate in float32 and round once). N not a multiple of 16 pads a tile."""
    x, w = _data(m, n, k)
    ref = x.float() @ w.float().T
    ours = kernels.linear_bf16(x, pack_weight_bf16(w), n, NO_BIAS)
    assert ours.shape == (m, n) and ours.dtype == torch.bfloat16
    ours_err = (ours.float() - ref).abs().max().item()
    torch_err = (F.linear(x, w).float() - ref).abs().max().item()
    assert ours_err <= max(torch_err, 1e-6) * 1.01


def test_bias_is_added_in_float32():
    x, w = _data(5, 40, 64, seed=1)
    bias = torch.randn(40).bfloat16()
    padded = F.pad(bias.float(), (0, 8))  # 40 features -> 3 tiles of 16
    ours = kernels.linear_bf16(x, pack_weight_bf16(w), 40, padded)
    ref = x.float() @ w.float().T + bias.float()
    torch.testing.assert_close(ours.float(), ref, atol=0.05, rtol=0.01)


@pytest.mark.parametrize("m", [2, 5, 7, 11, 12, 13, 64, 700])  # 5-12: passes of up to 6 rows
def test_each_row_is_independent_of_the_batch(m):
    """A row's output is bit-identical alone and inside a batch of any size (one fixed float32
    accumulation order per output, whatever the rows, chunks or threads)."""
    x, w = _data(m, 96, 1536, seed=2)  # K=1536: x is swept in several row chunks at m=700
    packed = pack_weight_bf16(w)
    batch = kernels.linear_bf16(x, packed, 96, NO_BIAS)
    for i in (0, m // 2, m - 1):
        alone = kernels.linear_bf16(x[i : i + 1].contiguous(), packed, 96, NO_BIAS)
        assert torch.equal(alone[0], batch[i])


def test_strided_rows_and_empty_batch():
    x, w = _data(6, 32, 64, seed=3)
    packed = pack_weight_bf16(w)
    wide = torch.cat([x, torch.zeros(6, 10, dtype=torch.bfloat16)], dim=1)[:, :64]  # row stride 74
    assert torch.equal(
        kernels.linear_bf16(wide, packed, 32, NO_BIAS), kernels.linear_bf16(x, packed, 32, NO_BIAS)
    )
    assert kernels.linear_bf16(x[:0], packed, 32, NO_BIAS).shape == (0, 32)


def test_bad_inputs_raise():
    x, w = _data(2, 32, 64)
    packed = pack_weight_bf16(w)
    with pytest.raises(RuntimeError, match="features"):
        kernels.linear_bf16(torch.zeros(2, 62, dtype=torch.bfloat16), packed, 32, NO_BIAS)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.linear_bf16(x.float(), packed, 32, NO_BIAS)
    with pytest.raises(RuntimeError, match="out_features"):
        kernels.linear_bf16(x, packed, 64, NO_BIAS)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.linear_bf16(x, packed, 32, torch.zeros(31))
