"""`falconet train-prompts`' pieces on the tiny model: the training forward is the inference
forward (prompt rows fed as embeddings after a sequence), and training raises the held-out
accuracy of the guesses."""

from __future__ import annotations

import random

import torch

from falconet.methods.speculative.ppd import PromptInputs
from falconet.models.loader import load_model
from falconet.train.distill_draft import Example
from falconet.train.train_prompts import init_prompts, prompt_logits, top1_by_prompt, train_prompt_tokens


def test_training_forward_is_the_inference_forward(tiny_llama_dir, group_logits):
    """Several groups in one training forward give, at each P_j, the logits the model gives when
    P_1..P_m are fed as input embeddings right after the anchor (one group, nothing else)."""
    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model
    prompts = init_prompts(target, 3) + 0.5 * torch.randn(3, target.config.hidden_size)
    ids = torch.tensor([[random.Random(i).randrange(97) for i in range(20)]])
    anchors = torch.tensor([[4, 11, 17]])
    with torch.no_grad():
        trained = prompt_logits(target, prompts, ids, anchors)[0]
        for n, t in enumerate(anchors[0].tolist()):
            want = group_logits(target, ids[0, : t + 1].tolist(), PromptInputs(prompts))
            torch.testing.assert_close(trained[n], want, atol=2e-4, rtol=1e-4)


def test_training_teaches_the_frozen_target_what_to_guess(tiny_llama_dir, prompts_of):
    """Answers that always continue with one token: the random target guesses it at P_j about
    never before training and nearly always after, with only the prompt embeddings changed (a
    random model's own answers are close to unpredictable two tokens ahead: no test of learning)."""
    examples = [Example(p + [42] * 12, len(p)) for p in prompts_of(40, seed=3)]
    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model
    weights = {n: p.clone() for n, p in target.named_parameters()}
    before = top1_by_prompt(target, init_prompts(target, 2), examples[:8])
    embeddings, losses = train_prompt_tokens(
        target, examples[8:], 2, steps=40, batch_size=8, num_anchors=4, lr=3e-2, log=None
    )
    # (a random model's logits span little: the loss falls from ln 97 to ~3.2, not near 0)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    after = top1_by_prompt(target, embeddings, examples[:8])
    assert max(before) < 0.2 and min(after) > 0.9, (before, after)
    for n, p in target.named_parameters():  # the target itself is untouched
        assert torch.equal(p, weights[n]), n
