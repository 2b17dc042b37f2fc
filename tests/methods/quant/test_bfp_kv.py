"""BFP keys and values with K-sort ("Accurate Block Quantization in LLMs with Outliers")."""

from __future__ import annotations

import math

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.quant.bfp_kv import (
    BfpKVCacheKSort,
    bfp_round,
    contiguous_blocks,
    ksort_blocks,
)
from falconet.methods.registry import catalogue
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams


def on_bfp_grid(x: torch.Tensor, bits: int) -> bool:
    """Every row of x [..., n] is q * 2^e for one e and integers |q| <= 2^(bits-1) - 1."""
    top = 2 ** (bits - 1) - 1
    for row in x.reshape(-1, x.shape[-1]).double():
        amax = row.abs().max().item()
        if amax == 0:
            continue
        scale = 2.0 ** math.ceil(math.log2(amax / top))
        q = row / scale
        if not (torch.equal(q, q.round()) and q.abs().max() <= top):
            return False
    return True


def test_round_to_a_shared_exponent_per_block():
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.logspace(-2, 1, 64)  # channels of very different sizes
    blocks = contiguous_blocks(64, 16)
    y = bfp_round(x, blocks, 4)
    assert on_bfp_grid(y.view(5, 4, 16), 4)
    for b in blocks:  # at most half a step off, the step set by the block's largest value
        step = 2.0 ** torch.ceil(torch.log2(x[:, b].abs().amax(-1) / 7))
        assert ((y[:, b] - x[:, b]).abs() <= step[:, None] / 2 + 1e-7).all()
    assert torch.equal(bfp_round(torch.zeros(2, 64), blocks, 4), torch.zeros(2, 64))
    # any permutation of channels into blocks: each block on its own grid
    perm = torch.randperm(64).view(4, 16)
    assert on_bfp_grid(bfp_round(x, perm, 4)[:, perm], 4)


def test_ksort_groups_rotary_pairs_by_norm_and_helps_outlier_channels():
    torch.manual_seed(1)
    heads, dim, hidden = 2, 64, 128
    w = torch.randn(heads * dim, hidden)
    big = torch.tensor([3, 3 + 32, 17, 17 + 32, 64 + 40, 64 + 8])  # a few outlier channels
    w[big] *= 12
    blocks = ksort_blocks(w, heads, 32)
    assert sorted(blocks.flatten().tolist()) == list(range(heads * dim))
    norms = w.pow(2).sum(-1)
    for b in blocks:
        head, local = b[0] // dim, b % dim
        assert (b // dim == head).all()
        assert set((local % 32).tolist()) == set((local[:16] % 32).tolist())  # whole pairs
    first, second = blocks[0], blocks[1]  # head 0: the larger pairs first
    assert norms[first].sum() > norms[second].sum() and {3, 17} <= set(first.tolist())
    # keys from these weights: sorting puts the outliers together, so the other channels keep
    # a fine grid instead of the outliers' coarse one
    keys = torch.randn(256, hidden) @ w.T
    rest = torch.ones(heads * dim, dtype=torch.bool)
    rest[big] = False
    err = {
        name: (bfp_round(keys, b, 4) - keys)[:, rest].pow(2).mean().item()
        for name, b in (
            ("contiguous", contiguous_blocks(heads * dim, 16)),
            ("ksort", ksort_blocks(w, heads, 16)),
        )
    }
    assert err["ksort"] < 0.7 * err["contiguous"], err  # 0.58 here; fewer blocks hold an outlier


@pytest.mark.parametrize("method", ["kv-bfp12", "kv-bfp12-ksort"])
def test_every_cached_key_and_value_is_on_the_grid(tiny_llama64_dir, method):
    """Prompt and decode steps alike store rounded keys (BFP12) and values (BFP16)."""
    loaded = load_model(tiny_llama64_dir, with_tokenizer=False, quantization=method)
    attn = loaded.model.layers[1].self_attn
    engine = LLMEngine(loaded, EngineConfig(enable_prefix_caching=False))
    req = engine.add_request(
        list(range(3, 40)), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    while len(req.output_ids) < 10:  # prompt, then decode steps; the request still holds its blocks
        engine.step()
    slots = torch.tensor([b * 16 + i for b in req.block_table for i in range(16)])[: req.num_computed]
    keys = engine.kv_cache.k[1][:, slots].transpose(0, 1).reshape(len(slots), -1)  # [T, Hkv * D]
    values = engine.kv_cache.v[1][:, slots].transpose(0, 1).reshape(len(slots), -1)
    assert on_bfp_grid(keys[:, attn.kv_quant.key_blocks], 4)
    assert on_bfp_grid(values[:, attn.kv_quant.value_blocks], 8)
    assert not on_bfp_grid(values[:, attn.kv_quant.value_blocks], 4)  # values keep 8 bits


def test_registered_as_approximate_quantization_methods():
    entries = {m.name: m for m in catalogue()}
    for name in ("kv-bfp12", "kv-bfp12-ksort"):
        assert entries[name].kind == "quantization" and not entries[name].exact
    assert "Outliers" in entries[BfpKVCacheKSort.name].paper
