"""`falconet distill-draft`'s pieces on the tiny model: training lowers the loss, the saved draft
loads with a reduced head, drafts for the engine, and speculative output stays exact."""

from __future__ import annotations

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams
from falconet.train.distill_draft import (
    Example,
    build_draft,
    draft_vocabulary,
    load_draft,
    save_draft,
    train_draft,
)
from falconet.train.prompts import synthetic_prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_synthetic_prompts_are_varied_and_deterministic():
    a, b = synthetic_prompts(200, seed=3), synthetic_prompts(200, seed=3)
    assert a == b and len(set(a)) > 150
    assert any(p.startswith("Translate into") for p in a) and any("step by step" in p for p in a)


def test_distilled_draft_trains_saves_loads_and_stays_exact(tiny, tmp_path, prompts_of, run):
    prompts = prompts_of(48, seed=0)
    outputs, _ = run(tiny, prompts, GREEDY)
    examples = [Example(p + o, len(p)) for p, o in zip(prompts, outputs, strict=True)]
    vocab = draft_vocabulary(examples, 48, 97, always=[2])
    assert len(vocab) == 48 and 2 in vocab.tolist()

    untrained = build_draft(tiny.model, 1, vocab)
    save_draft(untrained, tmp_path / "untrained", {"note": "test"})
    draft = build_draft(tiny.model, 1, vocab)
    losses = train_draft(draft, examples, steps=80, batch_size=16, lr=3e-3, log=None)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5  # it learns the target's answers
    save_draft(draft, tmp_path / "trained", {"note": "test"})

    loaded = load_draft(tmp_path / "trained", tiny.model, torch.float32)
    assert loaded.lm_head.weight.shape == (48, 64) and loaded.embed_tokens is tiny.model.embed_tokens
    # A random tiny target has nothing to generalise from, so acceptance is compared on prompts
    # it was trained on (the real model's numbers are in docs/benchmarks.md); output stays exact
    # on those and on unseen prompts.
    params = SamplingParams(**{**GREEDY.__dict__, "speculative": "draft-model", "num_speculative_tokens": 3})
    rates = {}
    for name in ("untrained", "trained"):
        outs, engine = run(tiny, prompts[:16], params, draft_model=str(tmp_path / name))
        assert outs == outputs[:16]
        rates[name] = engine.speculator.stats.acceptance_rate
    assert rates["trained"] > rates["untrained"] + 0.2, rates
    held_out = prompts_of(8, seed=1)
    plain, _ = run(tiny, held_out, GREEDY)
    assert run(tiny, held_out, params, draft_model=str(tmp_path / "trained"))[0] == plain
    # sampling drafts from the reduced head (q is zero outside it) runs and stays seeded
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=5, speculative="draft-model")
    a, _ = run(tiny, held_out[:2], sampled, draft_model=str(tmp_path / "trained"))
    b, _ = run(tiny, held_out[:2], sampled, draft_model=str(tmp_path / "trained"))
    assert a == b


def test_a_draft_for_another_model_is_refused(tiny, tiny_llama64_dir, tmp_path):
    other = load_model(tiny_llama64_dir, with_tokenizer=False)
    draft = build_draft(other.model, 1, torch.arange(10))
    save_draft(draft, tmp_path / "other", {})
    with pytest.raises(FalconetError, match="another model"):
        load_draft(tmp_path / "other", tiny.model, torch.float32)


def test_draft_model_finds_a_distilled_draft_in_the_default_place(
    tiny, tiny_llama_dir, tmp_path, monkeypatch
):
    from falconet.train.distill_draft import default_draft_path

    monkeypatch.setenv("FALCONET_HOME", str(tmp_path))
    engine = LLMEngine(tiny, EngineConfig())
    params = SamplingParams(max_tokens=4, temperature=0, speculative="draft-model")
    with pytest.raises(FalconetError, match="falconet distill-draft"):
        engine.add_request([1, 2, 3], params)
    save_draft(build_draft(tiny.model, 1, torch.arange(40)), default_draft_path(tiny_llama_dir), {})
    engine = LLMEngine(tiny, EngineConfig())
    engine.add_request([1, 2, 3], params)
    while engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.num_steps > 0
