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
  its own fresh keys: the same result without computing the masked-out blocks. In bfloat16 on
  CPUs with AVX512-BF16 one C++ flash-attention call covers all of a step's fresh prompts;
- single-token decodes are batched into one call: the C++ kernel reads each sequence's keys
  and values in place through its block table (the PyTorch fallback gathers them first);
- continuations (a prefill chunk after cached tokens, SARATHI's chunked prefill) attend to
  their gathered context with a causal mask offset by what is cached (in bfloat16 with
  AVX512-BF16, all of a step's continuations in one call of the flash kernel).
- token trees (speculative verification of several candidate continuations) become decode
  rows too, each over a block table of its own branch (tree_attention.py), with the branches
  other than the first in scratch blocks kept beyond the block manager's.

Storage is [layers, kv_heads, slots, head_dim]: a gather of slots then comes out with kv heads
outermost and each head's keys contiguous, ready for batched matmuls without another copy.

Where the decode kernel runs on AVX512-BF16 (bfloat16 caches), each 16-slot tile of a head is
stored "tiled" instead, in the operand layout of vdpbf16ps (which multiplies pairs of bf16):
keys as [head_dim/2][16 tokens][2] and values as [8 token pairs][head_dim][2]. Decode attention
then needs no transposes or shuffles (see paged_attention_bf16.cpp). `store_kv` writes this
layout; `untile_keys`/`untile_values` give back the plain one for the gathering paths.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from falconet.config import ModelConfig
from falconet.kernels import cpu_kernels
from falconet.models.tree_attention import TreeLayout, scratch_blocks_needed


@dataclass(frozen=True)
class Segment:
    block_table: list[int]
    start: int  # tokens of this sequence already in the cache
    length: int  # new tokens of this sequence in the flattened batch
    # Attend as one decode row per token (speculative verification): each row's result is then
    # bitwise what decoding these tokens one step at a time gives.
    as_decodes: bool = False
    # A token tree (as decodes): tree[j] is the parent row-1 of row j + 1, -1 for row 0, the
    # sequence's last known token. None: a chain. See tree_attention.py.
    tree: tuple[int, ...] | None = None


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device="cpu",
        num_scratch_blocks: int = 0,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        # Blocks after the block manager's: the side branches of token trees, within one step.
        self.num_scratch_blocks = num_scratch_blocks
        total = num_blocks + num_scratch_blocks
        shape = (config.num_layers, config.num_kv_heads, total * block_size, config.head_dim)
        self.k = _allocate(shape, dtype, device)
        self.v = _allocate(shape, dtype, device)
        self.device = device
        self._kernels = cpu_kernels() if torch.device(device).type == "cpu" else None
        # All fresh prompts of a step in one C++ call (bf16 on CPUs with AVX512-BF16).
        self._packed_prefill = (
            self._kernels is not None
            and dtype == torch.bfloat16
            and self._kernels.has_bf16_prefill_attention()
            and self.head_dim in (64, 128)
        )
        group = config.num_heads // config.num_kv_heads
        self.tiled = (
            self._kernels is not None
            and dtype == torch.bfloat16
            and self._kernels.has_tiled_kv(self.head_dim, block_size, group)
        )
        self._plan: list[tuple] = []
        self._slot_mapping = torch.empty(0, dtype=torch.long)
        self._extra_rows = self._extra_slots = None  # tree rows stored into scratch blocks too
        self.trees: dict[int, TreeLayout] = {}  # segment index -> layout, for commit_tree
        # decode_inputs when every row of the step is a decode row on the kernel path
        self._decode: tuple[torch.Tensor, ...] | None = None

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

    def _context_index(self, block_table: list[int], total: int) -> tuple[torch.Tensor, int]:
        """What `_context` gathers for positions [0, total): slots, or whole tiles when tiled."""
        if not self.tiled:
            return self._slots(block_table, 0, total), total
        per_block = self.block_size // TILE
        blocks = torch.tensor(block_table[: -(-total // self.block_size)], dtype=torch.long)
        return (blocks[:, None] * per_block + torch.arange(per_block)).flatten(), total

    def _context(self, cache: torch.Tensor, index: torch.Tensor, total: int, keys: bool) -> torch.Tensor:
        """[Hkv, total, D] keys or values of positions [0, total) of one sequence, plain layout."""
        if not self.tiled:
            return cache[:, index]
        hkv, _, d = cache.shape
        tiles = cache.view(hkv, -1, TILE * d)[:, index].view(hkv, -1, d)
        return (untile_keys(tiles) if keys else untile_values(tiles))[:, :total]

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
        slot_maps, plan, decodes, fresh, chunks, offset = [], [], [], [], [], 0
        self.trees, extra_rows, extra_slots, copies = {}, [], [], []
        next_scratch = [self.num_blocks]  # scratch blocks are handed out in order, per step
        for index, s in enumerate(segments):
            if s.tree is not None:
                layout = self._plan_tree(s, next_scratch)
                self.trees[index] = layout
                slot_maps.append(torch.tensor(layout.row_slots, dtype=torch.long))
                decodes.extend(
                    (offset + r, Segment(t, p, 1))
                    for r, (t, p) in enumerate(zip(layout.tables, layout.positions, strict=True))
                )
                extra_rows.extend(offset + r for r in layout.extra_rows)
                extra_slots.extend(layout.extra_slots)
                copies.extend(layout.copies)
                offset += s.length
                continue
            slot_maps.append(self._slots(s.block_table, s.start, s.start + s.length))
            if s.start == 0 and self._packed_prefill:
                fresh.append((offset, s.length))
            elif s.start == 0:
                plan.append(("fresh", offset, offset + s.length, self._mask(0, s.length)))
            elif s.length == 1 or s.as_decodes:
                # Row i sees the first start + i + 1 positions, through the decode kernel.
                decodes.extend((offset + i, Segment(s.block_table, s.start + i, 1)) for i in range(s.length))
            elif self._packed_prefill:
                chunks.append((offset, s))
            else:
                ctx = self._context_index(s.block_table, s.start + s.length)
                plan.append(("context", offset, offset + s.length, ctx, self._mask(s.start, s.length)))
            offset += s.length
        if fresh:
            starts, lengths = zip(*fresh, strict=True)
            plan.append(("packed", torch.tensor(starts), torch.tensor(lengths)))
        if chunks:
            plan.append(self._chunk_plan(chunks))
        if decodes:
            plan.append(self._decode_plan(decodes))
        self._plan = plan
        self._slot_mapping = torch.cat(slot_maps) if slot_maps else torch.empty(0, dtype=torch.long)
        self._extra_rows = torch.tensor(extra_rows, dtype=torch.long) if extra_rows else None
        self._extra_slots = torch.tensor(extra_slots, dtype=torch.long) if extra_rows else None
        self.copy_blocks(copies)
        self._decode = None
        if len(plan) == 1 and plan[0][0] == "paged" and len(decodes) == offset:
            # Always at least two extra stores (row 0 again into its own slot when there are none,
            # which changes nothing), so a compiled step never sees 0 or 1 of them (compiled.py).
            rows, slots = (extra_rows or [0]) * 2, (extra_slots or [int(self._slot_mapping[0])]) * 2
            extra = (torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long))
            self._decode = (self._slot_mapping, *extra, plan[0][2], plan[0][3])

    @property
    def decode_only(self) -> bool:
        """Whether every row of the planned step is a decode row that `attend_decode` can take:
        one fused kernel call per layer, and the steps a compiled model runs (compiled.py)."""
        return self._decode is not None

    @property
    def decode_inputs(self) -> tuple[torch.Tensor, ...]:
        """(slots, extra rows, their extra slots, block tables, lengths) of a decode-only step."""
        return self._decode

    def attend_decode(self, layer: int, qkv: torch.Tensor, positions: torch.Tensor, rope) -> torch.Tensor:
        """For a decode-only step: RoPE, store and attend in one call. qkv [T, (H + 2 Hkv) D] (its
        q and k are rotated in place) -> [T, H D]; the same numbers as `attend`."""
        slots, extra_rows, extra_slots, tables, lengths = self._decode
        heads = qkv.shape[1] // self.head_dim - 2 * self.num_kv_heads
        return cpu_kernels().decode_attention(
            qkv,
            positions,
            rope.cos,
            rope.sin,
            self.k[layer],
            self.v[layer],
            slots,
            extra_rows,
            extra_slots,
            tables,
            lengths,
            heads,
            self.num_kv_heads,
            self.block_size,
            self.sliding_window or 0,
            self.head_dim**-0.5,
            self.tiled,
        )

    def _plan_tree(self, s: Segment, next_scratch: list[int]) -> TreeLayout:
        if len(s.tree) != s.length or s.tree[0] != -1:
            raise ValueError("a tree segment lists one parent per row, -1 first (the root row)")

        def take(n: int) -> list[int]:
            first = next_scratch[0]
            if first + n > self.num_blocks + self.num_scratch_blocks:
                raise ValueError(
                    f"token trees need more scratch blocks than the cache keeps ({self.num_scratch_blocks})"
                )
            next_scratch[0] = first + n
            return list(range(first, first + n))

        # nodes' parents, relative to nodes (the root is -1)
        parents = [p - 1 for p in s.tree[1:]]
        return TreeLayout.plan(s.block_table, s.start, parents, self.block_size, take)

    def scratch_blocks_needed(self, start: int, parents: list[int]) -> int:
        """Scratch blocks a tree of these nodes (parents[j] < j, -1: the root) takes at `start`."""
        return scratch_blocks_needed(parents, start, self.block_size)

    def commit_tree(self, segment: int, node: int) -> None:
        """After verification: the path to draft node `node` (-1: none kept) of tree segment
        `segment` of the last step moves into the sequence's own blocks."""
        self.copy_blocks(self.trees[segment].commit(node))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (from, to) in every layer; tile-aligned, so any layout copies."""
        if not pairs:
            return
        bs = self.block_size
        if not {b for _, b in pairs} & {a for a, _ in pairs}:
            # A block is one run of slots in every layer and head: a strided copy per block and
            # cache (a token tree takes one or two a step) costs a fraction of gathering the
            # slots by index into a temporary first.
            for a, b in pairs:
                for cache in (self.k, self.v):
                    cache[:, :, b * bs : (b + 1) * bs].copy_(cache[:, :, a * bs : (a + 1) * bs])
            return
        src = (torch.tensor([a for a, _ in pairs])[:, None] * bs + torch.arange(bs)).flatten()
        dst = (torch.tensor([b for _, b in pairs])[:, None] * bs + torch.arange(bs)).flatten()
        for cache in (self.k, self.v):
            cache.index_copy_(2, dst, cache.index_select(2, src))

    def _chunk_plan(self, chunks: list[tuple[int, Segment]]) -> tuple:
        """One flash-attention call for all chunks that continue a sequence: their contexts are
        gathered (after this step's keys are stored) into one key tensor, chunk after chunk."""
        contexts = [self._context_index(s.block_table, s.start + s.length) for _, s in chunks]
        totals = [total for _, total in contexts]
        key_starts = [sum(totals[:i]) for i in range(len(totals))]
        starts = torch.tensor([off for off, _ in chunks])
        lengths = torch.tensor([s.length for _, s in chunks])
        return ("chunks", starts, lengths, contexts, torch.tensor(key_starts), torch.tensor(totals))

    def _decode_plan(self, decodes: list[tuple[int, Segment]]) -> tuple:
        """One attention call for all single-token decodes."""
        rows = torch.tensor([off for off, _ in decodes])
        totals = [s.start + 1 for _, s in decodes]
        if self._kernels is not None:
            # The C++ kernel reads K/V in place through the block tables.
            # (at least 2: a compiled step, compiled.py, would specialise a width of 1)
            width = max(2, max(len(s.block_table) for _, s in decodes))
            tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for _, s in decodes])
            return ("paged", rows, tables, torch.tensor(totals))
        # PyTorch path: contexts gathered and right-padded.
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
        self._store(k, v, k_cache, v_cache, self._slot_mapping)
        if self._extra_rows is not None:
            self._store(k[self._extra_rows], v[self._extra_rows], k_cache, v_cache, self._extra_slots)
        out = torch.empty_like(q)
        for kind, *args in self._plan:
            if kind == "fresh":
                start, end, mask = args
                kv = (k[start:end].transpose(0, 1), v[start:end].transpose(0, 1))
                out[start:end] = _attention(q[start:end], *kv, mask)
            elif kind == "context":
                start, end, (index, total), mask = args
                keys = self._context(k_cache, index, total, keys=True)
                values = self._context(v_cache, index, total, keys=False)
                out[start:end] = _attention(q[start:end], keys, values, mask)
            elif kind == "packed":
                starts, lengths = args
                window = self.sliding_window or 0
                self._kernels.prefill_attention_bf16(
                    q, k, v, out, starts, lengths, window, self.head_dim**-0.5
                )
            elif kind == "chunks":
                starts, lengths, contexts, key_starts, key_lengths = args
                keys = torch.cat([self._context(k_cache, i, n, keys=True) for i, n in contexts], dim=1)
                values = torch.cat([self._context(v_cache, i, n, keys=False) for i, n in contexts], dim=1)
                self._kernels.prefill_attention_bf16(
                    q,
                    keys.transpose(0, 1),
                    values.transpose(0, 1),
                    out,
                    starts,
                    lengths,
                    self.sliding_window or 0,
                    self.head_dim**-0.5,
                    key_starts,
                    key_lengths,
                )
            elif kind == "paged":
                rows, tables, lengths = args
                window = self.sliding_window or 0
                scale = self.head_dim**-0.5
                out[rows] = self._kernels.paged_attention(
                    q[rows], k_cache, v_cache, tables, lengths, self.block_size, window, scale, self.tiled
                )
            else:
                rows, index, mask = args
                out[rows] = _decode_attention(q[rows], k_cache[:, index], v_cache[:, index], mask)
        return out

    def _store(self, k, v, k_cache, v_cache, slots) -> None:
        if self._kernels is not None:
            self._kernels.store_kv(k, v, k_cache, v_cache, slots, self.tiled)
        else:
            k_cache.index_copy_(1, slots, k.transpose(0, 1))
            v_cache.index_copy_(1, slots, v.transpose(0, 1))


TILE = 16  # tokens per tile of the tiled layout


def tile_keys(x: torch.Tensor) -> torch.Tensor:
    """Plain [..., n * 16, D] keys -> the tiled layout ([D/2][16][2] per tile), same shape."""
    *lead, m, d = x.shape
    return x.reshape(*lead, m // TILE, TILE, d // 2, 2).transpose(-3, -2).reshape(x.shape)


def untile_keys(x: torch.Tensor) -> torch.Tensor:
    *lead, m, d = x.shape
    return x.reshape(*lead, m // TILE, d // 2, TILE, 2).transpose(-3, -2).reshape(x.shape)


def tile_values(x: torch.Tensor) -> torch.Tensor:
    """Plain [..., n * 16, D] values -> the tiled layout ([8][D][2] per tile), same shape."""
    *lead, m, d = x.shape
    return x.reshape(*lead, m // TILE, TILE // 2, 2, d).transpose(-2, -1).reshape(x.shape)


def untile_values(x: torch.Tensor) -> torch.Tensor:
    *lead, m, d = x.shape
    return x.reshape(*lead, m // TILE, TILE // 2, d, 2).transpose(-2, -1).reshape(x.shape)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed cache tensor; on CPU in transparent huge pages where the OS allows.

    Decode attention reads a few KB from each block of each sequence, all over the cache: with
    4 KB pages nearly every block costs a TLB miss and a page walk, which made the decode kernel
    run at a fraction of the memory bandwidth. 2 MB pages remove most of those walks.

    The memory is touched here, at start-up (llama.cpp clears its KV buffer the same way): left
    untouched, requests pay the page faults the first time each block is used, and with huge
    pages the OS may compact memory inside those faults (1.2 s of a 20 s benchmark run).
    """
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # huge pages switched off: ordinary pages work, just slower
    # The tensor keeps the mapping alive (frombuffer holds a reference to it).
    return torch.frombuffer(buf, dtype=torch.uint8, count=size).view(dtype).view(shape).zero_()


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
