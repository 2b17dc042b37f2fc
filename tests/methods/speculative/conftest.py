"""Shared by the tests of the methods that draft from extra rows of the verify forward."""

from __future__ import annotations

import random

import pytest
import torch

from falconet.sampling_params import SamplingParams


def check_guesses(engine, method: str, logits_of, seed: int) -> set[int]:
    """Run 3 greedy requests with `method` (PPD or hidden transfer); after every step, its
    guesses must equal `logits_of(ids [1, S], anchors [1, 1])`'s argmax computed from scratch
    after the text up to the target's last token, whichever draft verification stopped at.
    Returns the tokens-per-step counts seen."""
    proposer = engine.speculator.proposer(method)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, speculative=method)
    reqs = [engine.add_request([rng.randrange(97) for _ in range(9)], params) for _ in range(3)]
    checked, lengths = 0, set()
    while engine.has_unfinished():
        before = {r.request_id: r.num_tokens for r in reqs}
        engine.step()
        for r in reqs:
            if r.request_id not in proposer._guesses or r.finished:
                continue
            known, guesses = proposer._guesses[r.request_id]
            assert known == r.num_tokens
            lengths.add(r.num_tokens - before[r.request_id])
            with torch.no_grad():
                logits = logits_of(torch.tensor([r.all_ids[:-1]]), torch.tensor([[len(r.all_ids) - 2]]))
            assert guesses == logits[0, 0, : len(guesses)].argmax(-1).tolist()
            checked += 1
    assert checked > 20
    return lengths


@pytest.fixture(scope="session")
def guesses_checked():
    return check_guesses
