"""Choosing which draft tokens of a batch to verify: goodput-optimal lengths (SmartSpec) equal a
brute-force search, a fixed budget takes the likeliest tokens (TETRIS), and acceptance rates
follow the drafts' hits and misses."""

from itertools import product
from types import SimpleNamespace

import pytest

from falconet.methods.speculative.budget import (
    AcceptanceRates,
    budget_lengths,
    chain_gains,
    goodput_lengths,
)


def _goodput(gains, lengths, base_tokens, base_rows, cost):
    tokens = base_tokens + sum(sum(g[:n]) for g, n in zip(gains, lengths, strict=True))
    return tokens / cost(base_rows + sum(lengths))


@pytest.mark.parametrize("slope", [0.001, 0.03, 0.1, 0.4, 2.0])
@pytest.mark.parametrize("rates", [(0.9, 0.5, 0.1), (0.7, 0.7, 0.3), (0.2, 0.95, 0.6)])
def test_goodput_lengths_are_optimal(rates, slope):
    gains = [chain_gains(r, 4) for r in rates]
    base_tokens, base_rows = 5, 7
    cost = lambda rows: 1.0 + slope * rows  # noqa: E731
    best = max(
        _goodput(gains, lengths, base_tokens, base_rows, cost) for lengths in product(range(5), repeat=3)
    )
    chosen = goodput_lengths(gains, base_tokens, base_rows, cost)
    assert _goodput(gains, chosen, base_tokens, base_rows, cost) == pytest.approx(best)


def test_speculation_fades_out_with_load():
    """The same drafts, a bigger batch: fewer of them are worth their rows."""
    cost = lambda rows: 8.0 + 0.3 * rows  # noqa: E731 - ms, the default model on 2 cores
    verified = []
    for batch in (1, 4, 16, 64):
        gains = [chain_gains(0.6, 8)] * batch
        verified.append(sum(goodput_lengths(gains, batch, batch, cost)) / batch)
    assert verified == sorted(verified, reverse=True) and verified[0] >= 3 and verified[-1] == 0


def test_no_timing_yet_keeps_every_draft():
    assert goodput_lengths([[0.5, 0.2], [0.1]], 2, 2, lambda rows: 0.0) == [2, 1]


def test_budget_takes_the_likeliest_tokens():
    gains = [[0.9, 0.8, 0.1], [0.85, 0.2], [0.3]]
    assert budget_lengths(gains, 3) == [2, 1, 0]
    assert budget_lengths(gains, 5) == [2, 2, 1]
    assert budget_lengths(gains, 0) == [0, 0, 0] and budget_lengths(gains, 99) == [3, 2, 1]
    # equal gains: a request's earlier positions come first, so lengths stay prefixes
    assert budget_lengths([[1.0, 1.0, 1.0], [1.0]], 2) in ([2, 0], [1, 1])


def test_acceptance_rates_follow_hits_and_misses():
    rates = AcceptanceRates(first=0.5, later=0.7, weight=0.4)
    req = SimpleNamespace(request_id="a", all_ids=[1, 2, 3], num_tokens=3)
    assert rates.gains(req, 3) == pytest.approx([0.5, 0.35, 0.245])
    rates.drafted(req, [4, 5, 6, 7])
    req.all_ids += [4, 5, 9, 7]  # two hits, then a miss; nothing after the miss counts
    req.num_tokens = 7
    rates.update(req)
    first = 0.5 + 0.4 * 0.5  # the request's first position: a hit
    later = [0.7 + 0.1 * 0.3, 0.7 - 0.1 * 0.7]  # method-wide: a hit at 1, a miss at 2
    assert rates.gains(req, 4) == pytest.approx(
        [first, first * later[0], first * later[0] * later[1], first * later[0] * later[1] * 0.7]
    )
    other = SimpleNamespace(request_id="b", all_ids=[1], num_tokens=1)
    assert rates.rate(other) == pytest.approx(0.5 + 0.1 * 0.5)  # the method-wide first rate moved
    # A draft is scored only as far as the request has produced, and only once.
    rates.drafted(req, [8, 9])
    req.all_ids.append(3)
    rates.update(req)
    assert rates.rate(req) == pytest.approx(first - 0.4 * first)
    rates.update(req)
    assert rates.rate(req) == pytest.approx(first - 0.4 * first)
    rates.forget(req)
    assert rates.rate(req) == rates.first
