"""Token-tree rows attend exactly like decoding their own path one token at a time.

A tree segment's row for a node must see the cached prefix and the node's ancestors only; the
branch layout (models/tree_attention.py) makes every row a plain decode over its branch's block
table, so its logits equal, bit for bit, those of decoding that path step by step. After `commit`
the chosen path's entries sit in the sequence's own blocks, as if it had been decoded.
"""

from __future__ import annotations

import pytest
import torch

from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.linear import bf16_linear_kernels
from falconet.models.loader import load_model
from falconet.models.tree_attention import branches, depths, scratch_blocks_needed

# parents of nodes 0..: two chains off the root, a fork below node 1, a lone leaf
TREE = [-1, 0, 1, -1, 3, 1, 5, 0, -1, 2, 9]


def test_depths_and_branches():
    assert depths(TREE) == [1, 2, 3, 1, 2, 3, 4, 2, 1, 4, 5]
    assert branches(TREE) == [0, 0, 0, 1, 1, 2, 2, 3, 4, 0, 0]
    with pytest.raises(ValueError):
        depths([0])  # a node cannot be its own parent
    # branch 0 uses the sequence's blocks; the others take blocks from the one holding start + 1
    assert scratch_blocks_needed([-1, 0], 10, 4) == 0
    assert scratch_blocks_needed([-1, -1, 1, 2], 10, 4) == 2  # positions 11..13: blocks 2 and 3


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_llama_dir, tiny_llama64_dir):
    dtype = getattr(torch, request.param)
    # bf16 with head_dim 64 runs the tiled cache and the C++ decode kernel where they exist
    path = tiny_llama64_dir if dtype is torch.bfloat16 else tiny_llama_dir
    return load_model(path, dtype=dtype, with_tokenizer=False).model


def _path(parents: list[int], node: int) -> list[int]:
    out = []
    while node >= 0:
        out.append(node)
        node = parents[node]
    return out[::-1]


@pytest.mark.parametrize("block_size,start", [(16, 37), (16, 47), (16, 44), (4, 9)])
def test_tree_rows_equal_decoding_each_path(model, block_size, start):
    dtype = model.embed_tokens.weight.dtype
    # bf16 runs our kernels, which compute each row alone in a fixed order: bitwise equal
    exact = dtype is torch.bfloat16 and bf16_linear_kernels() is not None
    if block_size % 16 and dtype is torch.bfloat16:
        block_size = 16
    gen = torch.Generator().manual_seed(start)
    prompt = torch.randint(0, 97, (start + 1,), generator=gen)
    tokens = torch.randint(0, 97, (len(TREE),), generator=gen).tolist()
    table = list(range(40))[::-1]

    def fresh_cache():
        cache = PagedKVCache(model.config, 48, block_size, dtype, num_scratch_blocks=16)
        cache.begin_step([Segment(table, 0, start)])
        model(prompt[:start], torch.arange(start), cache)
        return cache

    with torch.no_grad():
        cache = fresh_cache()
        parents = [-1] + [p + 1 for p in TREE]
        cache.begin_step([Segment(table, start, 1 + len(TREE), as_decodes=True, tree=tuple(parents))])
        ids = torch.tensor([int(prompt[start])] + tokens)
        pos = torch.tensor([start] + [start + d for d in depths(TREE)])
        tree_logits = model.compute_logits(model(ids, pos, cache))
        committed_node = 6  # on branch 2: its path moves into the sequence's blocks
        cache.commit_tree(0, committed_node)
        committed = cache.k.clone(), cache.v.clone()

        for leaf in range(len(TREE)):
            path = _path(TREE, leaf)
            ref = fresh_cache()
            seq = [int(prompt[start])] + [tokens[j] for j in path]
            rows = []
            for i, tok in enumerate(seq):
                ref.begin_step([Segment(table, start + i, 1)])
                rows.append(model.compute_logits(model(torch.tensor([tok]), torch.tensor([start + i]), ref)))
            expected, got = torch.cat(rows), tree_logits[[0] + [j + 1 for j in path]]
            if exact:
                assert torch.equal(expected, got), leaf
            else:  # torch's float32 matmul may sum a batch of rows in another order than one row
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            if leaf == committed_node:
                n = start + len(seq)  # positions the path's decode wrote
                for got, exp, keys in ((committed[0], ref.k, True), (committed[1], ref.v, False)):
                    a, b = _positions(ref, got, table, n, keys), _positions(ref, exp, table, n, keys)
                    assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _positions(cache, tensor, table, n, keys):
    """Entries of positions [0, n) through `table`, in the plain layout."""
    from falconet.models.kv_cache import untile_keys, untile_values

    bs = cache.block_size
    blocks = torch.tensor(table[: -(-n // bs)])
    x = tensor[:, :, (blocks[:, None] * bs + torch.arange(bs)).flatten()]
    if cache.tiled:
        x = (untile_keys if keys else untile_values)(x)
    return x[:, :, :n]
