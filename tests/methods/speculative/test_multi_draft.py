"""Multi-draft verification rules on synthetic distributions: the chosen token is distributed as
the target's p whatever the draft's q, acceptance matches the theory, and no rule beats the
optimum of Hu et al. (2025), computed here against every subset of small vocabularies."""

from itertools import combinations

import pytest
import torch

from falconet.methods.speculative import multi_draft, verifier
from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.multi_draft import (
    optimal_acceptance,
    rrs_select,
    sample_without_replacement,
    spectr_rho,
    spectr_select,
)

P = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
Q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.25, 0.1, 0.05], dtype=torch.float64)  # far from P
TRIALS = 6000


def _brute_force(p, q, n: int, replacement: bool) -> float:
    """min over all token sets H of p(H) + 1 - Q(all n draws in H)."""
    best = 1.0
    for size in range(len(p) + 1):
        for h in combinations(range(len(p)), size):
            h = list(h)
            q_h = float(q[h].sum()) if h else 0.0
            if replacement:
                inside = q_h**n
            elif n == 1:
                inside = q_h
            else:
                inside = sum(float(q[x]) * (q_h - float(q[x])) / (1 - float(q[x])) for x in h)
            best = min(best, (float(p[h].sum()) if h else 0.0) + 1.0 - inside)
    return best


def test_optimal_acceptance_matches_every_subset():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        p = torch.softmax(2 * torch.randn(6, generator=g, dtype=torch.float64), 0)
        q = torch.softmax(2 * torch.randn(6, generator=g, dtype=torch.float64), 0)
        assert optimal_acceptance(p, q, 1) == pytest.approx(float(torch.minimum(p, q).sum()), abs=1e-12)
        for n in (1, 2, 3):
            assert optimal_acceptance(p, q, n) == pytest.approx(_brute_force(p, q, n, True), abs=1e-12)
        # without replacement the sorted sets give an upper bound of the optimum
        assert optimal_acceptance(p, q, 2, replacement=False) >= _brute_force(p, q, 2, False) - 1e-12
    # drawing without replacement can only help (Hu et al., 2025)
    assert optimal_acceptance(P, Q, 2, replacement=False) >= optimal_acceptance(P, Q, 2) - 1e-12


def test_spectr_with_one_draft_is_speculative_sampling():
    rho, beta = spectr_rho(P, Q, 1)
    assert rho == 1.0 and beta == pytest.approx(float(torch.minimum(P, Q).sum()))


def _run(select, draw_fn, k: int, seed: int = 0):
    g, counts, accepted = torch.Generator().manual_seed(seed), torch.zeros(len(P), dtype=torch.float64), 0
    for _ in range(TRIALS):
        draws = draw_fn(k, g)
        chosen, residual = select(P, Q, draws, g)
        if chosen is None:
            token = int(torch.multinomial(residual, 1, generator=g))
        else:
            token, accepted = draws[chosen], accepted + 1
        counts[token] += 1
    return counts / TRIALS, accepted / TRIALS


def _iid(k, g):
    return torch.multinomial(Q, k, replacement=True, generator=g).tolist()


def _without(k, g):
    return sample_without_replacement(Q, k, g)


def _within(freq, p, sigmas=4.5):
    stderr = (p * (1 - p) / TRIALS).sqrt()
    return bool(((freq - p).abs() <= sigmas * stderr).all())


@pytest.mark.parametrize("k", [1, 3])
def test_spectr_output_is_p_and_acceptance_is_as_predicted(k):
    freq, acc = _run(spectr_select, _iid, k)
    assert _within(freq, P), (freq, P)
    _, beta = spectr_rho(P, Q, k)
    predicted = 1 - (1 - beta) ** k
    assert abs(acc - predicted) <= 4 * (predicted * (1 - predicted) / TRIALS) ** 0.5
    assert predicted <= optimal_acceptance(P, Q, k) + 1e-9
    if k > 1:  # more drafts are accepted more often
        assert predicted > float(torch.minimum(P, Q).sum())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_recursive_rejection_output_is_p(k):
    freq, acc = _run(rrs_select, _without, k)
    assert _within(freq, P), (freq, P)
    if k <= 2:
        assert acc <= optimal_acceptance(P, Q, k, replacement=False) + 4 * (0.25 / TRIALS) ** 0.5


@pytest.mark.parametrize("select,draw_fn", [(spectr_select, _iid), (rrs_select, _without)])
def test_a_wrong_acceptance_rule_is_caught(monkeypatch, select, draw_fn):
    """The frequency check above fails when every draft is accepted."""
    monkeypatch.setattr(verifier, "accept", lambda u, p, q: True)
    freq, _ = _run(select, draw_fn, 3)
    assert not _within(freq, P)


def test_sampled_trees_are_checked_and_never_cut():
    q = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError):
        Draft([1, 2], q, parents=[-1, -1])  # a sampled tree needs a scheme
    with pytest.raises(ValueError):
        Draft([1, 2], q, parents=[-1, -1], scheme="iid")  # and i.i.d. ones their sequences
    draft = Draft([1, 2], q, parents=[-1, 0], scheme="without-replacement")
    assert draft.is_tree  # a sampled chain stays a tree: its verification rule is the scheme's
    draft.truncate(2)  # no-op
    with pytest.raises(ValueError):
        draft.truncate(1)
    assert multi_draft.sample_without_replacement(torch.tensor([0.5, 0.5, 0.0]), 3, torch.Generator()) in (
        [0, 1],
        [1, 0],
    )
