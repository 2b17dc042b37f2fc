"""Ouroboros: phrases from the pool make one draft forward add several tokens, drafts are
extended by the pool, and the target's predictions past a rejection join the pool."""

import pytest

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative import ouroboros
from falconet.methods.speculative.base import Draft
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def _generate(tiny, options, prompts, method):
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=4, **options))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, speculative=method,
                            num_speculative_tokens=8)  # fmt: skip
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs], engine


def test_phrases_add_several_tokens_per_draft_forward(tiny, tiny_llama_dir, monkeypatch):
    """The target drafts for itself, so every token it drafts is kept. Its greedy answer
    repeats (a tiny random model loops), and the pool knows the loop: with phrases the draft
    model adds more tokens than it runs forwards, and more than the same drafter without
    phrases; the output is plain decoding's either way."""
    prompts = [[5, 9, 14, 3, 8] * 3, [7, 7, 2, 11] * 4]
    plain, _ = _generate(tiny, {}, prompts, None)
    drafted = {}
    for phrase in (0, ouroboros.PHRASE):
        monkeypatch.setattr(ouroboros, "PHRASE", phrase)
        monkeypatch.setattr(ouroboros, "EXTEND", False)  # the draft model's tokens only
        outs, engine = _generate(tiny, {"draft_model": str(tiny_llama_dir)}, prompts, "ouroboros")
        assert outs == plain
        stats = engine.speculator.stats
        assert stats.acceptance_rate == 1.0
        drafted[phrase] = stats.num_drafted / stats.num_steps  # tokens per step from the draft model
    assert drafted[0] <= ouroboros.DRAFT_FORWARDS
    assert drafted[ouroboros.PHRASE] > ouroboros.DRAFT_FORWARDS + 0.5


def test_the_targets_predictions_past_a_rejection_join_the_pool(tiny, tiny_llama_dir):
    engine = LLMEngine(tiny, EngineConfig(draft_model=str(tiny_llama_dir)))
    proposer = engine.speculator.proposer("ouroboros")
    req = engine.add_request([1, 2, 3, 4], SamplingParams(max_tokens=8, speculative="ouroboros"))
    # drafts 10, 11, 12: the target kept 10, chose 20 instead of 11, then predicted 21 and 22
    proposer.on_target_predictions(req, Draft([10, 11, 12]), 1, [10, 20, 21, 22])
    assert proposer.pool.best_path([4, 10, 20], 4) == [21, 22]
    assert proposer.pool.best_path([1, 2, 3, 4, 10], 4) == []  # the rejected path is not a phrase


def test_drafts_are_extended_by_the_pool(tiny):
    """Without any phrase-level help from the draft model, the finished draft still gets the
    pool's continuation appended."""
    engine = LLMEngine(tiny, EngineConfig(draft_model=None))
    proposer = ouroboros.OuroborosProposer.__new__(ouroboros.OuroborosProposer)
    proposer.engine = engine
    proposer.forget()
    proposer.pool.add([1, 2, 3, 4, 5, 6, 7], 0, 7)
    proposer._valid = {}
    req = engine.add_request([9, 9, 2, 3], SamplingParams(max_tokens=8, speculative=None))
    monkey = lambda requests, computed, max_tokens: [Draft([]) for _ in requests]  # noqa: E731
    proposer._draft = monkey
    (draft,) = ouroboros.OuroborosProposer.propose(proposer, [req], [5])
    assert draft.tokens == [4, 5, 6, 7]
