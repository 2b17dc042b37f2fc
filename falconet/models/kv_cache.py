"""A contiguous KV cache: one fixed-length slot per running sequence.

The model never sees the cache layout. Each step the runner describes the batch with
`begin_step(slots, num_new)` (flattened tokens, sequence after sequence), and every
attention layer calls `attend(layer, q, k, v)`; a paged cache can implement the same two
calls later without touching the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falconet.config import ModelConfig
from falconet.errors import FalconetError


@dataclass(frozen=True)
class Segment:
    slot: int
    start: int  # tokens of this sequence already cached before this step
    length: int  # new tokens of this sequence in the flattened batch


class ContiguousKVCache:
    def __init__(self, config: ModelConfig, max_seqs: int, max_len: int, dtype: torch.dtype, device="cpu"):
        # Never read before written (attention reads only filled positions): empty, not zeros,
        # so untouched pages cost no memory.
        shape = (config.num_layers, max_seqs, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.sliding_window = config.sliding_window
        self.lengths = [0] * max_seqs
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.segments: list[Segment] = []
        self.masks: list[torch.Tensor | None] = []

    def allocate(self) -> int:
        if not self.free_slots:
            raise FalconetError("KV cache has no free sequence slot")
        slot = self.free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free_slots.append(slot)

    def begin_step(self, slots: list[int], num_new: list[int]) -> None:
        """Describe the next forward pass: `num_new[i]` tokens of the sequence in `slots[i]`."""
        self.segments = []
        for slot, n in zip(slots, num_new, strict=True):
            start = self.lengths[slot]
            if start + n > self.max_len:
                raise FalconetError(
                    f"sequence needs {start + n} positions; the KV cache holds {self.max_len}"
                )
            self.segments.append(Segment(slot, start, n))
            self.lengths[slot] = start + n
        self.masks = [self._mask(s) for s in self.segments]

    def _mask(self, s: Segment) -> torch.Tensor | None:
        """Boolean [new, total] mask, or None where plain causal attention (or none) is exact."""
        total = s.start + s.length
        windowed = self.sliding_window is not None and total > self.sliding_window
        if not windowed and (s.length == 1 or s.start == 0):
            return None
        q_pos = torch.arange(s.start, total).unsqueeze(1)
        k_pos = torch.arange(total).unsqueeze(0)
        mask = k_pos <= q_pos
        if windowed:
            mask &= k_pos > q_pos - self.sliding_window
        return mask.to(self.k.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v of the new tokens and attend. q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H, D]."""
        out = torch.empty_like(q)
        offset = 0
        for s, mask in zip(self.segments, self.masks, strict=True):
            end, total = offset + s.length, s.start + s.length
            k_cache, v_cache = self.k[layer, s.slot], self.v[layer, s.slot]
            k_cache[:, s.start : total] = k[offset:end].transpose(0, 1)
            v_cache[:, s.start : total] = v[offset:end].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q[offset:end].transpose(0, 1).unsqueeze(0),
                k_cache[:, :total].unsqueeze(0),
                v_cache[:, :total].unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None and s.length > 1,
                enable_gqa=True,
            )
            out[offset:end] = o[0].transpose(0, 1)
            offset = end
        return out
