"""Turn one row of logits per request into the next token: greedy, temperature, top-k, top-p.

Each request owns a torch.Generator seeded from its own seed, so a seeded request draws
the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from falconet.sampling_params import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """logits: [B, V] float32, one row per request -> one token id per request."""
    tokens = []
    for row, p, g in zip(logits, params, generators, strict=True):
        if p.greedy:
            tokens.append(int(row.argmax()))
            continue
        probs = torch.softmax(filter_logits(row / p.temperature, p.top_k, p.top_p), dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=g)))
    return tokens


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k tokens and the top-p nucleus of a [V] row."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token if the mass before it is < top_p: the smallest set reaching top_p.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits
