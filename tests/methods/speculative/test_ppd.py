"""Parallel Prompt Decoding (methods/speculative/ppd.py): the prompt groups ride in the verify
forward, under the last token and under every draft, within the slots granted; the next step's
drafts are the guesses of the group under the draft the target stopped at. Greedy identity and
the distribution test are in tests/engine/test_speculative.py."""

from __future__ import annotations

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams
from falconet.train.train_prompts import prompt_logits


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def _engine(tiny, tiny_ppd_dir, **options) -> LLMEngine:
    return LLMEngine(tiny, EngineConfig(draft_head=str(tiny_ppd_dir), **options))


def test_groups_hang_under_the_last_token_and_every_draft_within_the_budget(tiny, tiny_ppd_dir):
    ppd = _engine(tiny, tiny_ppd_dir).speculator.proposer("ppd")
    assert ppd.num_prompt_tokens == 3 and ppd.lookahead(3) == 6 and ppd.lookahead(2) == 4
    assert ppd._with_groups([11], budget=4, length=2).extra_parents == [-1, 1, 0, 3]
    draft = ppd._with_groups([11, 12], budget=5)
    # group under the last token (-1): rows 2, 3, 4 of the segment; under draft 0: 5, 6, 7;
    # under draft 1 (depth 2): only 3 places are left, so 8, 9, 10
    assert draft.extra_parents == [-1, 2, 3, 0, 5, 6, 1, 8, 9]
    draft = ppd._with_groups([11, 12], budget=2)  # near max_tokens: groups cut, the last one empty
    assert draft.extra_parents == [-1, 2, 0]
    assert torch.equal(draft.extra_inputs.embeddings, torch.cat([ppd.embeddings[:2], ppd.embeddings[:1]]))
    assert ppd._with_groups([11, 12], budget=2).segment_parents() == [-1, 0, -1, 2, 0]


def test_next_drafts_are_the_guesses_after_the_accepted_path(tiny, tiny_ppd_dir, guesses_checked):
    engine = _engine(tiny, tiny_ppd_dir, max_num_seqs=4)
    embeddings = engine.speculator.proposer("ppd").embeddings.float()
    target = load_model(engine.model_path, dtype=torch.float32, with_tokenizer=False).model
    lengths = guesses_checked(engine, "ppd", lambda ids, a: prompt_logits(target, embeddings, ids, a), seed=4)
    assert len(lengths) >= 2  # both kept and rejected guesses seen
    assert engine.speculator.stats.num_accepted > 0


def test_a_missing_artifact_says_how_to_make_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FALCONET_HOME", str(tmp_path))
    engine = LLMEngine(tiny, EngineConfig())
    with pytest.raises(FalconetError, match="run `falconet train-prompts`"):
        engine.add_request([1, 2, 3], SamplingParams(speculative="ppd"))
