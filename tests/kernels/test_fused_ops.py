"""The fused element-wise kernels against the PyTorch code they replace in models/."""

import pytest
import torch
import torch.nn.functional as F

from falconet.config import ModelConfig
from falconet.kernels import cpu_kernels
from falconet.models import llama
from falconet.models.kv_cache import tile_keys, tile_values, untile_keys, untile_values
from falconet.models.rope import RotaryEmbedding

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the C++ kernels did not build here")
DTYPES = [torch.float32, torch.bfloat16]


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable steps (same-sign values; bf16 or float32)."""
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return (a.view(view).long() - b.view(view).long()).abs().max().item()


@pytest.fixture
def no_kernels(monkeypatch):
    """The models' PyTorch reference path."""
    monkeypatch.setattr(llama, "cpu_kernels", lambda: None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_reference(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    norm = llama.RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=g) + 0.5)
    x = (torch.randn(37, 576, generator=g) * 3).to(dtype)
    ours = kernels.rms_norm(x, norm.weight.detach(), 1e-5, None)
    monkeypatch.setattr(llama, "cpu_kernels", lambda: None)
    ref = norm(x).detach()
    # The float32 sum of squares runs in another order (and 1/sqrt for rsqrt): a few float32
    # ulps, which bf16's rounding hides nearly always.
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=2e-6)
    else:
        assert _ulps_apart(ours, ref) <= 1
        assert (ours == ref).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_adds_the_residual_in_place_first(dtype):
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(64, generator=g).to(dtype)
    x, residual = torch.randn(5, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    expected_sum = x + residual
    fused = kernels.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(residual, expected_sum)  # rounded exactly as the out-of-place add
    assert torch.equal(fused, kernels.rms_norm(expected_sum, weight, 1e-6, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 40])
def test_rope_in_place_matches_the_reference(dtype, head_dim):
    config = ModelConfig(
        vocab_size=10,
        hidden_size=4 * head_dim,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
    )
    rope = RotaryEmbedding(config, 512)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(9, 8 * head_dim, generator=g).to(dtype)  # views with strided rows, as in the model
    q = qkv[:, : 4 * head_dim].view(9, 4, head_dim)
    k = qkv[:, 4 * head_dim : 6 * head_dim].view(9, 2, head_dim)
    positions = torch.tensor([0, 1, 2, 3, 100, 200, 300, 400, 511])
    ref_q, ref_k = rope(positions, q.clone(), k.clone())
    kernels.rope_(q, k, positions, rope.cos, rope.sin)
    if dtype == torch.bfloat16:  # every product and sum rounded where the reference rounds
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    else:
        torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k, ref_k, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="outside the table"):
        kernels.rope_(q, k, torch.full((9,), 512), rope.cos, rope.sin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(11, 2 * 96, generator=g) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # the far ends of silu
    gate, up = gate_up.split(96, dim=-1)
    ref = F.silu(gate) * up
    ours = kernels.silu_mul(gate_up)
    if dtype == torch.bfloat16:
        # Our exp is within 2 ulp of torch's: the rounded silu may land one bf16 step away.
        diff = (ours.float() - ref.float()).abs()
        assert (diff <= ref.float().abs() * 2**-7 + 1e-30).all()
        assert (ours == ref).float().mean() > 0.98
    else:
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_equals_index_copy(dtype):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(6, 4 * 64, generator=g).to(dtype)
    k, v = qkv[:, 128:192].view(6, 1, 64), qkv[:, 192:].view(6, 1, 64)
    slots = torch.tensor([5, 0, 17, 3, 31, 16])
    caches = [torch.zeros(1, 32, 64, dtype=dtype) for _ in range(4)]
    kernels.store_kv(k, v, caches[0], caches[1], slots)
    caches[2].index_copy_(1, slots, k.transpose(0, 1))
    caches[3].index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.store_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 4, 32]))


def test_store_kv_tiled_writes_the_tiled_layout():
    """The tiled layout of models/kv_cache.py: converting back gives what index_copy_ writes."""
    if not kernels.has_tiled_kv(64, 16, 1):
        pytest.skip("the tiled layout needs AVX512-BF16")
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(7, 3 * 2 * 64, generator=g).bfloat16()
    k, v = qkv[:, 128:256].view(7, 2, 64), qkv[:, 256:].view(7, 2, 64)  # strided views, 2 heads
    slots = torch.tensor([5, 0, 17, 3, 31, 16, 4])
    tiled = [torch.zeros(2, 32, 64, dtype=torch.bfloat16) for _ in range(2)]
    plain = [torch.zeros(2, 32, 64, dtype=torch.bfloat16) for _ in range(2)]
    kernels.store_kv(k, v, tiled[0], tiled[1], slots, True)
    plain[0].index_copy_(1, slots, k.transpose(0, 1))
    plain[1].index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(untile_keys(tiled[0]), plain[0]) and torch.equal(untile_values(tiled[1]), plain[1])
    assert torch.equal(tile_keys(plain[0]), tiled[0]) and torch.equal(tile_values(plain[1]), tiled[1])
    with pytest.raises(RuntimeError, match="tiled"):
        kernels.store_kv(k.float(), v.float(), plain[0].float(), plain[1].float(), slots, True)
