"""Verifying several sampled drafts for one position, and how well any verifier could do.

At a node of a draft tree the target's distribution is p and the drafter offered several
candidate tokens drawn from its q. Two ways of drawing them, two exact selection rules:

- i.i.d. draws (k independent draft sequences): SpecTr's k-sequential selection (Sun et al.,
  2023, "SpecTr: Fast Speculative Decoding via Optimal Transport"). Candidate i is accepted with
  probability min(1, p(x_i) / (rho q(x_i))); if none is, the token is drawn from the residual
  p_res = (p - min(q, p / rho) (1 - (1 - beta)^k) / beta) / (1 - beta)^k, where
  beta = sum_x min(q(x), p(x) / rho). rho is the smallest value in [1, k] for which p_res is a
  distribution (rho beta >= 1 - (1 - beta)^k); the chance of accepting one is 1 - (1 - beta)^k.
  With k = 1, rho = 1 and this is standard speculative sampling.
- draws without replacement: recursive rejection sampling (Jeon et al., 2024, "Recursive
  Speculative Decoding: Accelerating LLM Inference via Sampling Without Replacement"). Draw i
  came from q_i, q with the earlier draws taken out and renormalised; it is accepted with
  probability min(1, r_i(x_i) / q_i(x_i)) with r_1 = p, and after a rejection
  r_{i+1} = norm(max(0, r_i - q_i)). If all are rejected the token is drawn from r_{k+1}.

Either way the chosen token is distributed exactly as p. Each accept/reject decision goes through
`verifier.accept`, so the tests' mutation of that rule reaches these too.

`optimal_acceptance` is the best any verifier can do for a given way of drawing the candidates
(Hu et al., 2025, "Towards Optimal Multi-draft Speculative Decoding"): by the dual of the
optimal-transport problem, alpha* = min over token sets H of p(H) + 1 - Q(every draw in H).
"""

from __future__ import annotations

import torch

from falconet.methods.speculative import verifier


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g, dtype=torch.float64))


def spectr_rho(p: torch.Tensor, q: torch.Tensor, k: int, iters: int = 30) -> tuple[float, float]:
    """(rho, beta(rho)) of SpecTr's k-sequential selection: the smallest rho in [1, k] with
    rho beta(rho) >= 1 - (1 - beta(rho))^k, found by bisection (the left side grows with rho,
    the right side shrinks; the upper end is kept, so the rho returned is always valid)."""
    support = q > 0  # min(q, p / rho) is 0 elsewhere
    p, q = p[support].double(), q[support].double()

    def beta(rho: float) -> float:
        return float(torch.minimum(q, p / rho).sum())

    def valid(rho: float) -> bool:
        b = beta(rho)
        return rho * b >= 1.0 - (1.0 - b) ** k - 1e-12

    if k <= 1 or valid(1.0):
        return 1.0, beta(1.0)
    lo, hi = 1.0, float(k)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if valid(mid) else (mid, hi)
    return hi, beta(hi)


def spectr_select(
    p: torch.Tensor, q: torch.Tensor, draws: list[int], g: torch.Generator
) -> tuple[int | None, torch.Tensor | None]:
    """SpecTr's k-sequential selection over i.i.d. draws (in the order drawn) from q.
    Returns (index of the accepted draw, None) or (None, residual distribution to sample)."""
    k = len(draws)
    rho, b = spectr_rho(p, q, k)
    for i, x in enumerate(draws):
        if verifier.accept(_uniform(g), float(p[x]), rho * float(q[x])):
            return i, None
    p64, q64 = p.double(), q.double()
    accepted = 1.0 - (1.0 - b) ** k
    residual = (p64 - torch.minimum(q64, p64 / rho) * (accepted / max(b, 1e-300))).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:  # only round-off: the draws held all of p
        residual = p64
    return None, (residual / residual.sum()).float()


def rrs_select(
    p: torch.Tensor, q: torch.Tensor, draws: list[int], g: torch.Generator
) -> tuple[int | None, torch.Tensor | None]:
    """Recursive rejection sampling over draws taken from q without replacement (in the order
    drawn). Returns (index of the accepted draw, None) or (None, residual to sample)."""
    r = p.double().clone()
    q_i = q.double().clone()
    for i, x in enumerate(draws):
        q_total = float(q_i.sum())
        if q_total <= 0.0:
            break
        q_i /= q_total
        if verifier.accept(_uniform(g), float(r[x]), float(q_i[x])):
            return i, None
        nxt = (r - q_i).clamp_(min=0.0)
        total = float(nxt.sum())
        if total > 0.0:  # else only round-off: r == q_i, and x would have been accepted
            r = nxt / total
        q_i[x] = 0.0
    return None, r.float()


def sample(weights: torch.Tensor, g: torch.Generator) -> int:
    """One index drawn with probability proportional to `weights` (non-negative, not all 0):
    inverse transform on their running sum (several times faster than torch.multinomial on a
    vocabulary-sized row)."""
    cumulative = weights.double().cumsum(0)
    u = float(torch.rand(1, generator=g, dtype=torch.float64)) * float(cumulative[-1])
    x = int(torch.searchsorted(cumulative, torch.tensor([u], dtype=torch.float64), right=True))
    x = min(x, len(weights) - 1)
    while float(weights[x]) <= 0.0:  # u landed on the edge of a zero-weight run: step back
        x -= 1
    return x


def sample_without_replacement(q: torch.Tensor, n: int, g: torch.Generator) -> list[int]:
    """n distinct tokens drawn one after another from q, each time among those not drawn yet
    (fewer if q has fewer non-zero entries)."""
    q = q.double().clone()
    out = []
    for _ in range(min(n, int((q > 0).sum()))):
        x = sample(q, g)
        out.append(x)
        q[x] = 0.0
    return out


def optimal_acceptance(p: torch.Tensor, q: torch.Tensor, n: int, replacement: bool = True) -> float:
    """The highest probability with which any exact verifier accepts one of n drafts drawn from q
    (i.i.d. with replacement, or without replacement), for target p: min over H of
    p(H) + 1 - Q(all draws in H) (Hu et al., 2025).

    With replacement Q(all in H) = q(H)^n. The minimum is taken over the sets H made of the tokens
    with the highest q / p first (a token with p = 0 and q > 0 first of all); for n = 1 that is
    exactly 1 - TV(p, q), and tests/methods/speculative/test_multi_draft.py checks it against all
    2^V subsets of small vocabularies. Without replacement the draws' chance of all lying in H
    depends on more than q(H); the minimum is taken over the same sets, with that chance computed
    exactly for each (n <= 2 here), which gives an upper bound of the optimum."""
    p64, q64 = p.double(), q.double()
    ratio = torch.where(p64 > 0, q64 / p64.clamp(min=1e-300), torch.full_like(q64, float("inf")))
    ratio = torch.where(q64 > 0, ratio, torch.zeros_like(ratio))
    order = ratio.argsort(descending=True)
    p_mass = torch.cat([torch.zeros(1, dtype=torch.float64), p64[order].cumsum(0)])
    if replacement:
        inside = torch.cat([torch.zeros(1, dtype=torch.float64), q64[order].cumsum(0)]).clamp(max=1.0) ** n
    else:
        inside = _without_replacement_inside(q64[order], n)
    return float((p_mass + 1.0 - inside).min().clamp(0.0, 1.0))


def _without_replacement_inside(qs: torch.Tensor, n: int) -> torch.Tensor:
    """P(n draws without replacement from q all lie in the first j tokens), j = 0..V; qs is q in
    that order. n = 1: q(H); n = 2: sum over x in H of q(x) (q(H) - q(x)) / (1 - q(x))."""
    zero = torch.zeros(1, dtype=torch.float64)
    mass = torch.cat([zero, qs.cumsum(0)])
    if n <= 1:
        return mass.clamp(max=1.0)
    if n > 2:
        raise ValueError("without replacement, optimal_acceptance is computed for n <= 2 drafts")
    # sum_{x in H} q(x) (q(H) - q(x)) / (1 - q(x)) = q(H) S1(H) - S2(H), with
    # S1 = sum q / (1 - q) and S2 = sum q^2 / (1 - q) over H.
    w = qs / (1.0 - qs).clamp(min=1e-300)
    s1 = torch.cat([zero, w.cumsum(0)])
    s2 = torch.cat([zero, (w * qs).cumsum(0)])
    return (mass * s1 - s2).clamp(0.0, 1.0)
