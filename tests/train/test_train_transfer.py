"""`falconet train-transfer`'s pieces on the tiny model: the training forward is the engine's
forward with the stream replaced at the transfer layer, and training teaches the maps."""

from __future__ import annotations

import random

import torch

from falconet.methods.speculative.hidden_transfer import TransferInputs, TransferLayers
from falconet.models.loader import load_model
from falconet.train.distill_draft import Example
from falconet.train.train_prompts import top1_by_position, train_extra_rows
from falconet.train.train_transfer import transfer_logits


def test_training_forward_is_the_inference_forward(tiny_llama_dir, group_logits):
    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model
    transfer = TransferLayers(3, target.config.hidden_size, layer=1)
    with torch.no_grad():
        transfer.weight.add_(0.1 * torch.randn_like(transfer.weight))
        transfer.bias.add_(0.1 * torch.randn_like(transfer.bias))
    ids = torch.tensor([[random.Random(i).randrange(97) for i in range(20)]])
    anchors = torch.tensor([[4, 11, 17]])
    with torch.no_grad():
        trained = transfer_logits(target, transfer, ids, anchors)[0]
        for n, t in enumerate(anchors[0].tolist()):
            # one group under the segment's root (segment row 0): what its rows compute below
            # the transfer layer is never read
            inputs = TransferInputs(transfer, [0, 0, 0], [0, 1, 2])
            want = group_logits(target, ids[0, : t + 1].tolist(), inputs)
            torch.testing.assert_close(trained[n], want, atol=2e-4, rtol=1e-4)


def test_training_teaches_the_maps_what_to_guess(tiny_llama_dir, prompts_of):
    """As for prompt tokens: answers that always continue with one token are learnt, with the
    target untouched."""
    examples = [Example(p + [42] * 12, len(p)) for p in prompts_of(40, seed=3)]
    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model.requires_grad_(False)
    weights = {n: p.clone() for n, p in target.named_parameters()}
    transfer = TransferLayers(2, target.config.hidden_size, layer=1)
    logits_of = lambda ids, anchors: transfer_logits(target, transfer, ids, anchors)  # noqa: E731
    before = top1_by_position(logits_of, 2, examples[:8])
    losses = train_extra_rows(
        logits_of, list(transfer.parameters()), examples[8:], 2, 40, 8, 4, 1e-2, log=None
    )
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    after = top1_by_position(logits_of, 2, examples[:8])
    assert max(before) < 0.2 and min(after) > 0.9, (before, after)
    for n, p in target.named_parameters():
        assert torch.equal(p, weights[n]), n
