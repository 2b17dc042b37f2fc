"""DISCO: the classifier's features, its stop decision after every drafted token, and its
online training from the engine's verifications."""

import math

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative.disco import draft_features
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams


def test_features_of_sure_and_unsure_drafts():
    sure = draft_features(torch.tensor([10.0, 0.0, 0.0, 0.0]), 0)
    unsure = draft_features(torch.zeros(4), 4)
    assert sure[0] == 1.0 and sure[1] > 5 and sure[3] < 0.01 and sure[4] == 0.0
    assert unsure[1] == pytest.approx(math.log(0.25 / 0.75))
    assert unsure[2] == pytest.approx(0.25) and unsure[3] == pytest.approx(1.0) and unsure[4] == 0.5


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def _run(tiny, draft_dir, bias=None, k=6):
    """Greedy requests drafted by the target itself (every draft would be kept)."""
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=4, draft_model=str(draft_dir)))
    proposer = engine.speculator.proposer("disco")
    if bias is not None:  # a classifier that always says yes (+30) or no (-30)
        proposer.classifier.weights = [bias, 0.0, 0.0, 0.0, 0.0]
        proposer.classifier.lr = 0.0
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative="disco",
                            num_speculative_tokens=k)  # fmt: skip
    reqs = [engine.add_request([3 + i, 5, 7, 11, 13], params) for i in range(4)]
    while engine.has_unfinished():
        engine.step()
    plain = LLMEngine(tiny, EngineConfig(max_num_seqs=4))
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = [plain.add_request([3 + i, 5, 7, 11, 13], greedy) for i in range(4)]
    while plain.has_unfinished():
        plain.step()
    assert [r.output_ids for r in reqs] == [r.output_ids for r in ref]
    return engine.speculator.stats, proposer


def test_the_classifier_decides_the_draft_length(tiny, tiny_llama_dir):
    stats, _ = _run(tiny, tiny_llama_dir, bias=-30.0)
    assert len(stats.drafted_by_position) == 1  # "stop" after every first draft token
    stats, _ = _run(tiny, tiny_llama_dir, bias=30.0)
    assert len(stats.drafted_by_position) == 6  # "go on" up to the limit
    assert stats.acceptance_rate == 1.0


def test_the_classifier_learns_from_verification(tiny, tiny_llama_dir):
    """Every draft of the target's own is kept: the classifier's P(accepted) rises from the
    draft's top-1 probability towards 1, for the same features."""
    stats, proposer = _run(tiny, tiny_llama_dir)
    assert stats.num_accepted > 0
    f = draft_features(torch.zeros(97), 0)  # an unsure draft: top-1 probability 1/97
    assert proposer.classifier.predict(f) > 1 / 97 + 0.05
