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

A token tree (several deterministic candidates per position, SpecInfer / Medusa / EAGLE-2) is
verified from the root down: at a node, each child c is tried in turn and kept with probability
r(c), r being the target's distribution at the node with the children already rejected taken out
and renormalised (min(1, r/q) for a point-mass q); when all are rejected the token is drawn from
what is left of r. This is recursive rejection sampling with point-mass drafts (Yang et al.,
2024, "Multi-Candidate Speculative Decoding"; Jeon et al., 2024, "Recursive Speculative
Decoding"): the chosen token is distributed exactly as r at every node. Greedy: follow the child
equal to the argmax while there is one. A sampled tree (children drawn from the drafter's q) is
verified node by node by the rule of the way it was drawn (multi_draft.py: SpecTr's selection for
i.i.d. sequences, recursive rejection sampling for draws without replacement).

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
    path: list[int] | None = None  # a tree's accepted draft indices, root's child first


def target_logits(logits: torch.Tensor, request, drafts: list[int], histories=None) -> torch.Tensor:
    """Bias and penalties for each of the k + 1 rows, row j seeing drafts[:j] as output (or,
    for a tree, the draft tokens histories[j] above it)."""
    params = request.params
    if histories is None:
        histories = [drafts[:j] for j in range(logits.shape[0])]
    output = list(request.output_ids)
    states = [SamplingState(params, request.generator, request.prompt_ids, output + h) for h in histories]
    return apply_penalties(apply_logit_bias(logits, [params] * len(states)), states)


def accept(u: float, p: float, q: float) -> bool:
    """Keep a draft with probability min(1, p / q); u is uniform in [0, 1)."""
    return u * q < p


def verify(logits: torch.Tensor, draft: Draft, request) -> Verdict:
    """logits: [k + 1, V] float32 raw target logits at the last token and the k drafts."""
    if draft.is_tree:
        return verify_tree(logits, draft, request)
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


def verify_tree(logits: torch.Tensor, draft: Draft, request) -> Verdict:
    """logits: [k + 1, V]: row 0 at the last known token, row j + 1 at tree node j."""
    tokens, parents = draft.tokens, draft.parents
    assert logits.shape[0] == len(tokens) + 1, (logits.shape, len(tokens))
    children: dict[int, list[int]] = {}
    for j, p in enumerate(parents):
        children.setdefault(p, []).append(j)
    histories = [[]] + [[tokens[i] for i in draft.path(j)] for j in range(len(tokens))]
    shaped = target_logits(logits, request, tokens, histories)
    path, node = [], -1
    if request.params.greedy:
        best = shaped.argmax(dim=-1).tolist()
        while True:
            nxt = next((c for c in children.get(node, []) if tokens[c] == best[node + 1]), None)
            if nxt is None:
                return Verdict([tokens[i] for i in path] + [best[node + 1]], len(path), path)
            path.append(nxt)
            node = nxt
    probs = torch.softmax(warp_logits(shaped, [request.params] * shaped.shape[0]), dim=-1)
    g = request.generator
    if draft.scheme is not None:
        return _verify_sampled_tree(probs, draft, children, g)
    while True:
        residual = probs[node + 1].clone()
        for c in children.get(node, []):
            u = float(torch.rand(1, generator=g, dtype=torch.float64))
            if accept(u, float(residual[tokens[c]]), 1.0):
                path.append(c)
                node = c
                break
            residual[tokens[c]] = 0.0  # r - point mass at c, clipped, renormalised below
            total = float(residual.sum())
            if total <= 0.0:  # only round-off: the children held all of r
                residual = probs[node + 1].clone()
                total = float(residual.sum())
            residual /= total
        else:
            token = int(_draw(residual[None], [g])[0])
            return Verdict([tokens[i] for i in path] + [token], len(path), path)


def _verify_sampled_tree(probs: torch.Tensor, draft: Draft, children: dict, g) -> Verdict:
    """A tree of sampled drafts (multi_draft.py): at each node the candidates are its children in
    the order drawn ("without-replacement": recursive rejection sampling) or the next tokens of
    the sequences still alive ("iid": SpecTr's k-sequential selection), from the drafter's q."""
    from falconet.methods.speculative import multi_draft

    tokens = draft.tokens
    alive = list(draft.sequences or [])
    path, node, depth = [], -1, 0
    while True:
        if draft.scheme == "iid":
            cands = [seq[depth] for seq in alive if len(seq) > depth]
        else:
            cands = children.get(node, [])
        p = probs[node + 1]
        if not cands:
            token = int(_draw(p[None], [g])[0])
            return Verdict([tokens[i] for i in path] + [token], len(path), path)
        select = multi_draft.spectr_select if draft.scheme == "iid" else multi_draft.rrs_select
        chosen, residual = select(p, draft.probs[cands[0]], [tokens[c] for c in cands], g)
        if chosen is None:
            token = int(_draw(residual[None], [g])[0])
            return Verdict([tokens[i] for i in path] + [token], len(path), path)
        node = cands[chosen]
        path.append(node)
        alive = [seq for seq in alive if len(seq) > depth and seq[depth] == node]
        depth += 1
