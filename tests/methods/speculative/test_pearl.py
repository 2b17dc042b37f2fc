"""PEARL's worker: it drafts past the step's text during the forward, its drafts are used only
when the target produced exactly the text they assumed, and the engine's threads come back."""

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative.base import Draft
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams


@pytest.fixture
def prefilled(tiny_llama_dir):
    """An engine whose one PEARL request has its prompt computed and one token sampled."""
    engine = LLMEngine(
        load_model(tiny_llama_dir, with_tokenizer=False), EngineConfig(draft_model=str(tiny_llama_dir))
    )
    req = engine.add_request(
        [5, 9, 14, 3, 8, 2], SamplingParams(max_tokens=30, temperature=0, speculative="pearl")
    )
    engine.step()
    engine.speculator.set_lookahead([req])
    engine.block_manager.grow(req.block_table, req.num_computed + 1 + req.num_lookahead)
    return engine, engine.speculator.proposer("pearl"), req


def test_drafts_past_the_text_and_uses_them_only_if_the_target_agrees(prefilled):
    engine, pearl, req = prefilled
    threads = torch.get_num_threads()
    (draft,) = pearl.propose([req], [6])
    assert draft.tokens == []  # nothing drafted ahead yet: the target decodes alone (pre-verify)
    pearl.launch([req], [draft])
    pearl._collect()
    assert torch.get_num_threads() == threads
    job, ahead = pearl._ahead[req.request_id]
    assert job.all_ids == req.all_ids and len(ahead) >= pearl.min_ahead
    # The draft model is the target: its g1 is the target's next token. Had the target chosen
    # another token, nothing drafted ahead would apply.
    saved = dict(pearl._ahead)
    req.output_ids.append((ahead[0] + 1) % 97)
    assert pearl.propose([req], [6])[0].tokens == []
    req.output_ids[-1] = ahead[0]
    pearl._ahead = saved
    assert pearl.propose([req], [6])[0].tokens == ahead[1:]


def test_refeeds_the_last_token_when_the_cache_already_holds_it(prefilled):
    """After a step that verified nothing, the draft cache can hold the whole text (it fed g1,
    which the target then produced): the last token is fed again for its logits."""
    engine, pearl, req = prefilled
    pearl.launch([req], [Draft([])])
    pearl._collect()
    _, ahead = pearl._ahead[req.request_id]
    req.output_ids.append(ahead[0])  # the target produced g1, and no draft is verified now
    pearl._ahead.clear()
    assert pearl._valid_prefix(req, req.all_ids) == len(req.all_ids)
    pearl.launch([req], [Draft([])])
    assert pearl._pending is not None
    pearl._collect()  # fails on an empty feed if the last token is not fed again
    job, again = pearl._ahead[req.request_id]
    n = min(len(again), len(ahead) - 1)
    assert job.computed == len(req.all_ids) - 1 and again[:n] == ahead[1 : 1 + n]


def test_a_failing_worker_fails_the_step_and_leaves_the_engine_as_it_was(prefilled, monkeypatch):
    engine, pearl, req = prefilled
    threads = torch.get_num_threads()
    pearl.launch([req], [Draft([])])
    pearl._collect()
    assert pearl._held

    def broken(jobs):
        raise RuntimeError("draft failed")

    monkeypatch.setattr(pearl, "_draft_ahead", broken)
    pearl.launch([req], [Draft([])])
    with pytest.raises(RuntimeError, match="draft failed"):
        pearl._collect()
    assert torch.get_num_threads() == threads and pearl._pending is None
    assert not pearl._held  # what the worker wrote is unknown: caught up from scratch next time
    pearl._collect()  # nothing pending any more
