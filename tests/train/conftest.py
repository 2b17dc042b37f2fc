"""Fixtures shared by the draft-training tests: the tiny target, random prompts, an engine run."""

from __future__ import annotations

import random

import pytest

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.models.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(rng.randint(4, 12))] for _ in range(n)]


def run_engine(loaded, prompts, params, **options):
    """Outputs of `prompts` through a fresh engine, and the engine (for its statistics)."""
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=16, **options))
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs], engine


@pytest.fixture(scope="session")
def prompts_of():
    return random_prompts


@pytest.fixture(scope="session")
def run():
    return run_engine
