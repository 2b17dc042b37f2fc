"""DISCO: a classifier decides after every drafted token whether to draft another.

Mamou et al. (2024), "Accelerating Speculative Decoding using Dynamic Speculation Length". A
fixed speculation length is wrong at most steps: too long where the draft soon goes astray
(wasted draft forwards and verified rows), too short where it would have been right for many
tokens. DISCO trains a classifier on the draft model's own state at each drafted token (the
top probabilities of its distribution, their entropy, and how far into the draft it is) to
predict whether that token will be accepted, and keeps drafting while it says yes; the
verification is unchanged, so the output is too.

Here the drafter is the draft model (`draft-model`), drafting up to `num_speculative_tokens`
(default 8). The classifier is a logistic regression on [top-1 probability as a logit, top-2
probability, normalised entropy, position]. The paper fits it offline to the oracle
speculation lengths of a training set; here it is fitted online to the same labels (each
drafted token up to the first rejection: accepted or not) from every verification the engine
runs, starting as the draft's top-1 probability itself, so it needs no training run and adapts
to the target it serves. The decision after token j uses only the distributions of tokens 0..j,
each of which is verified, so the output stays exact.
"""

from __future__ import annotations

import math

import torch

from falconet.methods.speculative.draft_model import DraftModelProposer
from falconet.methods.speculative.drafting import draft_autoregressively
from falconet.methods.speculative.specdecpp import AcceptanceHead


def draft_features(logits: torch.Tensor, position: int) -> list[float]:
    """The classifier's inputs for a token drafted from `logits` at draft position `position`."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(2).values.tolist()
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum()) / math.log(probs.numel())
    p1 = min(max(top[0], 1e-4), 1 - 1e-4)
    return [1.0, math.log(p1 / (1 - p1)), top[1], entropy, position / 8]


class DiscoProposer(DraftModelProposer):
    """Draft-model drafts, each step's length set by an acceptance classifier (DISCO)."""

    name = "disco"
    paper = "Accelerating Speculative Decoding using Dynamic Speculation Length (DISCO, Mamou et al., 2024)"
    default_num_tokens = 8  # the longest draft; the classifier usually stops it earlier
    threshold = 0.4  # keep drafting while the classifier's P(this token is accepted) is above it

    def __init__(self, engine, draft=None):
        super().__init__(engine, draft)
        self.forget()
        # request id -> (its token count when drafted, features of each drafted token)
        self._drafted: dict[str, tuple[int, list[list[float]]]] = {}

    def _draft(self, requests, computed, max_tokens):
        feats = {r.request_id: [] for r in requests}

        def continues(i: int, logits: torch.Tensor) -> bool:
            mine = feats[requests[i].request_id]
            mine.append(draft_features(logits, len(mine)))
            return self.classifier.predict(mine[-1]) > self.threshold

        drafts = draft_autoregressively(
            self.model, self.cache, requests, computed, max_tokens, continues=continues
        )
        for req in requests:
            self._drafted[req.request_id] = (req.num_tokens, feats[req.request_id])
        return drafts

    def on_verified(self, req):
        super().on_verified(req)
        start, feats = self._drafted.pop(req.request_id, (0, []))
        # drafts kept: the target computed the known token and them
        self.classifier.learn_verified(feats, req.num_computed - start)

    def on_reset(self, req):
        super().on_reset(req)
        self._drafted.pop(req.request_id, None)

    def forget(self):
        self.classifier = AcceptanceHead(weights=[0.0, 1.0, 0.0, 0.0, 0.0])
