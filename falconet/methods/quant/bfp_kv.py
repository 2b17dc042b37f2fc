"""Block floating point (BFP) keys and values, with key channels grouped by norm (K-sort).

"Accurate Block Quantization in LLMs with Outliers" (Trukhanov & Soloveychik, 2024): BFP12
stores a block of n values as 4-bit signed mantissas sharing one 8-bit exponent (4 + 8/n bits a
value instead of 16). Keys have outlier channels, the same channels for every token, and one
outlier in a block coarsens the whole block's grid. K-sort groups the channels by the norm of
their rows of W_k, fixed ahead of time, so large channels share blocks with large ones and small
with small; queries see the same order, so q.k is unchanged. With RoPE, channels j and j + D/2
rotate together: they are sorted as pairs (by the pair's norm) and always share a block.

As in the paper the keys are the subject: keys in BFP12, values in BFP16 (8-bit mantissas,
contiguous blocks), blocks of n = 32. Emulated here: keys (after RoPE) and values are rounded as
each layer computes them, before attention and the cache store, so every later read sees what a
BFP cache would hold; the cache itself stays bf16/float32, so this measures the quality such a
cache (keys 4.25 bits a value, values 8.25) costs, not its memory or speed.
"""

from __future__ import annotations

import torch
from torch import nn

MANTISSA_BITS = 4  # BFP12: 4-bit signed mantissas, 8-bit shared exponent
BLOCK = 32  # values per shared exponent


def bfp_round(x: torch.Tensor, blocks: torch.Tensor, mantissa_bits: int = MANTISSA_BITS) -> torch.Tensor:
    """x [..., C] rounded to BFP: blocks [B, n] lists the channels (of C) sharing each exponent.

    Each block's values become q * 2^e with integer |q| <= 2^(bits-1) - 1 and e the smallest
    exponent that fits the block's largest value (round to nearest)."""
    g = x[..., blocks].float()  # [..., B, n]
    top = 2 ** (mantissa_bits - 1) - 1
    amax = g.abs().amax(dim=-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / top)).clamp(min=-126)
    scale = torch.exp2(exponent)
    q = torch.round(g / scale).clamp_(-top, top)
    out = torch.empty_like(x)
    out[..., blocks] = (q * scale).to(x.dtype)
    return out


def contiguous_blocks(channels: int, block: int) -> torch.Tensor:
    return torch.arange(channels).view(-1, block)


def ksort_blocks(k_weight: torch.Tensor, num_kv_heads: int, block: int) -> torch.Tensor:
    """K-sort's blocks over the flattened [Hkv * D] key channels: per head, the rotary pairs
    (j, j + D/2) in descending order of their rows' norm in W_k [Hkv * D, hidden], block/2 pairs
    (both halves) a block."""
    head_dim = k_weight.shape[0] // num_kv_heads
    half = head_dim // 2
    if block % 2 or head_dim % block:
        raise ValueError(f"block {block} must be even and divide head_dim {head_dim}")
    rows = k_weight.float().pow(2).sum(dim=-1).view(num_kv_heads, 2, half)
    order = (rows[:, 0] + rows[:, 1]).argsort(dim=-1, descending=True)  # [Hkv, D/2] pairs
    blocks = []
    for h in range(num_kv_heads):
        for pairs in order[h].view(-1, block // 2):
            blocks.append(torch.cat([pairs, pairs + half]) + h * head_dim)
    return torch.stack(blocks)


class BfpKV:
    """Rounds a layer's keys and values to BFP over fixed channel blocks (see the module doc)."""

    def __init__(self, key_blocks: torch.Tensor, value_blocks: torch.Tensor, key_bits: int, value_bits: int):
        self.key_blocks, self.value_blocks = key_blocks, value_blocks
        self.key_bits, self.value_bits = key_bits, value_bits

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [T, Hkv, D] -> the same, rounded."""
        t = k.shape[0]
        k = bfp_round(k.reshape(t, -1), self.key_blocks, self.key_bits).view(k.shape)
        v = bfp_round(v.reshape(t, -1), self.value_blocks, self.value_bits).view(v.shape)
        return k, v


def _key_weight(attn: nn.Module) -> torch.Tensor:
    proj = attn.qkv_proj
    weight = proj.weight if hasattr(proj, "weight") else proj.dequantize()
    return weight.detach()[attn.q_size : attn.q_size + attn.kv_size]


class BfpKVCache:
    """BFP12 keys, BFP16 values, blocks of 32 contiguous channels (the paper's baseline)."""

    name = "kv-bfp12"
    paper = "Accurate Block Quantization in LLMs with Outliers (Trukhanov & Soloveychik, 2024), baseline"
    exact = False
    sort_keys = False
    block, key_bits, value_bits = BLOCK, MANTISSA_BITS, 8

    def apply(self, model: nn.Module) -> nn.Module:
        for layer in model.layers:
            attn = layer.self_attn
            channels = attn.kv_size
            keys = contiguous_blocks(channels, self.block)
            if self.sort_keys:
                keys = ksort_blocks(_key_weight(attn), attn.num_kv_heads, self.block)
            attn.kv_quant = BfpKV(
                keys, contiguous_blocks(channels, self.block), self.key_bits, self.value_bits
            )
        return model


class BfpKVCacheKSort(BfpKVCache):
    """BFP12 keys with their channels grouped by W_k row norm (K-sort), BFP16 values."""

    name = "kv-bfp12-ksort"
    paper = "Accurate Block Quantization in LLMs with Outliers (Trukhanov & Soloveychik, 2024)"
    sort_keys = True
