"""Continuous batching, prefix caching, chunked prefill and preemption never change an output."""

from __future__ import annotations

import random

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.engine.request import RequestStatus
from falconet.errors import FalconetError
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def make_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run(loaded, prompts, params=GREEDY, **options) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded, EngineConfig(**options))
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(5000):  # a livelocked scheduler fails here instead of hanging
        if not engine.has_unfinished():
            break
        engine.step()
    assert all(r.status is RequestStatus.FINISHED for r in reqs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # all freed
    return [r.output_ids for r in reqs], engine


def run_alone(loaded, prompts, params=GREEDY) -> list[list[int]]:
    return [run(loaded, [p], params, enable_prefix_caching=False)[0][0] for p in prompts]


def test_batched_equals_alone(tiny):
    prompts = make_prompts(16)
    together, engine = run(tiny, prompts, max_num_seqs=16)
    assert together == run_alone(tiny, prompts)
    assert engine.stats.num_steps < 16 * GREEDY.max_tokens  # they really shared steps


@pytest.mark.parametrize("budget", [7, 32])
def test_chunked_prefill_equals_alone(tiny, budget):
    prompts = make_prompts(8, seed=1, lo=20, hi=150)
    outs, engine = run(tiny, prompts, max_num_seqs=8, max_num_batched_tokens=budget)
    assert outs == run_alone(tiny, prompts)
    assert engine.stats.num_steps > sum(map(len, prompts)) // budget  # prompts were chunked


def test_without_chunked_prefill(tiny):
    prompts = make_prompts(6, seed=2)
    outs, _ = run(tiny, prompts, max_num_batched_tokens=16, enable_chunked_prefill=False)
    assert outs == run_alone(tiny, prompts)


def test_forced_preemption_keeps_outputs(tiny):
    prompts = make_prompts(10, seed=3, lo=30, hi=60)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs, engine = run(tiny, prompts, params, max_num_seqs=10, block_size=4, num_kv_blocks=60)
    assert engine.scheduler.num_preemptions > 0
    assert outs == run_alone(tiny, prompts, params)


def test_prefix_cache_hit_skips_computation(tiny):
    system = make_prompts(1, seed=4, lo=64, hi=64)[0]
    a, b = system + [1, 2, 3], system + [4, 5, 6, 7]
    engine = LLMEngine(tiny, EngineConfig(block_size=16))
    for prompt in (a, b):
        req = engine.add_request(prompt, GREEDY)
        while engine.has_unfinished():
            engine.step()
        assert req.output_ids == run_alone(tiny, [prompt])[0]
    # b recomputed only what follows the 64 cached tokens (4 full blocks)
    computed_b = engine.stats.num_computed_tokens - (len(a) + GREEDY.max_tokens - 1)
    assert computed_b == len(b) - 64 + GREEDY.max_tokens - 1
    assert engine.prefix_cache_hit_rate == pytest.approx(64 / (len(a) + len(b)))


def test_hit_rate_counts_a_waiting_request_once(tiny):
    """A request waiting for KV blocks looks its prefix up again at every step; the hit rate
    counts its prompt once, when it is admitted."""
    a, b = make_prompts(2, seed=6, lo=40, hi=40)
    engine = LLMEngine(tiny, EngineConfig(block_size=4, num_kv_blocks=14))  # 56 slots: one at a time
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request(a, params)
    rb = engine.add_request(b, params)
    waited = 0
    while engine.has_unfinished():
        engine.step()
        waited += rb.status is RequestStatus.WAITING
    assert waited >= 3
    assert engine.block_manager.num_queried_tokens == len(a) + len(b)


def test_prefix_cache_exact_multiple_computes_last_token(tiny):
    prompt = make_prompts(1, seed=5, lo=32, hi=32)[0]
    outs, engine = run(tiny, [prompt, prompt], max_num_seqs=1, block_size=16)
    assert outs[0] == outs[1] == run_alone(tiny, [prompt])[0]


def test_seeded_sampling_independent_of_batch(tiny):
    prompts = make_prompts(6, seed=6)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    alone = run(tiny, [prompts[0]], params)[0][0]
    mixed, _ = run(tiny, prompts, params, max_num_seqs=6, max_num_batched_tokens=40)
    assert mixed[0] == alone


def test_decodes_are_not_stalled_by_a_long_prompt(tiny):
    """Stall-free batching: while a long prompt is prefilled in chunks, every running decode
    still gets one token per step."""
    engine = LLMEngine(tiny, EngineConfig(max_num_batched_tokens=16))
    short = [
        engine.add_request(p, SamplingParams(max_tokens=40, temperature=0)) for p in make_prompts(3, 7, 2, 5)
    ]
    while any(not r.output_ids for r in short):
        engine.step()
    long = engine.add_request(make_prompts(1, 8, 150, 150)[0], GREEDY)
    while long.num_computed < len(long.prompt_ids):
        before = [len(r.output_ids) for r in short]
        engine.step()
        assert [len(r.output_ids) for r in short] == [n + 1 for n in before]


def test_request_that_can_never_fit_is_rejected(tiny):
    engine = LLMEngine(tiny, EngineConfig(block_size=4, num_kv_blocks=5))
    with pytest.raises(FalconetError, match="KV cache"):
        engine.add_request(list(range(30)), GREEDY)


def test_abort_frees_blocks(tiny):
    engine = LLMEngine(tiny, EngineConfig())
    req = engine.add_request(list(range(40)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    engine.step()
    engine.abort(req)
    assert req.finish_reason == "abort" and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _prefill_logits(model, chunks: list[int], prompt: torch.Tensor) -> torch.Tensor:
    cache = PagedKVCache(model.config, 64, 4, torch.float32)
    table, out, start = list(range(40)), [], 0
    for n in chunks:
        cache.begin_step([Segment(table, start, n)])
        out.append(
            model.compute_logits(model(prompt[start : start + n], torch.arange(start, start + n), cache))
        )
        start += n
    return torch.cat(out)


def test_chunked_and_packed_prefill_logits_equal_whole_prompt(tiny):
    """Tolerance 1e-5 (float32): chunking changes only the shapes of the matmuls."""
    model = tiny.model
    torch.manual_seed(0)
    prompt = torch.randint(0, 97, (50,))
    with torch.no_grad():
        whole = _prefill_logits(model, [50], prompt)
        torch.testing.assert_close(
            _prefill_logits(model, [7, 7, 13, 1, 22], prompt), whole, atol=1e-5, rtol=0
        )
        # three prompts packed into one sequence (block-diagonal mask, restarted positions)
        parts = [prompt[:20], prompt[20:23], prompt[23:]]
        cache = PagedKVCache(model.config, 64, 4, torch.float32)
        segs = [Segment([0, 1, 2, 3, 4], 0, 20), Segment([5], 0, 3), Segment(list(range(6, 14)), 0, 27)]
        cache.begin_step(segs)
        positions = torch.cat([torch.arange(len(p)) for p in parts])
        packed = model.compute_logits(model(prompt, positions, cache))
        alone = torch.cat([_prefill_logits(model, [len(p)], p) for p in parts])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [9, 2048])
def test_prompt_logprobs_match_full_forward(tiny, budget):
    """Prompt logprobs, whole or computed chunk by chunk, equal log_softmax of one full forward."""
    prompt = make_prompts(1, seed=9, lo=40, hi=40)[0]
    engine = LLMEngine(tiny, EngineConfig(max_num_batched_tokens=budget))
    req = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))
    while engine.has_unfinished():
        engine.step()
    with torch.no_grad():
        ref = torch.log_softmax(_prefill_logits(tiny.model, [len(prompt)], torch.tensor(prompt)), dim=-1)
    lps = req.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for i in range(1, len(prompt)):
        assert lps[i].token_id == prompt[i]
        assert lps[i].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-5)
        assert list(lps[i].top) == ref[i - 1].topk(3).indices.tolist()


def test_decode_logits_equal_with_and_without_the_cpp_kernel(tiny):
    """Single-token decodes take the C++ paged kernel when it is built, else the PyTorch path;
    both must give the whole-prompt logits (float32, tolerance 1e-5)."""
    model = tiny.model
    torch.manual_seed(1)
    prompt = torch.randint(0, 97, (30,))
    with torch.no_grad():
        whole = _prefill_logits(model, [30], prompt)
        for use_kernel in (True, False):
            cache = PagedKVCache(model.config, 64, 4, torch.float32)
            if not use_kernel:
                cache._kernels = None
            elif cache._kernels is None:
                continue  # no compiler here: only the PyTorch path exists
            table = list(range(40))[::-1]  # blocks out of order
            cache.begin_step([Segment(table, 0, 20)])
            model(prompt[:20], torch.arange(20), cache)
            rows = []
            for pos in range(20, 30):  # one token at a time, next to an unrelated short sequence
                cache.begin_step([Segment([50], 0, 3), Segment(table, pos, 1)])
                ids = torch.cat([prompt[:3], prompt[pos : pos + 1]])
                h = model(ids, torch.tensor([0, 1, 2, pos]), cache)
                rows.append(model.compute_logits(h[3:]))
            torch.testing.assert_close(torch.cat(rows), whole[20:], atol=1e-5, rtol=0)
