"""SmartSpec: each step verifies the draft tokens that maximise the batch's goodput.

Liu et al. (2024), "Optimizing Speculative Decoding for Serving Large Language Models Using
Goodput". Speculation trades compute for latency: verifying k drafts costs k more rows in the
step's forward, cheap while a small batch leaves the hardware idle (on 2 CPU cores a step of 1
row takes ~8 ms, each extra row ~0.3 ms) but not once many requests fill the step. SmartSpec
picks, per step and per request, how many drafts to verify (0 included) to maximise goodput:
expected tokens produced per second of the step. Expected tokens come from measured acceptance
rates (each request's at the first draft position, the method's further along: budget.py), the
step's time from the engine's own fit of time against rows (engine/step_cost.py). As load
rises, the same drafts buy less than their rows cost, and speculation fades out by itself.

Drafting is prompt lookup (`ngram`): free to propose, so drafting more than is verified costs
nothing, as in the paper's model-free setting. The cut depends only on draft-side information,
so verification stays exact.
"""

from __future__ import annotations

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.budget import AcceptanceRates, goodput_lengths
from falconet.methods.speculative.ngram import NgramProposer
from falconet.methods.speculative.token_recycling import NgramRecyclingProposer


class SmartSpecProposer(NgramProposer):
    """Prompt-lookup drafts cut per step to the goodput-optimal lengths (SmartSpec)."""

    name = "smartspec"
    paper = (
        "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput (SmartSpec, "
        "Liu et al., 2024); drafts by Prompt Lookup Decoding (Saxena, 2023)"
    )
    default_num_tokens = 8  # drafted at most; goodput decides how many are verified

    def __init__(self, engine):
        super().__init__(engine)
        self.rates = AcceptanceRates()

    def propose(self, requests, max_tokens):
        for req in requests:
            self.rates.update(req)
        drafts = super().propose(requests, max_tokens)
        for req, draft in zip(requests, drafts, strict=True):
            self.rates.drafted(req, draft.tokens)
        return drafts

    def select(self, requests, drafts, base_rows, base_tokens):
        gains = [self.rates.gains(r, len(d.tokens)) for r, d in zip(requests, drafts, strict=True)]
        lengths = goodput_lengths(gains, base_tokens, base_rows, self.engine.step_cost.predict)
        for draft, n in zip(drafts, lengths, strict=True):
            draft.truncate(n)

    def forget(self):
        self.rates = AcceptanceRates()

    def on_reset(self, req):
        super().on_reset(req)
        self.rates.forget(req)


class SmartSpecRecyclingProposer(NgramRecyclingProposer):
    """`ngram-recycling`'s drafts cut per step to the goodput-optimal sizes (SmartSpec).

    Prompt lookup's chains are weighed as `smartspec` weighs them (measured acceptance rates).
    A recycled tree's nodes are weighed by their values: the product along the path of how often
    a candidate of each rank has been the target's next token (token_recycling.py), the tree's
    estimate of the chance that the node is kept. Measured, those run high where lookup finds
    nothing (nodes valued 0.4-0.55 were kept 21% of the time), so they are scaled by how many
    of the verified nodes' summed value the target actually kept, counted online. Both kinds of
    gains are non-increasing in drafting order, and a tree is grown parents first, so the
    batch's best gains are a prefix of each request's draft and a cut tree is still a tree. At
    batch 1 this drafts like `ngram-recycling`; as load rises, drafts fade out where their rows
    cost more than they bring."""

    name = "smartspec-recycling"
    paper = (
        "Optimizing Speculative Decoding for Serving Large Language Models Using Goodput (SmartSpec, "
        "Liu et al., 2024) over Prompt Lookup Decoding (Saxena, 2023) and Token Recycling (Luo et al., 2024)"
    )
    calibration_prior = 10.0  # pseudo-count of value kept at face value
    calibration_decay = 0.995  # per verified tree: recent trees count more

    def __init__(self, engine):
        super().__init__(engine)
        self._gains: dict[str, list[float]] = {}
        # request -> (its length when its tree was drafted, the tree as verified, node values)
        self._trees: dict[str, tuple[int, Draft, list[float]]] = {}

    def propose(self, requests, max_tokens):
        for req in requests:
            self.rates.update(req)
            self._score_tree(req)
        return super().propose(requests, max_tokens)

    def drafted(self, req, draft, values):
        if values is None:  # a lookup chain
            self.rates.drafted(req, draft.tokens)
            self._gains[req.request_id] = self.rates.gains(req, len(draft.tokens))
            return
        scale = self._kept / self._valued
        self._gains[req.request_id] = [v * scale for v in values]
        if draft.tokens:
            self._trees[req.request_id] = (req.num_tokens, draft, values)

    def _score_tree(self, req) -> None:
        """The request's last tree against the tokens it produced since: the nodes on the path
        they follow were kept (a point-mass tree keeps the longest path the target agrees with)."""
        found = self._trees.pop(req.request_id, None)
        if found is None:
            return
        start, draft, values = found
        produced = req.all_ids[start:]
        parents = draft.parents if draft.parents is not None else list(range(-1, len(draft.tokens) - 1))
        node, depth = -1, 0
        while depth < len(produced):
            step = [j for j, p in enumerate(parents) if p == node and draft.tokens[j] == produced[depth]]
            if not step:
                break
            node, depth = step[0], depth + 1
        d = self.calibration_decay
        self._valued = d * self._valued + sum(values[: len(draft.tokens)])
        self._kept = d * self._kept + depth

    def select(self, requests, drafts, base_rows, base_tokens):
        # a draft may have been cut already (to the step's scratch blocks): its first nodes remain
        gains = [
            self._gains.pop(r.request_id, [])[: len(d.tokens)] for r, d in zip(requests, drafts, strict=True)
        ]
        lengths = goodput_lengths(gains, base_tokens, base_rows, self.engine.step_cost.predict)
        for draft, n in zip(drafts, lengths, strict=True):
            draft.truncate(n)

    def forget(self):
        super().forget()
        self.rates = AcceptanceRates()
        self._valued = self._kept = self.calibration_prior

    def on_reset(self, req):
        super().on_reset(req)
        self.rates.forget(req)
        self._gains.pop(req.request_id, None)
        self._trees.pop(req.request_id, None)
