"""The paged KV cache: key/value storage in fixed-size blocks, and attention over block tables.

PagedAttention (Kwon et al., 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention"): a sequence's keys and values live in blocks listed by its
block table, so memory is allocated a block at a time and blocks can be shared.

The model never sees the layout. Each step the runner describes the flattened batch with
`begin_step(segments)` and every attention layer calls `attend(layer, q, k, v)`. Three kinds
of segment get three attention paths:
- fresh prompts (nothing cached before this step) are packed into the one flattened sequence
  with positions restarted per prompt, as in Prepacking (Zhao et al., 2024), so no prefill is
  padded. Prepacking's block-diagonal mask is applied as one causal attention per prompt over
  its own fresh keys: the same result without computing the masked-out blocks;
- single-token decodes are batched into one call over their gathered contexts;
- continuations (a prefill chunk after cached tokens, SARATHI's chunked prefill) attend to
  their gathered context with a causal mask offset by what is cached.

Storage is [layers, kv_heads, slots, head_dim]: a gather of slots then comes out with kv heads
outermost and each head's keys contiguous, ready for batched matmuls without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falconet.config import ModelConfig


@dataclass(frozen=True)
class Segment:
    block_table: list[int]
    start: int  # tokens of this sequence already in the cache
    length: int  # new tokens of this sequence in the flattened batch


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        # Slots are never read before they are written, so `empty`: untouched pages cost nothing.
        shape = (config.num_layers, config.num_kv_heads, num_blocks * block_size, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.device = device
        self._plan: list[tuple] = []
        self._slot_mapping = torch.empty(0, dtype=torch.long)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
        return per_token * block_size

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot indices of positions [start, end) of a sequence."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs + 1
        blocks = torch.tensor(block_table[first:last], dtype=torch.long)
        slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
        return slots[start - first * bs : end - first * bs]

    def _mask(self, start: int, length: int) -> torch.Tensor | None:
        """[length, start + length] boolean: causal, and inside the sliding window if any."""
        total = start + length
        windowed = self.sliding_window is not None and total > self.sliding_window
        if not windowed and (length == 1 or start == 0):
            return None  # plain causal (or a single query): no mask needed
        q_pos = torch.arange(start, total).unsqueeze(1)
        k_pos = torch.arange(total).unsqueeze(0)
        mask = k_pos <= q_pos
        if windowed:
            mask &= k_pos > q_pos - self.sliding_window
        return mask

    def begin_step(self, segments: list[Segment]) -> None:
        """Plan the attention of the next forward over `segments`, flattened in this order."""
        slot_maps, plan, decodes, offset = [], [], [], 0
        for s in segments:
            slot_maps.append(self._slots(s.block_table, s.start, s.start + s.length))
            if s.start == 0:
                plan.append(("fresh", offset, offset + s.length, self._mask(0, s.length)))
            elif s.length == 1:
                decodes.append((offset, s))
            else:
                ctx = self._slots(s.block_table, 0, s.start + s.length)
                plan.append(("context", offset, offset + s.length, ctx, self._mask(s.start, s.length)))
            offset += s.length
        if decodes:
            plan.append(self._decode_plan(decodes))
        self._plan = plan
        self._slot_mapping = torch.cat(slot_maps) if slot_maps else torch.empty(0, dtype=torch.long)

    def _decode_plan(self, decodes: list[tuple[int, Segment]]) -> tuple:
        """One attention call for all single-token decodes: contexts gathered and right-padded."""
        rows = torch.tensor([off for off, _ in decodes])
        totals = [s.start + 1 for _, s in decodes]
        width = max(totals)
        index = torch.zeros(len(decodes), width, dtype=torch.long)
        for i, (_, s) in enumerate(decodes):
            index[i, : totals[i]] = self._slots(s.block_table, 0, totals[i])
        k_pos = torch.arange(width)
        q_pos = torch.tensor(totals).unsqueeze(1) - 1
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        return ("decode", rows, index, mask[:, None, :])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v of the new tokens and attend. q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]."""
        k_cache, v_cache = self.k[layer], self.v[layer]  # [Hkv, slots, D]
        k_cache.index_copy_(1, self._slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, self._slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        for kind, *args in self._plan:
            if kind == "fresh":
                start, end, mask = args
                kv = (k[start:end].transpose(0, 1), v[start:end].transpose(0, 1))
                out[start:end] = _attention(q[start:end], *kv, mask)
            elif kind == "context":
                start, end, ctx, mask = args
                out[start:end] = _attention(q[start:end], k_cache[:, ctx], v_cache[:, ctx], mask)
            else:
                rows, index, mask = args
                out[rows] = _decode_attention(q[rows], k_cache[:, index], v_cache[:, index], mask)
        return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Single-query attention for a batch: q [B, H, D], k/v [Hkv, B, W, D], mask [B, 1, W].

    Written out rather than through scaled_dot_product_attention: torch's bfloat16 CPU kernel
    costs ~8x more than these two matmuls for one query. Scores and softmax are in float32.
    """
    b, h, d = q.shape
    hkv = k.shape[0]
    qg = q.view(b, hkv, h // hkv, d).transpose(0, 1)  # [Hkv, B, G, D]: heads grouped by kv head
    scores = (qg @ k.transpose(-1, -2)).float() * d**-0.5  # [Hkv, B, G, W]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).transpose(0, 1).reshape(b, h, d)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one sequence: q [n, H, D], k/v [Hkv, m, D]; mask None means causal."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None and q.shape[0] > 1,
        enable_gqa=True,
    )
    return o[0].transpose(0, 1)
