"""The bfloat16 CPU fast paths keep the engine's identities.

With AVX512-BF16 a bf16 engine stores its KV cache tiled (see models/kv_cache.py), runs fresh
prompts and chunk continuations through the flash prefill kernel and decodes through the tiled
paged kernel. Every kernel computes each row on its own, in a fixed order, so batching, chunking,
preemption and prefix caching must still give exactly the tokens of a request run alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.kernels import cpu_kernels
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.has_tiled_kv(64, 16, 2), reason="needs the AVX512-BF16 kernels"
)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny64(tiny_llama64_dir):
    return load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False)


def make_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(loaded, prompts, params=GREEDY, **options):
    engine = LLMEngine(loaded, EngineConfig(**options))
    assert engine.kv_cache.tiled
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [r.output_ids for r in reqs], engine


def alone(loaded, prompts, params=GREEDY):
    return [run(loaded, [p], params, enable_prefix_caching=False)[0][0] for p in prompts]


def test_batched_and_chunked_equal_alone(tiny64):
    prompts = make_prompts(12, seed=0, lo=1, hi=200)
    reference = alone(tiny64, prompts)
    batched, _ = run(tiny64, prompts, max_num_seqs=12)
    assert batched == reference
    chunked, engine = run(tiny64, prompts, max_num_seqs=12, max_num_batched_tokens=48)
    assert chunked == reference
    assert engine.stats.num_steps > sum(map(len, prompts)) // 48  # prompts were chunked


def test_preemption_and_prefix_cache_keep_outputs(tiny64):
    system = make_prompts(1, seed=1, lo=70, hi=70)[0]
    prompts = [system + p for p in make_prompts(6, seed=2, lo=1, hi=40)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = alone(tiny64, prompts, params)
    outs, engine = run(tiny64, prompts, params, max_num_seqs=6, num_kv_blocks=16)
    assert engine.scheduler.num_preemptions > 0
    assert engine.prefix_cache_hit_rate > 0
    assert outs == reference


def _logits(model, chunks: list[int], prompt: torch.Tensor) -> torch.Tensor:
    cache = PagedKVCache(model.config, 64, 16, torch.bfloat16)
    table, out, start = list(range(40))[::-1], [], 0
    for n in chunks:
        cache.begin_step([Segment(table, start, n)])
        h = model(prompt[start : start + n], torch.arange(start, start + n), cache)
        out.append(model.compute_logits(h).float())
        start += n
    return torch.cat(out)


def test_chunks_equal_the_whole_prompt_and_decode_is_close(tiny64):
    """Chunk continuations visit the same key tiles in the same order as the whole prompt, so
    their logits are bitwise equal; single-token decodes use the paged kernel, whose sums run in
    another order: within 0.05 of logits of order 1 (a few bf16 steps)."""
    model = tiny64.model
    prompt = torch.tensor(make_prompts(1, seed=3, lo=150, hi=150)[0])
    with torch.no_grad():
        whole = _logits(model, [150], prompt)
        assert torch.equal(_logits(model, [40, 33, 64, 13], prompt), whole)
        decoded = _logits(model, [120] + [1] * 30, prompt)
    assert torch.equal(decoded[:120], whole[:120])
    err = (decoded[120:] - whole[120:]).abs().max().item()
    assert err <= 0.05 * whole.abs().max().item(), err
