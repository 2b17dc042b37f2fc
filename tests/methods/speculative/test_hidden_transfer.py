"""Hidden transfer (methods/speculative/hidden_transfer.py): PPD's groups of extra rows, whose
stream at the transfer layer becomes W_j h + b_j of the row they hang under. Greedy identity and
the distribution test are in tests/engine/test_speculative.py."""

from __future__ import annotations

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.methods.speculative.hidden_transfer import TransferInputs, TransferLayers
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams
from falconet.train.train_transfer import transfer_logits


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


def test_the_stream_at_the_transfer_layer_is_replaced():
    transfer = TransferLayers(2, 4, layer=1)
    with torch.no_grad():
        transfer.weight[1] *= 2
        transfer.bias[1] += 1
    inputs = TransferInputs(transfer, anchors=[0, 0, 1], which=[0, 1, 0])
    x, residual = torch.randn(9, 4), torch.randn(9, 4)
    before = (x.clone(), residual.clone())
    inputs.edit(0, x, residual, 3, slice(6, 9))  # another layer: nothing changes
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])
    inputs.edit(1, x, residual, 3, slice(6, 9))  # segment rows 3.. (root 3, draft 4); extras 6-8
    stream = before[0] + before[1]
    want = torch.stack([stream[3], 2 * stream[3] + 1, stream[4]])
    torch.testing.assert_close(x[6:9] + residual[6:9], want)
    assert torch.equal(x[:6], before[0][:6]) and torch.equal(residual[:6], before[1][:6])


def test_next_drafts_are_the_guesses_after_the_accepted_path(tiny, tiny_transfer_dir, guesses_checked):
    engine = LLMEngine(tiny, EngineConfig(draft_head=str(tiny_transfer_dir), max_num_seqs=4))
    transfer = engine.speculator.proposer("hidden-transfer").transfer  # float32, as the tiny model
    target = load_model(engine.model_path, dtype=torch.float32, with_tokenizer=False).model
    guesses_checked(
        engine, "hidden-transfer", lambda ids, a: transfer_logits(target, transfer, ids, a), seed=5
    )


def test_a_missing_artifact_says_how_to_make_it(tiny, tmp_path, monkeypatch, tiny_ppd_dir):
    monkeypatch.setenv("FALCONET_HOME", str(tmp_path))
    engine = LLMEngine(tiny, EngineConfig(draft_head=str(tiny_ppd_dir)))  # PPD's: not taken
    with pytest.raises(FalconetError, match="run `falconet train-transfer`"):
        engine.add_request([1, 2, 3], SamplingParams(speculative="hidden-transfer"))
