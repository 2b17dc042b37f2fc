"""Self-speculation by layer skipping: the target's first layers, its final norm and LM head
draft for the whole model.

The idea behind SkipDecode (Del Corro et al., 2023, "SkipDecode: Autoregressive Skip Decoding
with Batching and Caching for Efficient LLM Inference") and LayerSkip's self-speculative
decoding (Elhoushi et al., 2024): an early exit of the target is a draft model that costs no
extra weights, and its KV entries are the target's own for those layers (the same computation
on the same tokens), so drafting only extends the cache the target then verifies.
Without training for early exit (LayerSkip's recipe), a shallow exit of an off-the-shelf model
agrees with the full model less often: the acceptance rate says how much.
"""

from __future__ import annotations

from falconet.methods.speculative.base import Proposer
from falconet.methods.speculative.drafting import draft_autoregressively


class LayerSkipProposer(Proposer):
    """Drafts with the target's first layers, final norm and head (SkipDecode, LayerSkip)."""

    name = "layer-skip"
    paper = "SkipDecode (Del Corro et al., 2023); LayerSkip (Elhoushi et al., 2024)"
    default_num_tokens = 4
    fraction = 0.5  # of the target's layers used to draft

    def __init__(self, engine):
        super().__init__(engine)
        self.num_layers = max(1, round(engine.model.config.num_layers * self.fraction))

    def propose(self, requests, max_tokens):
        # The target's cache already holds these layers for every computed position: drafting
        # starts from the last known token.
        computed = [r.num_tokens - 1 for r in requests]
        model, cache = self.engine.model, self.engine.kv_cache
        return draft_autoregressively(model, cache, requests, computed, max_tokens, self.num_layers)
