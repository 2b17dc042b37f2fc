"""How many of a batch's draft tokens to verify: by goodput (SmartSpec) or under a fixed budget
(TETRIS). Both rank every draft token of the batch by the tokens it is expected to add.

Draft token j of a request adds a token only if drafts 0..j are all accepted, so its expected
gain is the probability of that: non-increasing along a chain, and taking the best gains of the
batch first always takes a prefix of each request's draft. Cutting a draft by anything the
drafter knows (its tokens, its confidence, other requests' drafts), never by the target's
verdict, leaves verification exact.
"""

from __future__ import annotations

from collections.abc import Callable


def _ranked(gains: list[list[float]]) -> list[tuple[float, int, int]]:
    """(gain, request, position), best first; a request's earlier positions first on ties."""
    return sorted(
        ((g, i, j) for i, gs in enumerate(gains) for j, g in enumerate(gs)), key=lambda x: (-x[0], x[2])
    )


def _lengths(taken, num: int) -> list[int]:
    lengths = [0] * num
    for _, i, _ in taken:
        lengths[i] += 1
    return lengths


def goodput_lengths(
    gains: list[list[float]], base_tokens: float, base_rows: int, cost: Callable[[int], float]
) -> list[int]:
    """Draft tokens to verify per request so that the step's goodput, expected tokens per second
    (base_tokens + the gains taken) / cost(base_rows + the drafts taken), is highest (SmartSpec's
    objective). gains[i][j]: what request i's draft token j is expected to add, non-increasing
    in j. base_rows, base_tokens: the step's rows and tokens without any of these drafts."""
    ranked = _ranked(gains)
    if cost(base_rows) <= 0:  # no step timed yet: nothing to weigh the drafts against
        return [len(g) for g in gains]
    best, best_n, tokens = base_tokens / cost(base_rows), 0, base_tokens
    for n, (g, _, _) in enumerate(ranked, 1):
        tokens += g
        rate = tokens / cost(base_rows + n)
        if rate > best:
            best, best_n = rate, n
    return _lengths(ranked[:best_n], len(gains))


def budget_lengths(gains: list[list[float]], budget: int) -> list[int]:
    """The `budget` draft tokens of the batch with the highest expected gains (TETRIS)."""
    return _lengths(_ranked(gains)[: max(0, budget)], len(gains))


def chain_gains(rate: float, n: int) -> list[float]:
    """Expected gains of an n-token chain whose tokens are each accepted with `rate`."""
    return [rate ** (j + 1) for j in range(n)]


class AcceptanceRates:
    """How likely a request's draft tokens are to be accepted, from its observed drafts.

    Draft j is accepted only after drafts 0..j-1 were, and for retrieval drafts (n-gram matches)
    the odds rise along a draft: a match that was right so far tends to stay right. So the first
    position gets a rate of its own, per request (a moving average; the method-wide one for a
    request not seen yet), and each later position j the method-wide rate of acceptance given
    that j - 1 was accepted. Draft j's expected gain is their product up to j.

    Observations come from comparing a draft with the tokens the request actually produced next,
    whether the draft was verified or not (a draft cut before verification is still scored once
    the target has produced those positions): for a point-mass draft token x, the target's next
    token is x exactly when speculative sampling would accept x, so this is the acceptance."""

    def __init__(self, first: float = 0.5, later: float = 0.7, weight: float = 0.15):
        self.first, self.later, self.weight = first, later, weight
        self._first: dict[str, float] = {}
        self._later: list[float] = []  # index j - 1: P(draft j accepted | draft j - 1 was)
        self._pending: dict[str, tuple[int, list[int]]] = {}

    def rate(self, req) -> float:
        """The request's chance that its first draft token is accepted."""
        return self._first.get(req.request_id, self.first)

    def gains(self, req, n: int) -> list[float]:
        """The chance that drafts 0..j are all accepted, for j < n."""
        out, p = [], self.rate(req)
        for j in range(n):
            if j:
                p *= self._later[j - 1] if j - 1 < len(self._later) else self.later
            out.append(p)
        return out

    def drafted(self, req, tokens: list[int]) -> None:
        """`tokens` were drafted to follow the request's current tokens."""
        if tokens:
            self._pending[req.request_id] = (req.num_tokens, list(tokens))

    def update(self, req) -> None:
        """Score the request's last draft against what it produced since."""
        pending = self._pending.pop(req.request_id, None)
        if pending is None:
            return
        start, tokens = pending
        produced = req.all_ids[start : start + len(tokens)]
        w = self.weight
        for j, (drafted, actual) in enumerate(zip(tokens, produced, strict=False)):
            hit = float(drafted == actual)
            if j == 0:
                rate = self.rate(req)
                self._first[req.request_id] = rate + w * (hit - rate)
                self.first += w / 4 * (hit - self.first)
            else:
                if len(self._later) < j:
                    self._later.append(self.later)
                self._later[j - 1] += w / 4 * (hit - self._later[j - 1])
            if not hit:
                break

    def forget(self, req) -> None:
        self._first.pop(req.request_id, None)
        self._pending.pop(req.request_id, None)
