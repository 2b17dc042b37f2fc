"""Bookkeeping of a paged KV cache with automatic prefix caching.

Implements the block manager of vLLM's PagedAttention (Kwon et al. 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention"): the KV memory is `num_blocks`
blocks of `block_size` token slots, and each sequence owns a block table (a list of block ids).
On top of it, automatic prefix caching: a full, computed block is registered under a key naming
its whole prefix, so a later prompt starting with the same tokens reuses the block instead of
recomputing it. Unreferenced cached blocks stay in the cache until their memory is needed, and are
then evicted least recently freed first.

Pure Python, no torch: it runs every engine step, so every operation is O(blocks touched).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import count

# A block's key is (parent key id, tuple of its token ids). The parent key id is a small int handed
# out once per distinct key and never reused, so a key id names exactly one full token prefix. This
# makes lookups exact: hash() only picks the dict bucket, and the dict then compares the key tuple
# for equality, so a hash collision costs time, never a wrong match (a wrong match would silently
# attend to another prompt's KV). Chaining through an int id instead of nesting the parent's key
# keeps each key O(block_size) to build, hash and compare, whatever the prefix length.
_ROOT = 0  # key id of the empty prefix: the parent of every sequence's first block
_NONE = -1  # "no key id"

Key = tuple[int, tuple[int, ...]]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"need num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        # Never-used or forgotten blocks; a stack that hands out low ids first.
        self._free = list(range(num_blocks - 1, -1, -1))
        # Cached blocks nobody references, in the order they were freed (oldest first = LRU).
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cache: dict[Key, int] = {}  # key -> the one block registered under it
        self._key: list[Key | None] = [None] * num_blocks  # the key a block is registered under
        # Key id of a block's content chain. Set for registered blocks and also for a private block
        # whose key was already held by another block (it stays unregistered but its children still
        # need their parent id). Held blocks with an id always form a prefix of their table.
        self._kid = [_NONE] * num_blocks
        self._next_kid = count(_ROOT + 1)
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def content_id(self, block_id: int) -> int:
        """An id naming the full token prefix a computed block holds (never reused once the block
        is evicted and refilled), or -1 if it has none (not full, or prefix caching is off)."""
        return self._kid[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def record_query(self, num_tokens: int, num_cached: int) -> None:
        """Count one prompt lookup in the hit rate."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_cached

    def match_prefix(self, token_ids: list[int], record: bool = True) -> tuple[list[int], int]:
        """Longest run of cached full blocks equal to the prefix of token_ids; takes a reference on
        each and returns (block_ids, num_cached_tokens). The last token is never reported cached: the
        engine must run at least one prompt token to get logits. `record=False` leaves the hit
        rate alone (a caller that may hand the blocks back records the lookup that sticks)."""
        if not self.enable_prefix_caching:
            if record:
                self.record_query(len(token_ids), 0)
            return [], 0
        bs = self.block_size
        blocks: list[int] = []
        parent = _ROOT
        for i in range((len(token_ids) - 1) // bs):
            block = self._cache.get((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self._kid[block]
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]  # referenced again: no longer a candidate for eviction
            self._ref[block] += 1
        num_cached = len(blocks) * bs
        if record:
            self.record_query(len(token_ids), num_cached)
        return blocks, num_cached

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(block_table) <= self.num_free_blocks

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to block_table in place until it holds num_tokens tokens."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        for _ in range(need):
            if self._free:  # truly free blocks first: evicting loses a cached prefix
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)  # least recently freed
                del self._cache[self._key[block]]
                self._key[block] = None
                self._kid[block] = _NONE
            self._ref[block] = 1
            block_table.append(block)

    def cache_full_blocks(self, block_table: list[int], token_ids: list[int], num_computed: int) -> None:
        """Register every full block whose tokens are all computed (positions < num_computed)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        end = min(num_computed, len(token_ids)) // bs
        end = min(end, len(block_table))
        # Blocks that already have a key id are a prefix of the table: walk back to its end, which is
        # usually 0 or 1 step, so a decode step costs O(1) rather than O(sequence length).
        start = end
        while start > 0 and self._kid[block_table[start - 1]] == _NONE:
            start -= 1
        parent = self._kid[block_table[start - 1]] if start else _ROOT
        for i in range(start, end):
            block = block_table[i]
            key = (parent, tuple(token_ids[i * bs : (i + 1) * bs]))
            holder = self._cache.get(key)
            if holder is None:
                self._cache[key] = block
                self._key[block] = key
                self._kid[block] = next(self._next_kid)
            else:
                # Same prefix already cached in another block: keep that mapping, leave this block
                # unregistered (it is freed normally), but record the id so its children chain on.
                self._kid[block] = self._kid[holder]
            parent = self._kid[block]

    def free(self, block_table: list[int]) -> None:
        """Drop one reference on each block of the table."""
        # Release the tail first: a later block is useless without its prefix, so under LRU it should
        # be evicted before the blocks that lead to it.
        for block in reversed(block_table):
            ref = self._ref[block] - 1
            if ref < 0:
                raise RuntimeError(f"block {block} freed more often than referenced")
            self._ref[block] = ref
            if ref:
                continue
            if self._key[block] is not None:
                self._evictable[block] = None
            else:
                self._kid[block] = _NONE
                self._free.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget the keys of all unreferenced cached blocks (they become plain free blocks)."""
        for block in self._evictable:
            del self._cache[self._key[block]]
            self._key[block] = None
            self._kid[block] = _NONE
            self._free.append(block)
        self._evictable.clear()
