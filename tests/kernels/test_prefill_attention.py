"""The bf16 packed-prompt prefill kernel against float32 causal attention."""

import pytest
import torch
import torch.nn.functional as F

from falconet.kernels import cpu_kernels

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.has_bf16_prefill_attention(), reason="needs the AVX512-BF16 kernel"
)


def _reference(q, k, v, window):
    """float32 attention of one prompt: q [n, H, D], k/v [n, Hkv, D]."""
    n = q.shape[0]
    i = torch.arange(n)
    mask = i[None] <= i[:, None]
    if window:
        mask &= i[None] > i[:, None] - window
    o = F.scaled_dot_product_attention(
        *(t.float().transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, enable_gqa=True
    )
    return o[0].transpose(0, 1)


def _packed(lengths, heads=9, kv_heads=3, dim=64, seed=0):
    """q, k, v as the model makes them: views of one fused projection (strided rows)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim, generator=g).bfloat16()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.reshape(total, heads, dim), k.view(total, kv_heads, dim), v.view(total, kv_heads, dim)


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (6, 2, 64)])
def test_matches_float32_attention_per_prompt(window, heads, kv_heads, dim):
    lengths = [1, 5, 31, 32, 33, 100, 300]  # around the 32-row tile edges
    q, k, v = _packed(lengths, heads, kv_heads, dim)
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    kernels.prefill_attention_bf16(q, k, v, out, starts, torch.tensor(lengths), window, dim**-0.5)
    for s, n in zip(starts.tolist(), lengths, strict=True):
        want = _reference(q[s : s + n], k[s : s + n], v[s : s + n], window)
        # bf16 inputs, probabilities rounded to bf16 for the value product, bf16 output: the error
        # is a few bf16 ulps of values of order 1; torch's own bf16 kernel is compared the same way.
        ours = (out[s : s + n].float() - want).abs().max().item()
        sdpa = _reference(q[s : s + n], k[s : s + n], v[s : s + n], window).bfloat16().float()
        assert ours <= 2e-2, ours
        assert ours <= 4 * (sdpa - want).abs().max().item() + 1e-2


def test_prompts_do_not_see_each_other_and_other_rows_are_untouched():
    lengths = [20, 45]
    q, k, v = _packed(lengths + [7])  # 7 trailing rows that are not a prompt of this call
    out = torch.zeros_like(q)
    kernels.prefill_attention_bf16(q, k, v, out, torch.tensor([0, 20]), torch.tensor(lengths), 0, 0.125)
    alone = torch.zeros_like(q)
    kernels.prefill_attention_bf16(q, k, v, alone, torch.tensor([20]), torch.tensor([45]), 0, 0.125)
    assert torch.equal(out[20:65], alone[20:65])  # bitwise: independent of the other prompt
    assert torch.count_nonzero(out[65:]) == 0


@pytest.mark.parametrize("window", [0, 50])
def test_chunks_continuing_a_sequence_equal_the_whole_prompt(window):
    """A chunk with its cached context as keys gives the whole prompt's rows, bitwise: it visits
    the same key tiles in the same order. Two chunks of different sequences share one call."""
    q, k, v = _packed([300, 120])
    out = torch.zeros_like(q)
    kernels.prefill_attention_bf16(
        q, k, v, out, torch.tensor([0, 300]), torch.tensor([300, 120]), window, 0.125
    )
    # chunks: rows 250-299 of prompt 0 (keys 0-299) and rows 70-119 of prompt 1 (keys 0-119),
    # keys gathered into one tensor as the KV cache path does
    keys, values = torch.cat([k[:300], k[300:]]), torch.cat([v[:300], v[300:]])
    chunk = torch.zeros_like(q)
    kernels.prefill_attention_bf16(
        q,
        keys,
        values,
        chunk,
        torch.tensor([250, 370]),
        torch.tensor([50, 50]),
        window,
        0.125,
        torch.tensor([0, 300]),
        torch.tensor([300, 120]),
    )
    assert torch.equal(chunk[250:300], out[250:300]) and torch.equal(chunk[370:], out[370:])
    assert torch.count_nonzero(chunk[:250]) == 0 and torch.count_nonzero(chunk[300:370]) == 0


def test_bad_inputs_raise():
    q, k, v = _packed([10])
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.prefill_attention_bf16(q, k, v, out, torch.tensor([5]), torch.tensor([10]), 0, 0.1)
    with pytest.raises(RuntimeError):
        kernels.prefill_attention_bf16(q.float(), k, v, out, torch.tensor([0]), torch.tensor([10]), 0, 0.1)
    with pytest.raises(RuntimeError, match="key rows"):  # fewer keys than queries
        kernels.prefill_attention_bf16(
            q, k, v, out, torch.tensor([0]), torch.tensor([10]), 0, 0.1, torch.tensor([0]), torch.tensor([9])
        )
