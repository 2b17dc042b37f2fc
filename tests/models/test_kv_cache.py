"""The fused decode path of the paged cache (`attend_decode`) equals the general one (`attend`)."""

from __future__ import annotations

import pytest
import torch

from falconet.config import ModelConfig
from falconet.kernels import cpu_kernels
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.rope import RotaryEmbedding

kernels = cpu_kernels()


@pytest.fixture(scope="module")
def config(tiny_llama_kwargs) -> ModelConfig:
    """The tiny Llama with head_dim 64 (tiny_llama64_dir's shape)."""
    return ModelConfig.from_hf(
        dict(tiny_llama_kwargs, model_type="llama", hidden_size=256, intermediate_size=256)
    )


TREE = Segment([4, 7], 14, 5, tree=(-1, 0, 0, 1, 2))  # a token tree crossing into block 7


@pytest.mark.skipif(kernels is None, reason="needs the C++ kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tree", [False, True])
def test_attend_decode_equals_attend(config, dtype, with_tree):
    rope = RotaryEmbedding(config, 256)
    torch.manual_seed(0)
    # three sequences at different lengths, one crossing into a new block this step
    tables, starts = [[3, 1, 6], [0], [5, 2]], [40, 7, 16]
    caches = [PagedKVCache(config, 8, 16, dtype, num_scratch_blocks=4) for _ in range(2)]
    for cache in caches:  # the same history in both caches
        torch.manual_seed(1)
        cache.k.normal_()
        cache.v.normal_()
    segments = [Segment(t, s, 1) for t, s in zip(tables, starts, strict=True)]
    positions = torch.tensor(starts)
    if with_tree:  # tree rows: each at its depth's position
        segments.append(TREE)
        positions = torch.cat([positions, torch.tensor([14, 15, 15, 16, 16])])
    rows = len(positions)
    width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    qkv = torch.randn(rows, width).to(dtype)

    fused, general = caches
    fused.begin_step(segments)
    assert fused.decode_only
    out = fused.attend_decode(1, qkv.clone(), positions, rope)

    general.begin_step(segments)
    q, k, v = qkv.clone().split([256, 128, 128], dim=-1)
    q, k = rope.rotate(positions, q.reshape(rows, 4, 64), k.reshape(rows, 2, 64))
    ref = general.attend(1, q, k, v.reshape(rows, 2, 64)).reshape(rows, 256)
    assert torch.equal(out, ref)
    assert torch.equal(fused.k, general.k) and torch.equal(fused.v, general.v)


def test_decode_only_only_for_decode_rows(config):
    cache = PagedKVCache(config, 8, 16, torch.float32, num_scratch_blocks=4)
    cache.begin_step([Segment([0], 0, 5)])  # a prompt
    assert not cache.decode_only
    cache.begin_step([Segment([0], 4, 1), Segment([1], 0, 3)])  # a decode beside a prompt
    assert not cache.decode_only
    cache.begin_step([Segment([0], 4, 3, as_decodes=True), Segment([1], 9, 1)])  # a chain and a decode
    assert cache.decode_only == (cache._kernels is not None)
    cache.begin_step([Segment([0], 4, 3, tree=(-1, 0, 0))])  # a tree: decode rows, extra stores
    assert cache.decode_only == (cache._kernels is not None)


@pytest.mark.parametrize("pairs", [[(1, 5), (3, 6)], [(1, 2), (2, 4)]])  # disjoint; chained
def test_copy_blocks_copies_whole_blocks_as_of_before_the_call(config, pairs):
    """Every layer and kv head of each destination block gets its source block's content from
    before the call, also where a destination is another pair's source."""
    cache = PagedKVCache(config, 8, 16, torch.float32)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    k, v = cache.k.clone(), cache.v.clone()
    cache.copy_blocks(pairs)
    copied = {b for _, b in pairs}
    for a, b in pairs:
        assert torch.equal(cache.k[:, :, b * 16 : (b + 1) * 16], k[:, :, a * 16 : (a + 1) * 16])
        assert torch.equal(cache.v[:, :, b * 16 : (b + 1) * 16], v[:, :, a * 16 : (a + 1) * 16])
    for block in set(range(8)) - copied:
        assert torch.equal(
            cache.k[:, :, block * 16 : (block + 1) * 16], k[:, :, block * 16 : (block + 1) * 16]
        )
