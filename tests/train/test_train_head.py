"""`falconet train-head`'s pieces on the tiny model: the collected features are the target's hidden
states, training lowers the loss and raises agreement, the saved head loads, and the engine's
first-draft acceptance matches the teacher-forced agreement (features reach the head aligned)."""

from __future__ import annotations

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.methods.speculative.eagle import EagleHead, default_head_path, load_head, save_head
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams
from falconet.train.distill_draft import draft_vocabulary
from falconet.train.train_head import collect_features, top1_agreement, train_head

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_collected_features_are_the_targets_hidden_states(tiny, prompts_of, run):
    prompts = prompts_of(6, seed=0)
    examples = collect_features(tiny, prompts, 10, max_num_seqs=3)
    outputs, _ = run(tiny, prompts, SamplingParams(max_tokens=10, temperature=0))
    for p, out, e in zip(prompts, outputs, examples, strict=True):
        assert e.ids == p + out and e.answer_start == len(p)
        assert e.features.shape == (len(e.ids) - 1, tiny.config.hidden_size)
        # one forward over the whole sequence gives the same hidden states (float32 rounding apart)
        cache = PagedKVCache(tiny.config, 4, 16, torch.float32)
        cache.begin_step([Segment([0, 1, 2, 3], 0, len(e.ids))])
        hidden = tiny.model(torch.tensor(e.ids), torch.arange(len(e.ids)), cache)
        torch.testing.assert_close(e.features, hidden[:-1], atol=1e-4, rtol=1e-4)


def test_head_trains_saves_loads_and_drafts_what_it_learnt(tiny, tmp_path, prompts_of, run):
    prompts = prompts_of(48, seed=1)
    examples = collect_features(tiny, prompts, 24)
    vocab = draft_vocabulary(examples, 64, 97, always=[2])
    head = EagleHead(tiny.model, vocab)
    head.init_from_target()
    save_head(head, tmp_path / "untrained", {})
    before = top1_agreement(head, examples[:16])
    losses = train_head(head, examples, steps=200, batch_size=16, lr=3e-3, log=None)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    after = top1_agreement(head, examples[:16])
    assert after > before + 0.2, (before, after)
    save_head(head, tmp_path / "trained", {})
    loaded = load_head(tmp_path / "trained", tiny.model, torch.float32)
    assert loaded.lm_head.weight.shape == (64, 64) and loaded.target is tiny.model
    for name, p in head.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p)

    # In the engine, the first draft of each step is the head's teacher-forced guess whenever the
    # head's context is real features: its acceptance matches the agreement measured offline. A
    # feature off by one position, or a head cache entry not rewritten, would pull it down.
    params = SamplingParams(max_tokens=24, temperature=0, speculative="eagle", num_speculative_tokens=3)
    rates = {}
    for name in ("untrained", "trained"):
        outs, engine = run(tiny, prompts[:16], params, draft_head=str(tmp_path / name))
        assert outs == [e.ids[e.answer_start :] for e in examples[:16]]
        rates[name] = engine.speculator.stats.as_dict()["acceptance_rate_by_position"][0]
    assert rates["trained"] > rates["untrained"] + 0.15, rates
    assert rates["trained"] > 0.75 * after, (rates, after)
    # sampled drafts from the reduced head: seeded, reproducible
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=5, speculative="eagle")
    a, _ = run(tiny, prompts[:2], sampled, draft_head=str(tmp_path / "trained"))
    b, _ = run(tiny, prompts[:2], sampled, draft_head=str(tmp_path / "trained"))
    assert a == b


def test_a_head_for_another_model_is_refused(tiny, tiny_llama64_dir, tmp_path):
    other = load_model(tiny_llama64_dir, with_tokenizer=False)
    save_head(EagleHead(other.model, torch.arange(10)), tmp_path / "other", {})
    with pytest.raises(FalconetError, match="another model"):
        load_head(tmp_path / "other", tiny.model, torch.float32)


def test_eagle_finds_a_head_in_the_default_place(tiny, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FALCONET_HOME", str(tmp_path))
    params = SamplingParams(max_tokens=4, temperature=0, speculative="eagle")
    with pytest.raises(FalconetError, match="falconet train-head"):
        LLMEngine(tiny, EngineConfig()).add_request([1, 2, 3], params)
    head = EagleHead(tiny.model, torch.arange(40))
    head.init_from_target()
    save_head(head, default_head_path(tiny_llama_dir), {})
    engine = LLMEngine(tiny, EngineConfig())
    engine.add_request([1, 2, 3], params)
    while engine.has_unfinished():
        engine.step()
    assert engine.speculator.stats.num_steps > 0


def test_bf16_head_keeps_the_targets_float32_rope_tables(tiny_llama64_dir, tmp_path):
    """The head shares the target's RoPE module; casting the head must not cast it."""
    target = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False).model
    save_head(EagleHead(target, torch.arange(10)), tmp_path, {})
    head = load_head(tmp_path, target, torch.bfloat16)
    assert head.fc.weight.dtype == torch.bfloat16
    assert target.layers[0].self_attn.rope.cos.dtype == torch.float32


def test_the_model_writes_varied_user_requests(default_gguf):
    from falconet.api import LLM
    from falconet.train.prompts import self_written_prompts

    llm = LLM(str(default_gguf), dtype="bfloat16", max_num_seqs=8)
    a = self_written_prompts(llm.engine, 8, seed=3, max_tokens=24)
    b = self_written_prompts(llm.engine, 8, seed=3, max_tokens=24)
    assert a == b  # seeded
    assert len(a) >= 6 and all(p.strip() == p and len(p) >= 8 for p in a)
    assert not any("<|im_start|>" in p or "<|im_end|>" in p for p in a)  # one user turn each
