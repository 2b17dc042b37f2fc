"""The C++ paged attention kernel against the PyTorch path (gather, then two matmuls)."""

import pytest
import torch

from falconet.kernels import cpu_kernels
from falconet.models.kv_cache import _decode_attention, tile_keys, tile_values

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="C++ kernels could not be built here")


def _layouts(dim, block_size, group):
    """The plain layout, and the tiled one where this CPU and shape have its kernel."""
    return [False, True] if kernels is not None and kernels.has_tiled_kv(dim, block_size, group) else [False]


def _case(dtype, heads, kv_heads, dim, block_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    k_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, dim, generator=g).to(dtype)
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered through the cache
    tables, used = [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(perm[used : used + count])
        used += count
    return q, k_cache, v_cache, tables


def _reference(q, k_cache, v_cache, tables, lengths, block_size, window):
    width = max(lengths)
    index = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        slots = (torch.tensor(table)[:, None] * block_size + torch.arange(block_size)).flatten()
        index[i, :n] = slots[:n]
    k_pos, q_pos = torch.arange(width), torch.tensor(lengths)[:, None] - 1
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return _decode_attention(q, k_cache[:, index], v_cache[:, index], mask[:, None, :])


def _kernel(q, k_cache, v_cache, tables, lengths, block_size, window, tiled=False):
    """The kernel over caches given in the plain layout (converted first when `tiled`)."""
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    dim = q.shape[-1]
    if tiled:
        k_cache, v_cache = tile_keys(k_cache), tile_values(v_cache)
    return kernels.paged_attention(
        q, k_cache, v_cache, padded, torch.tensor(lengths), block_size, window, dim**-0.5, tiled
    )


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size,window",
    [
        (9, 3, 64, 16, 0),  # SmolLM2's shape: the specialised head_dim 64
        (4, 4, 128, 16, 0),  # no GQA, head_dim 128 (Llama)
        (6, 2, 40, 4, 0),  # generic head_dim, small blocks
        (8, 2, 64, 8, 5),  # sliding window shorter than most contexts
    ],
)
def test_kernel_matches_pytorch_path_float32(heads, kv_heads, dim, block_size, window):
    lengths = [1, 2, block_size, block_size + 1, 37, 130]
    q, k, v, tables = _case(torch.float32, heads, kv_heads, dim, block_size, lengths)
    got = _kernel(q, k, v, tables, lengths, block_size, window)
    want = _reference(q, k, v, tables, lengths, block_size, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size,window",
    [
        (9, 3, 64, 16, 0),  # plain and, where the CPU has AVX512-BF16, tiled
        (8, 2, 128, 32, 0),
        (4, 1, 256, 16, 0),
        (16, 2, 64, 16, 0),  # 8 query heads a kv head: two passes of 4
        (6, 1, 128, 16, 0),  # 6: passes of 4 and 2 (scores), of 2 (values)
        (9, 3, 64, 16, 21),  # sliding window starting mid-tile
        (6, 2, 40, 4, 0),  # plain only: head_dim not a multiple of 32
    ],
)
def test_kernel_matches_pytorch_path_bfloat16(heads, kv_heads, dim, block_size, window):
    lengths = [1, 2, 17, 33, 64, 300]
    q, k, v, tables = _case(torch.bfloat16, heads, kv_heads, dim, block_size, lengths, seed=1)
    # Both round to bf16 at different points, so compare each against a float32 ground truth.
    truth = _reference(q.float(), k.float(), v.float(), tables, lengths, block_size, window)
    err_torch = (_reference(q, k, v, tables, lengths, block_size, window).float() - truth).abs().max().item()
    for tiled in _layouts(dim, block_size, heads // kv_heads):
        got = _kernel(q, k, v, tables, lengths, block_size, window, tiled)
        assert got.dtype == torch.bfloat16
        err_kernel = (got.float() - truth).abs().max().item()
        assert err_kernel <= 2e-2 and err_kernel <= 2 * err_torch + 1e-3, (tiled, err_kernel, err_torch)


def test_rows_are_independent_of_the_batch():
    """A row's result is bitwise the same alone or batched: outputs cannot depend on batch mates."""
    lengths = [5, 77, 200]
    q, k, v, tables = _case(torch.bfloat16, 9, 3, 64, 16, lengths, seed=2)
    for tiled in _layouts(64, 16, 3):
        batched = _kernel(q, k, v, tables, lengths, 16, 0, tiled)
        for i in range(len(lengths)):
            one = q[i : i + 1].contiguous()
            alone = _kernel(one, k, v, tables[i : i + 1], lengths[i : i + 1], 16, 0, tiled)
            assert torch.equal(alone[0], batched[i])


@pytest.mark.parametrize("heads,dim", [(3, 64), (8, 64), (6, 128), (3, 256)])
def test_query_heads_are_independent_of_their_group(heads, dim):
    """The tiled kernel takes several query heads of a kv head at once; each head's result is
    bitwise what it gets as the only query head of its kv head."""
    if not _layouts(dim, 16, heads)[-1]:
        pytest.skip("needs the tiled bf16 kernel")
    lengths = [1, 31, 300]
    q, k, v, tables = _case(torch.bfloat16, heads, 1, dim, 16, lengths, seed=4)
    grouped = _kernel(q, k, v, tables, lengths, 16, 0, tiled=True)
    for h in range(heads):
        alone = _kernel(q[:, h : h + 1].contiguous(), k, v, tables, lengths, 16, 0, tiled=True)
        assert torch.equal(alone[:, 0], grouped[:, h])


def test_bad_inputs_raise():
    q, k, v, tables = _case(torch.float32, 9, 3, 64, 16, [20])
    with pytest.raises(RuntimeError):
        kernels.paged_attention(q.double(), k, v, torch.tensor(tables), torch.tensor([20]), 16, 0, 0.125)
    with pytest.raises(RuntimeError):
        int32_tables = torch.tensor(tables, dtype=torch.int32)
        kernels.paged_attention(q, k, v, int32_tables, torch.tensor([20]), 16, 0, 0.1)
    with pytest.raises(RuntimeError, match="tiled"):  # the tiled layout is bf16 only
        kernels.paged_attention(q, k, v, torch.tensor(tables), torch.tensor([20]), 16, 0, 0.1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unwritten_slots_are_never_read(dtype):
    """Slots past a sequence's length (the rest of its last block) may hold anything, even NaN."""
    lengths = [3, 18, 45]
    q, k, v, tables = _case(dtype, 9, 3, 64, 16, lengths, seed=3)
    written = torch.zeros(k.shape[1], dtype=torch.bool)
    for table, n in zip(tables, lengths, strict=True):
        slots = (torch.tensor(table)[:, None] * 16 + torch.arange(16)).flatten()[:n]
        written[slots] = True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, ~written], poisoned_v[:, ~written] = float("nan"), float("nan")
    for tiled in _layouts(64, 16, 3) if dtype == torch.bfloat16 else [False]:
        clean = _kernel(q, k, v, tables, lengths, 16, 0, tiled)
        assert torch.equal(_kernel(q, poisoned_k, poisoned_v, tables, lengths, 16, 0, tiled), clean)
