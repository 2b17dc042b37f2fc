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

from falconet.methods.speculative.budget import AcceptanceRates, goodput_lengths
from falconet.methods.speculative.ngram import NgramProposer


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
