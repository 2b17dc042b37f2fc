"""SpecDec++'s acceptance head: it learns the acceptance rate its features predict, and the stop
rule is a threshold on the probability that some draft so far is rejected."""

import random
from types import SimpleNamespace

import pytest

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.specdecpp import AcceptanceHead, SpecDecPlusPlusProposer


def test_starts_at_the_drafters_confidence_and_calibrates():
    head = AcceptanceHead()
    assert head.predict(head.features(0.8, 0)) == pytest.approx(0.8)
    rng = random.Random(0)
    for _ in range(20000):  # the target accepts half as often as the drafter believes
        c = rng.uniform(0.1, 0.9)
        head.learn(head.features(c, 0), rng.random() < c / 2)
    grid = (0.2, 0.35, 0.5, 0.65, 0.8)
    error = sum(abs(head.predict(head.features(c, 0)) - c / 2) for c in grid) / len(grid)
    assert error < 0.05  # it started at mean error 0.25 (= mean c / 2)
    assert [head.predict(head.features(c, 0)) for c in grid] == sorted(
        head.predict(head.features(c, 0)) for c in grid
    )


def test_stops_when_a_rejection_becomes_likely():
    proposer = SpecDecPlusPlusProposer.__new__(SpecDecPlusPlusProposer)  # the rule needs no engine
    proposer.acceptance, proposer.stop_threshold = AcceptanceHead(), 0.7
    req = SimpleNamespace(request_id="a")
    proposer._drafted = {"a": (10, [], 1.0)}
    draft = Draft([])
    keeps = []
    for confidence in (0.9, 0.8, 0.6, 0.9):
        draft.tokens.append(0)
        keeps.append(proposer.keeps_drafting(req, draft, confidence))
    # P(all kept): 0.9, 0.72, 0.432, 0.389: never below 1 - 0.7
    assert keeps == [True, True, True, True]
    assert proposer._drafted["a"][2] == pytest.approx(0.9 * 0.8 * 0.6 * 0.9)
    proposer._drafted = {"a": (10, [], 1.0)}
    draft = Draft([])
    keeps = []
    for confidence in (0.9, 0.5, 0.5):
        draft.tokens.append(0)
        keeps.append(proposer.keeps_drafting(req, draft, confidence))
    assert keeps == [True, True, False]  # 0.9, 0.45, 0.225 < 0.3
