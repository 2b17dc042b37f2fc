"""Exact speculative sampling on synthetic distributions: every kept token is distributed as
the target's p, whatever the draft's q, and greedy keeps drafts exactly while they are argmax."""

from types import SimpleNamespace

import pytest
import torch

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.verifier import verify
from falconet.sampling_params import SamplingParams

V = 6


def _request(seed: int, **params):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(params=SamplingParams(**params), generator=g, prompt_ids=[0], output_ids=[])


def test_greedy_keeps_drafts_while_they_are_the_argmax():
    logits = torch.tensor([[0, 5.0, 0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0], [0, 0, 0, 5.0, 0, 0]])
    req = _request(0, temperature=0)
    assert verify(logits, Draft([1, 2]), req).tokens == [1, 2, 3]  # both kept, bonus argmax
    v = verify(logits, Draft([1, 4]), req)
    assert v.tokens == [1, 2] and v.num_accepted == 1  # second draft wrong: the argmax instead


def test_greedy_verifies_against_penalised_logits():
    logits = torch.tensor([[0, 5.0, 4.0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]])
    req = _request(0, temperature=0, repetition_penalty=2.0)  # 1 was in no history; 0 was
    req.output_ids = [1]  # token 1 seen: 5 / 2 = 2.5 < 4, so the argmax is 2
    assert verify(logits, Draft([1]), req).tokens == [2]


@pytest.mark.parametrize("draft_kind", ["sampled", "point-mass"])
def test_first_token_is_distributed_as_p(draft_kind):
    """20000 verifications: the first token's frequencies match p (a row of target logits)
    within 4 standard errors per token, for a draft q far from p."""
    p_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.0] * V])
    p = torch.softmax(p_logits[0], -1)
    q = torch.tensor([0.05, 0.05, 0.6, 0.1, 0.15, 0.05])
    counts = torch.zeros(V)
    n = 20000
    draw = torch.Generator().manual_seed(123)
    for i in range(n):
        req = _request(i)
        if draft_kind == "sampled":
            token = int(torch.multinomial(q, 1, generator=draw))
            draft = Draft([token], q[None])
        else:
            draft = Draft([2])  # always propose token 2 deterministically
        counts[verify(p_logits, draft, req).tokens[0]] += 1
    freq = counts / n
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * stderr).all(), (freq, p)
