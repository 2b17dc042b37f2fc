"""Exact speculative sampling: which drafts the target keeps, and the one token it adds.

Leviathan et al. (2023) and Chen et al. (2023): draft token d_j, drawn from the proposer's q_j,
is accepted with probability min(1, p_j(d_j) / q_j(d_j)), where p_j is the distribution the
sampler would draw position j from. At the first rejection the token is drawn instead from
norm(max(0, p_j - q_j)), and verification stops; if every draft is accepted, a bonus token is
drawn from p_k. Each kept token is then distributed exactly as p, whatever q is.

p_j is what the engine's sampler would actually sample from at that position: logit bias,
penalties counted over the output so far *including the drafts before j*, temperature, top-k,
top-p and min-p (engine/sampler.py). Greedy requests are the special case: a draft is kept while
it equals the argmax, and the argmax at the first mismatch is the added token.

Randomness comes from the request's own generator, so a seeded request stays reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from falconet.engine.sampler import SamplingState, _draw, apply_logit_bias, apply_penalties, warp_logits
from falconet.methods.speculative.base import Draft


@dataclass
class Verdict:
    tokens: list[int]  # the accepted drafts, then the target's own token
    num_accepted: int  # how many drafts were kept


def target_logits(logits: torch.Tensor, request, drafts: list[int]) -> torch.Tensor:
    """Bias and penalties for each of the k + 1 rows, row j seeing drafts[:j] as output."""
    params = request.params
    states = [
        SamplingState(params, request.generator, request.prompt_ids, list(request.output_ids) + drafts[:j])
        for j in range(logits.shape[0])
    ]
    return apply_penalties(apply_logit_bias(logits, [params] * len(states)), states)


def accept(u: float, p: float, q: float) -> bool:
    """Keep a draft with probability min(1, p / q); u is uniform in [0, 1)."""
    return u * q < p


def verify(logits: torch.Tensor, draft: Draft, request) -> Verdict:
    """logits: [k + 1, V] float32 raw target logits at the last token and the k drafts."""
    k = len(draft.tokens)
    assert logits.shape[0] == k + 1, (logits.shape, k)
    shaped = target_logits(logits, request, draft.tokens)
    if request.params.greedy:
        best = shaped.argmax(dim=-1).tolist()
        n = 0
        while n < k and draft.tokens[n] == best[n]:
            n += 1
        return Verdict(draft.tokens[:n] + [best[n]], n)
    probs = torch.softmax(warp_logits(shaped, [request.params] * (k + 1)), dim=-1)
    g = request.generator
    for j, token in enumerate(draft.tokens):
        p = float(probs[j, token])
        q_row = draft.probs[j] if draft.probs is not None else None
        q = float(q_row[token]) if q_row is not None else 1.0
        u = float(torch.rand(1, generator=g, dtype=torch.float64))
        if accept(u, p, q):
            continue
        residual = probs[j].clone()
        if q_row is None:
            residual[token] = 0.0  # p - point mass at the draft, clipped at 0
        else:
            residual = (residual - q_row).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere: only round-off; fall back to p
            residual = probs[j]
        return Verdict(draft.tokens[:j] + [int(_draw(residual[None], [g])[0])], j)
    return Verdict(list(draft.tokens) + [int(_draw(probs[k][None], [g])[0])], k)
