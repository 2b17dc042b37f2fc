"""SpecDec++: stop drafting when a trained acceptance head predicts a rejection is likely.

Huang et al. (2024), "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths".
Choosing the draft length is a Markov decision process whose optimal policy is a threshold
policy: keep drafting while the probability that at least one of the drafts so far is rejected
stays below a threshold h. SpecDec++ estimates each draft token's acceptance probability with
a small head trained on the drafter's features, and multiplies them along the draft.

Here the drafter is the EAGLE head, and the acceptance head is a logistic regression on its
features for each drafted token (the head's probability of the token, as a logit, and the
token's position in the draft). It is trained online, from every verification the engine
runs: each drafted token up to the first rejection is one example, accepted or not. It starts
as the head's own probability (EAGLE's confidence rule) and calibrates itself to the target
it serves, so no separate training run or artifact is needed. The decision to draft token j+1
uses tokens 0..j only, all of which are verified, so the output stays exact.
"""

from __future__ import annotations

import math

from falconet.methods.speculative.eagle import EagleProposer


class AcceptanceHead:
    """P(a draft token is accepted | the drafts before it were), logistic in its features."""

    def __init__(self, lr: float = 0.05, weights: list[float] | None = None):
        # bias, logit(confidence), position: starts as the confidence itself
        self.weights = list(weights) if weights is not None else [0.0, 1.0, 0.0]
        self.lr = lr

    @staticmethod
    def features(confidence: float, position: int) -> list[float]:
        c = min(max(confidence, 1e-4), 1 - 1e-4)
        return [1.0, math.log(c / (1 - c)), position / 8]

    def predict(self, features: list[float]) -> float:
        z = sum(w * f for w, f in zip(self.weights, features, strict=True))
        return 1 / (1 + math.exp(-max(min(z, 30.0), -30.0)))

    def learn_verified(self, features: list[list[float]], accepted: int) -> None:
        """Learn from one verified draft: `features` of each drafted token, `accepted` of them
        kept. Tokens up to the first rejection are examples; those after it were never judged."""
        for j, f in enumerate(features[: accepted + 1]):
            self.learn(f, j < accepted)

    def learn(self, features: list[float], accepted: bool) -> None:
        """One step of stochastic gradient descent on the log loss."""
        g = float(accepted) - self.predict(features)
        self.weights = [w + self.lr * g * f for w, f in zip(self.weights, features, strict=True)]


class SpecDecPlusPlusProposer(EagleProposer):
    """EAGLE drafts, stopped when the acceptance head's P(some draft rejected) > h (SpecDec++)."""

    name = "specdecpp"
    paper = "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths (Huang et al., 2024)"
    default_num_tokens = 6  # the longest draft; the threshold usually stops it earlier
    stop_threshold = 0.7  # h: stop once P(at least one of the drafts is rejected) exceeds it

    def __init__(self, engine, head=None):
        super().__init__(engine, head)
        self.acceptance = AcceptanceHead()
        # request id -> (its token count when drafted, features of each drafted token, P(all kept))
        self._drafted: dict[str, tuple[int, list[list[float]], float]] = {}

    def propose(self, requests, max_tokens):
        for req in requests:
            self._drafted[req.request_id] = (req.num_tokens, [], 1.0)
        return super().propose(requests, max_tokens)

    def keeps_drafting(self, request, draft, confidence):
        start, feats, survive = self._drafted[request.request_id]
        f = self.acceptance.features(confidence, len(draft.tokens) - 1)
        survive *= self.acceptance.predict(f)
        feats.append(f)
        self._drafted[request.request_id] = (start, feats, survive)
        return 1 - survive <= self.stop_threshold

    def on_verified(self, req):
        super().on_verified(req)
        start, feats, _ = self._drafted.pop(req.request_id, (0, [], 1.0))
        # drafts kept: the target computed the known token and them
        self.acceptance.learn_verified(feats, req.num_computed - start)

    def on_reset(self, req):
        super().on_reset(req)
        self._drafted.pop(req.request_id, None)

    def forget(self):
        self.acceptance = AcceptanceHead()
