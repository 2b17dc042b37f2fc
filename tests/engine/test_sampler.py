"""The sampler against transformers' logits warpers and against the exact distribution."""

from __future__ import annotations

import pytest
import torch

from falconet.engine.sampler import filter_logits, make_generator, sample
from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams


def _logits(seed: int = 0, v: int = 50) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("top_k", [1, 5, 49])
def test_top_k_matches_transformers(top_k):
    from transformers.generation.logits_process import TopKLogitsWarper

    x = _logits()
    ref = TopKLogitsWarper(top_k)(None, x[None].clone())[0]
    assert torch.equal(filter_logits(x, top_k, 1.0).isinf(), ref.isinf())


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    for seed in range(5):
        x = _logits(seed)
        ref = TopPLogitsWarper(top_p)(None, x[None].clone())[0]
        assert torch.equal(filter_logits(x, 0, top_p).isinf(), ref.isinf()), seed


def test_greedy_is_argmax():
    x = torch.stack([_logits(s) for s in range(4)])
    params = [SamplingParams(temperature=0)] * 4
    assert sample(x, params, [make_generator(0)] * 4) == x.argmax(-1).tolist()


def test_seed_reproducible_and_distribution_matches_softmax():
    """20k seeded draws at temperature 0.7 follow softmax(logits / 0.7): total variation < 0.02."""
    x = _logits(3, v=8)
    p = SamplingParams(temperature=0.7, seed=123)
    g = make_generator(p.seed)
    draws = [sample(x[None], [p], [g])[0] for _ in range(20000)]
    g2 = make_generator(p.seed)
    assert [sample(x[None], [p], [g2])[0] for _ in range(200)] == draws[:200]
    freq = torch.bincount(torch.tensor(draws), minlength=8).float() / len(draws)
    tv = 0.5 * (freq - torch.softmax(x / 0.7, -1)).abs().sum().item()
    assert tv < 0.02


def test_top_k_sampling_never_leaves_top_k():
    x = _logits(4)
    p = SamplingParams(temperature=1.5, top_k=3, seed=0)
    g = make_generator(0)
    allowed = set(torch.topk(x, 3).indices.tolist())
    assert {sample(x[None], [p], [g])[0] for _ in range(500)} <= allowed


@pytest.mark.parametrize(
    "kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)]
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(FalconetError):
        SamplingParams(**kwargs)
