"""Fixtures shared by the draft-training tests: the tiny target, random prompts, an engine run."""

from __future__ import annotations

import random

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.models.kv_cache import PagedKVCache, Segment
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


@pytest.fixture(scope="session")
def group_logits():
    return one_group_logits


def one_group_logits(target, prefix: list[int], inputs) -> torch.Tensor:
    """The model's logits at 3 extra rows after `prefix`, fed by `inputs` (ExtraInputs) as in
    the engine's verify forward (one sequence, one group hanging under its last token)."""
    t = len(prefix) - 1
    rows = prefix + [0, 0, 0]  # the extra rows' own tokens are never read
    cache = PagedKVCache(target.config, 4, 16, torch.float32)
    cache.begin_step([Segment([0, 1, 2, 3], 0, len(rows))])
    edit = LLMEngine._row_editor([(inputs, t, slice(t + 1, t + 4))])
    hidden = target(torch.tensor(rows), torch.arange(len(rows)), cache, edit_rows=edit)
    return target.compute_logits(hidden[t + 1 :])
