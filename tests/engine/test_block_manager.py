"""The paged KV-cache block manager: accounting, ref counts, prefix matching, LRU eviction."""

from __future__ import annotations

import random

import pytest

from falconet.engine.block_manager import BlockManager


def _prefill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """What the engine does for a new prompt: match, grow, compute everything, register."""
    table, _ = bm.match_prefix(tokens)
    bm.grow(table, len(tokens))
    bm.cache_full_blocks(table, tokens, len(tokens))
    return table


def check_invariants(bm: BlockManager, tables: list[list[int]]) -> None:
    """Every block is in exactly one place and the counts agree with the live tables."""
    held: dict[int, int] = {}
    for t in tables:
        assert len(set(t)) == len(t), "a table holds a block twice"
        for b in t:
            held[b] = held.get(b, 0) + 1
    free, evictable = bm._free, list(bm._evictable)
    assert len(set(free)) == len(free)
    assert not set(free) & set(evictable)
    assert not (set(free) | set(evictable)) & held.keys()
    assert len(free) + len(evictable) + len(held) == bm.num_blocks
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == held.get(b, 0) >= 0
    assert bm.num_free_blocks == bm.num_blocks - len(held)
    for b in free:
        assert bm._key[b] is None
    for b in evictable:
        assert bm._key[b] is not None
    keyed = [b for b in range(bm.num_blocks) if bm._key[b] is not None]
    assert len(bm._cache) == len(keyed)
    for b in keyed:
        assert bm._cache[bm._key[b]] == b


def test_blocks_needed():
    bm = BlockManager(4, 16)
    assert [bm.blocks_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_alloc_free_accounting():
    bm = BlockManager(10, 4)
    a, b = [], []
    bm.grow(a, 9)  # 3 blocks
    bm.grow(b, 4)  # 1 block
    assert len(a) == 3 and len(b) == 1 and bm.num_free_blocks == 6
    bm.grow(a, 12)  # still 3 blocks: no-op
    assert len(a) == 3
    bm.grow(a, 13)
    assert len(a) == 4 and bm.num_free_blocks == 5
    check_invariants(bm, [a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10
    check_invariants(bm, [])


def test_shared_prefix_ref_counts():
    bm = BlockManager(10, 4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = _prefill(bm, prompt)
    b, n = bm.match_prefix(prompt[:8] + [99, 98, 97])
    assert n == 8 and b == a[:2]
    bm.grow(b, 11)
    assert [bm.ref_count(x) for x in a] == [2, 2, 1]
    assert bm.ref_count(b[2]) == 1 and b[2] != a[2]
    check_invariants(bm, [a, b])
    bm.free(a)
    assert [bm.ref_count(x) for x in b] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10
    check_invariants(bm, [])


def test_match_only_full_blocks():
    bm = BlockManager(10, 4)
    prompt = list(range(10))
    bm.free(_prefill(bm, prompt))
    # The partial third block (tokens 8, 9) is never cached.
    blocks, n = bm.match_prefix(prompt)
    assert len(blocks) == 2 and n == 8
    bm.free(blocks)
    # Longer prompt with the same start: still just the two full blocks.
    blocks, n = bm.match_prefix(prompt + [10, 11, 12])
    assert n == 8
    bm.free(blocks)
    check_invariants(bm, [])


def test_exact_multiple_leaves_last_block_out():
    bm = BlockManager(10, 4)
    prompt = list(range(12))  # exactly 3 blocks
    bm.free(_prefill(bm, prompt))
    blocks, n = bm.match_prefix(prompt)
    assert len(blocks) == 2 and n == 8  # the last prompt token must be computed
    bm.free(blocks)
    blocks, n = bm.match_prefix(prompt + [12])
    assert len(blocks) == 3 and n == 12
    bm.free(blocks)
    assert bm.match_prefix([]) == ([], 0)
    assert bm.match_prefix([0]) == ([], 0)


def test_hash_chain():
    bm = BlockManager(10, 4)
    bm.free(_prefill(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # Different token in block 2: only block 1 matches.
    blocks, n = bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 9, 0])
    assert n == 4
    bm.free(blocks)
    # Same block-2 tokens after a different block 1: nothing matches.
    blocks, n = bm.match_prefix([1, 2, 3, 0, 5, 6, 7, 8, 0])
    assert (blocks, n) == ([], 0)


def test_cache_full_blocks_incremental_and_idempotent():
    bm = BlockManager(10, 4)
    tokens = [5, 6, 7]
    table: list[int] = []
    bm.grow(table, len(tokens))
    bm.cache_full_blocks(table, tokens, 3)
    assert not bm._cache
    for t in range(8, 15):  # decode one token at a time
        tokens.append(t)
        bm.grow(table, len(tokens))
        bm.cache_full_blocks(table, tokens, len(tokens) - 1)  # the new token's KV is not written yet
        bm.cache_full_blocks(table, tokens, len(tokens) - 1)
    assert len(bm._cache) == 2  # tokens 5..13 computed (14 pending): two full blocks
    bm.free(table)
    blocks, n = bm.match_prefix(tokens[:9])
    assert n == 8 and blocks == table[:2]
    bm.free(blocks)
    check_invariants(bm, [])


def test_duplicate_key_keeps_existing_block():
    bm = BlockManager(10, 4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # Two sequences compute the same prompt concurrently (neither could match the other).
    a, b = [], []
    bm.grow(a, 9)
    bm.grow(b, 9)
    bm.cache_full_blocks(a, prompt, 9)
    bm.cache_full_blocks(b, prompt, 9)
    assert len(bm._cache) == 2 and {bm._cache[k] for k in bm._cache} == set(a[:2])
    # b's duplicates chain on correctly: its third block, once full, is reachable through a's blocks.
    b_tokens = prompt + [10, 11, 12, 13]
    bm.grow(b, 13)
    bm.cache_full_blocks(b, b_tokens, 13)
    check_invariants(bm, [a, b])
    bm.free(b)
    assert bm.num_free_blocks == 10 - 3  # b's duplicates went plain free, its third block cached
    assert list(bm._evictable) == [b[2]]
    blocks, n = bm.match_prefix(b_tokens)
    assert blocks == a[:2] + [b[2]] and n == 12
    bm.free(blocks)
    bm.free(a)
    assert bm.num_free_blocks == 10
    check_invariants(bm, [])


def test_lru_eviction_order():
    bm = BlockManager(4, 2)
    p1, p2 = [1, 1, 1], [2, 2, 2]  # one full block each
    t1, t2 = _prefill(bm, p1), _prefill(bm, p2)
    bm.free(t1)  # p1's full block freed first -> least recently used
    bm.free(t2)
    assert bm.num_free_blocks == 4
    x: list[int] = []
    bm.grow(x, 4)  # takes the 2 truly free blocks: nothing evicted yet
    assert bm.match_prefix(p1)[1] == 2 and bm.match_prefix(p2)[1] == 2
    bm.free([t2[0]])  # this time p2's block is freed first
    bm.free([t1[0]])
    y: list[int] = []
    bm.grow(y, 2)  # evicts p2's block, now the least recently freed
    assert y == [t2[0]]
    assert bm.match_prefix(p2) == ([], 0)
    blocks, n = bm.match_prefix(p1)
    assert n == 2
    bm.free(blocks)
    bm.grow(y, 4)
    assert y == [t2[0], t1[0]] and bm.match_prefix(p1) == ([], 0)
    check_invariants(bm, [x, y])


def test_free_releases_tail_first():
    bm = BlockManager(3, 2)
    prompt = [1, 2, 3, 4, 5]
    t = _prefill(bm, prompt)
    bm.free(t)
    x: list[int] = []
    bm.grow(x, 2)  # the partial block: plain free
    assert x == [t[2]]
    bm.grow(x, 4)  # evicts the second block before the first, so the first still matches
    assert x[1] == t[1]
    blocks, n = bm.match_prefix(prompt)
    assert blocks == [t[0]] and n == 2
    bm.free(blocks)


def test_referenced_cached_blocks_never_evicted():
    bm = BlockManager(3, 2)
    prompt = [1, 2, 3]
    t = _prefill(bm, prompt)  # 2 blocks, first cached and referenced
    assert bm.num_free_blocks == 1
    x: list[int] = []
    assert not bm.can_grow(x, 4)
    with pytest.raises(RuntimeError):
        bm.grow(x, 4)
    assert x == [] and bm.num_free_blocks == 1
    bm.grow(x, 2)
    assert t[0] not in x and bm.match_prefix(prompt)[1] == 2
    check_invariants(bm, [t, x, [t[0]]])


def test_can_grow_agrees_with_grow():
    bm = BlockManager(5, 3)
    a: list[int] = []
    for n in range(0, 20):
        ok = bm.can_grow(a, n)
        assert ok == (bm.blocks_needed(n) <= 5)
        if ok:
            bm.grow(a, n)
        else:
            with pytest.raises(RuntimeError):
                bm.grow(a, n)
    assert len(a) == 5 and bm.num_free_blocks == 0


def test_hit_rate():
    bm = BlockManager(10, 4)
    assert bm.hit_rate == 0.0
    prompt = list(range(10))
    t = _prefill(bm, prompt)  # 10 queried, 0 hit
    b, _ = bm.match_prefix(prompt)  # 10 queried, 8 hit
    c, _ = bm.match_prefix(list(range(4)) + [0] * 6)  # 10 queried, 4 hit
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (30, 12)
    assert bm.hit_rate == pytest.approx(12 / 30)
    for x in (t, b, c):
        bm.free(x)


def test_prefix_caching_disabled():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    prompt = [1, 2, 3, 4, 5]
    t = _prefill(bm, prompt)
    assert not bm._cache
    bm.free(t)
    assert bm.num_free_blocks == 4 and bm.match_prefix(prompt) == ([], 0)
    assert bm.hit_rate == 0.0
    check_invariants(bm, [])


def test_reset_prefix_cache():
    bm = BlockManager(6, 2)
    p, q = [1, 2, 3], [4, 5, 6]
    tp, tq = _prefill(bm, p), _prefill(bm, q)
    bm.free(tp)
    bm.reset_prefix_cache()
    assert bm.match_prefix(p) == ([], 0)
    blocks, n = bm.match_prefix(q)  # q's block is still referenced, so it keeps its key
    assert n == 2
    check_invariants(bm, [tq, blocks])
    bm.free(tq)
    bm.free(blocks)
    assert bm.num_free_blocks == 6


@pytest.mark.parametrize("enable", [True, False])
def test_randomized(enable):
    """Many sequences sharing prefixes, grown, decoded, cached and freed in random order. Besides
    the accounting invariants, a model of each block's KV content checks every prefix hit is exact."""
    rng = random.Random(0)
    bs, nb = 4, 48
    bm = BlockManager(nb, bs, enable_prefix_caching=enable)
    content: list[list[int | None]] = [[None] * bs for _ in range(nb)]  # the "KV" in each slot
    stems = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(6)]
    live: list[tuple[list[int], list[int], int]] = []  # (table, tokens, num_computed)

    def write(table: list[int], tokens: list[int], lo: int, hi: int) -> None:
        for pos in range(lo, hi):
            content[table[pos // bs]][pos % bs] = tokens[pos]

    for _ in range(3000):
        op = rng.random()
        if op < 0.3:  # admit a new prompt
            tokens = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
            if not tokens:
                continue
            table, n = bm.match_prefix(tokens)
            assert n < len(tokens) and n == len(table) * bs
            for pos in range(n):  # an exact hit: the cached KV is this prompt's own
                assert content[table[pos // bs]][pos % bs] == tokens[pos]
            if not bm.can_grow(table, len(tokens)):
                with pytest.raises(RuntimeError):
                    bm.grow(list(table), len(tokens))
                bm.free(table)
                check_invariants(bm, [t for t, _, _ in live])
                continue
            bm.grow(table, len(tokens))
            write(table, tokens, n, len(tokens))
            bm.cache_full_blocks(table, tokens, len(tokens))
            live.append((table, tokens, len(tokens)))
        elif op < 0.75 and live:  # a decode step: one new token, its KV written next step
            i = rng.randrange(len(live))
            table, tokens, computed = live[i]
            if not bm.can_grow(table, len(tokens) + 1):
                continue
            tokens = tokens + [rng.randrange(3)]
            bm.grow(table, len(tokens))
            write(table, tokens, computed, len(tokens) - 1)
            bm.cache_full_blocks(table, tokens, len(tokens) - 1)
            live[i] = (table, tokens, len(tokens) - 1)
        elif op < 0.98 and live:  # finish
            table, _, _ = live.pop(rng.randrange(len(live)))
            bm.free(table)
        elif op >= 0.98:
            bm.reset_prefix_cache()
        check_invariants(bm, [t for t, _, _ in live])
    for table, _, _ in live:
        bm.free(table)
    check_invariants(bm, [])
    assert bm.num_free_blocks == nb
    if enable:
        assert bm.hit_rate > 0
