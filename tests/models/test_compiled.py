"""The compiled decode step (models/compiled.py) gives bitwise the eager engine's outputs."""

from __future__ import annotations

import random

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.kernels import cpu_kernels
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.has_bf16_linear(), reason="needs the AVX512-BF16 kernels"
)


def run(loaded, prompts, params, **options):
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, **options))
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs], engine


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_compiled_decode_equals_eager(tiny_llama64_dir, quantization):
    loaded = load_model(
        tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False, quantization=quantization
    )
    rng = random.Random(3)
    # Repetitive prompts, so n-gram drafts (chains and trees) are found and verified in
    # multi-row decode steps.
    prompts = [[rng.randrange(97) for _ in range(rng.randint(1, 12))] * rng.randint(1, 4) for _ in range(6)]
    cases = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative="ngram"),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative="ngram-tree"),
    ]
    compiled_engine = None
    for params in cases:
        eager, _ = run(loaded, prompts, params)
        compiled, compiled_engine = run(loaded, prompts, params, compile=True)
        assert compiled == eager, params
        # the compiled graphs ran: batches of several rows and, at the end, of one
        assert compiled_engine.forward.compiled_steps > 10
    assert compiled_engine.forward.available and compiled_engine.forward.compile_s > 0


def test_no_recompiles_across_lengths_and_batch_sizes(tiny_llama64_dir):
    """The two graphs compiled at start-up serve every context length and batch size."""
    from torch._dynamo.utils import counters

    loaded = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False)
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=4, compile=True))
    graphs = counters["stats"]["unique_graphs"]
    for length in (1, 5, 30, 70):
        for batch in (1, 3):
            for _ in range(batch):
                engine.add_request(list(range(2, 2 + length)), SamplingParams(max_tokens=20, temperature=0))
            while engine.has_unfinished():
                engine.step()
    assert engine.forward.compiled_steps > 100
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_off_by_default(tiny_llama64_dir):
    loaded = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False)
    assert LLMEngine(loaded).forward is loaded.model
