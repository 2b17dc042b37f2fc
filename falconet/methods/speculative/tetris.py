"""TETRIS: the batch's verification budget goes to its likeliest draft tokens.

Wu et al. (2025), "TETRIS: Optimal Draft Token Selection for Batch Speculative Decoding". When a
batch can verify only so many draft tokens per step, a fixed number per request wastes rows on
drafts that will be rejected while another request's likely drafts go unverified. TETRIS drafts
ahead for every request, then sends to verification the draft tokens most likely to be accepted
across the whole batch: token j of a request is worth the chance that drafts 0..j all survive,
estimated from the drafter's own probabilities, so each request's share follows how sure its
drafter is.

Here the drafter is the draft model (`draft-model`), drafting `num_speculative_tokens` tokens
per request (default 6); the batch's capacity is half of those, spent where the product of the
draft's probabilities is highest. The cut uses only the drafter's information, and never a
sampled draft's own draw (see `_survival`), so verification stays exact.
"""

from __future__ import annotations

import math

from falconet.methods.speculative.budget import budget_lengths
from falconet.methods.speculative.draft_model import DraftModelProposer

VERIFIED_SHARE = 0.5  # the verification capacity: this share of the batch's draft tokens


class TetrisProposer(DraftModelProposer):
    """Draft-model drafts, verified where the batch's budget buys the most tokens (TETRIS)."""

    name = "tetris"
    paper = "TETRIS: Optimal Draft Token Selection for Batch Speculative Decoding (Wu et al., 2025)"
    default_num_tokens = 6  # drafted per request; the batch verifies VERIFIED_SHARE of them

    def propose(self, requests, max_tokens):
        self._budget = math.ceil(VERIFIED_SHARE * sum(max_tokens))
        return super().propose(requests, max_tokens)

    def select(self, requests, drafts, base_rows, base_tokens):
        gains = [_survival(d) for d in drafts]
        for req, draft, n in zip(requests, drafts, budget_lengths(gains, self._budget), strict=True):
            draft.truncate(n)
            # The draft model fed drafts that will not be verified now: its cache is valid only up
            # to the drafts kept (verification cuts it further).
            epoch, fed = self._valid[req.request_id]
            self._valid[req.request_id] = (epoch, min(fed, req.num_tokens + n))


def _survival(draft) -> list[float]:
    """The drafter's estimate that drafts 0..j are all accepted, for each j, non-increasing.

    A sampled draft token's own draw may not decide whether it is verified (keeping only the
    draws q liked best would skew the output away from p): token j is valued by what the
    drafter expects of a draw from its q, sum q^2, times the confidence of the tokens before it.
    A point-mass draft is a function of the text so far, so its own confidence may be used."""
    out, alive = [], 1.0
    for j, c in enumerate(draft.confidence or []):
        guess = c if draft.probs is None else float((draft.probs[j] ** 2).sum())
        out.append(min(alive * guess, out[-1]) if out else alive * guess)
        alive *= c
    return out
