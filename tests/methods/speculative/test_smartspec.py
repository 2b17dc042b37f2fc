"""smartspec-recycling weighs a recycled tree's nodes by their values, scaled by how much of the
verified trees' value the target actually kept."""

from types import SimpleNamespace

import pytest

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative.base import Draft
from falconet.models.loader import load_model


def test_tree_values_are_scaled_by_what_the_target_kept(tiny_llama_dir):
    engine = LLMEngine(load_model(tiny_llama_dir, with_tokenizer=False), EngineConfig(max_num_seqs=1))
    proposer = engine.speculator.proposer("smartspec-recycling")
    prior, decay = proposer.calibration_prior, proposer.calibration_decay
    req = SimpleNamespace(request_id="r", num_tokens=5, all_ids=[1, 2, 3, 4, 5])
    values = [0.6, 0.5, 0.3, 0.2]
    proposer.drafted(req, Draft([7, 8, 9, 6], parents=[-1, 0, -1, 1]), values)
    assert proposer._gains["r"] == pytest.approx(values)  # before any verification: face value
    req.all_ids += [7, 8, 4]  # the path 7 -> 8 kept (not 6 under 8), then the target's own token
    req.num_tokens = len(req.all_ids)
    proposer._score_tree(req)
    valued, kept = decay * prior + sum(values), decay * prior + 2
    proposer.drafted(req, Draft([3, 5], parents=[-1, -1]), [0.5, 0.25])
    assert proposer._gains["r"] == pytest.approx([0.5 * kept / valued, 0.25 * kept / valued])
    req.all_ids += [9]  # neither node kept
    proposer._score_tree(req)
    assert proposer._kept == pytest.approx(decay * kept)
    assert proposer._valued == pytest.approx(decay * valued + 0.75)
