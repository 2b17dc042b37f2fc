"""Speculative decoding inside the engine step: lookahead, proposals, verification, metrics.

The engine asks the Speculator three things per step (see methods/speculative/base.py):
before scheduling, how many lookahead slots each speculative request wants; after scheduling,
the drafts for the slots it was granted; after the forward, which drafts the target keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from falconet.errors import FalconetError
from falconet.methods.registry import SPECULATIVE_METHODS
from falconet.methods.speculative.base import Draft, Proposer, ProposerError


@dataclass
class SpecStats:
    """Acceptance counts of one request, or of the whole engine."""

    num_steps: int = 0  # target forwards that verified drafts
    num_drafted: int = 0
    num_accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)  # index j: drafts at position j
    accepted_by_position: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, depth: int | None = None) -> None:
        """depth: a token tree's depth (its drafted positions); a chain's is its length."""
        self.num_steps += 1
        self.num_drafted += drafted
        self.num_accepted += accepted
        positions = drafted if depth is None else depth
        for counts, n in ((self.drafted_by_position, positions), (self.accepted_by_position, accepted)):
            counts.extend([0] * (n - len(counts)))
            for j in range(n):
                counts[j] += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verifying target forward: accepted drafts plus the target's own."""
        return (self.num_accepted + self.num_steps) / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    def as_dict(self) -> dict:
        by_position = [
            a / d if d else 0.0
            for a, d in zip(self.accepted_by_position, self.drafted_by_position, strict=False)
        ]
        return {
            "num_steps": self.num_steps,
            "num_drafted_tokens": self.num_drafted,
            "num_accepted_tokens": self.num_accepted,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_rate_by_position": [round(r, 4) for r in by_position],
        }


def metrics_of(req) -> dict | None:
    """A speculative request's metrics as the API returns them (None for other requests)."""
    if req.params.speculative is None:
        return None
    stats = req.spec_stats.as_dict() if req.spec_stats is not None else {}
    return {"method": req.params.speculative, **stats}


class Speculator:
    def __init__(self, engine):
        self.engine = engine
        self._proposers: dict[str, Proposer] = {}
        self.stats = SpecStats()

    def proposer(self, name: str) -> Proposer:
        """The engine's instance of a method, made on first use (a draft model loads then)."""
        if name not in self._proposers:
            cls = SPECULATIVE_METHODS.lookup(name)
            try:
                self._proposers[name] = cls(self.engine)
            except ProposerError as e:
                raise FalconetError(str(e)) from None
        return self._proposers[name]

    def num_drafts(self, req) -> int:
        p = req.params
        k = p.num_speculative_tokens
        return self.proposer(p.speculative).default_num_tokens if k is None else k

    def set_lookahead(self, requests) -> None:
        """Lookahead slots for the next step: drafts beyond max_tokens or the context are waste."""
        limit = self.engine.max_model_len
        for req in requests:
            if req.params.speculative is None:
                continue
            room = limit - req.num_tokens
            if not self.proposer(req.params.speculative).drafts_trees:  # a tree's depth is less
                room = min(room, req.params.max_tokens - len(req.output_ids) - 1)
            wanted = self.proposer(req.params.speculative).lookahead(self.num_drafts(req))
            req.num_lookahead = max(0, min(wanted, room))

    def propose(self, batch) -> dict[int, Draft]:
        """Drafts for the batch's decoding speculative requests (index in the batch -> Draft),
        at most the slots granted; each request's grant shrinks to what was drafted."""
        groups: dict[str, list[int]] = {}
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            if req.params.speculative is not None and n > 1 and req.num_tokens - req.num_computed == 1:
                groups.setdefault(req.params.speculative, []).append(i)
        drafts: dict[int, Draft] = {}
        scratch = self.engine.kv_cache.num_scratch_blocks
        for name, rows in groups.items():
            reqs = [batch.requests[i] for i in rows]
            budgets = [batch.num_tokens[i] - 1 for i in rows]
            if self.proposer(name).samples_trees:  # sampled trees are never trimmed to fit later
                share = scratch // max(1, sum(not r.params.greedy for r in reqs))
                budgets = [
                    k if r.params.greedy else min(k, self._tree_cap(r, share))
                    for k, r in zip(budgets, reqs, strict=True)
                ]
            made = self.proposer(name).propose(reqs, budgets)
            for i, draft in zip(rows, made, strict=True):
                draft.truncate(batch.num_tokens[i] - 1)
                scratch -= self._fit_tree(batch.requests[i], draft, scratch)
                batch.num_tokens[i] = 1 + len(draft.tokens) + draft.num_extra
                drafts[i] = draft
        sampling = sum(
            r.num_computed + n >= r.num_tokens for r, n in zip(batch.requests, batch.num_tokens, strict=True)
        )
        for name, rows in groups.items():  # load-aware methods cut drafts knowing the whole step
            group = [drafts[i] for i in rows]
            base_rows = sum(batch.num_tokens) - sum(len(d.tokens) for d in group)
            self.proposer(name).select([batch.requests[i] for i in rows], group, base_rows, sampling)
            for i, draft in zip(rows, group, strict=True):
                batch.num_tokens[i] = 1 + len(draft.tokens) + draft.num_extra
        for name, rows in groups.items():
            self.proposer(name).launch([batch.requests[i] for i in rows], [drafts[i] for i in rows])
        return {i: d for i, d in drafts.items() if d.tokens or d.num_extra}

    def _tree_cap(self, req, share: int) -> int:
        """The most nodes `req`'s tree may have so that, whatever its shape, its side branches fit
        in `share` scratch blocks. Fixed before drafting: a sampled tree is never cut afterwards."""
        bs, start = self.engine.kv_cache.block_size, req.num_computed

        def worst(n: int) -> int:  # every node but one starts a branch as deep as the tree
            return (n - 1) * ((start + n) // bs - (start + 1) // bs + 1)

        n = 1
        while n < 64 and worst(n + 1) <= share:
            n += 1
        return n

    def _fit_tree(self, req, draft: Draft, scratch: int) -> int:
        """Trim a token tree to the scratch blocks left this step (extra rows go first); returns
        the blocks it takes."""
        need = self.engine.kv_cache.scratch_blocks_needed
        if draft.num_extra and need(req.num_computed, draft.segment_parents()) > scratch:
            draft.drop_extra()
        while draft.is_tree and need(req.num_computed, draft.parents) > scratch:
            draft.truncate(len(draft.tokens) - 1)
        parents = draft.segment_parents()
        return need(req.num_computed, parents) if parents is not None else 0

    def usable_prefix(self, req, blocks: list[int]) -> int:
        """How many of a request's prefix-cache hits it may use: all, unless its proposer keeps
        per-block state of its own (an EAGLE head's cache entries) that some blocks lack."""
        if req.params.speculative is not None:
            proposer = self.proposer(req.params.speculative)
            if proposer.uses_hidden_states:
                return proposer.usable_prefix(blocks)
        return len(blocks)

    def observe(self, req, start: int, hidden) -> None:
        """An engine hidden-state tap: feature-level proposers see their requests' rows."""
        if req.params.speculative is not None:
            proposer = self.proposer(req.params.speculative)
            if proposer.uses_hidden_states:
                proposer.observe(req, start, hidden)

    def verified(
        self, req, draft: Draft, accepted: int, logits=None, end: int = -1, extra_logits=None
    ) -> None:
        """logits: the target's rows for the request's last known token and each draft; end: the
        last kept draft; extra_logits: the rows of the draft's extra rows."""
        proposer = self.proposer(req.params.speculative)
        if extra_logits is not None:
            proposer.on_extra_rows(req, draft, end, extra_logits)
        if proposer.uses_target_logits and logits is not None:
            proposer.on_target_logits(req, draft, logits)
        if proposer.uses_target_predictions and logits is not None:
            proposer.on_target_predictions(req, draft, accepted, logits.argmax(dim=-1).tolist())
        if req.spec_stats is None:
            req.spec_stats = SpecStats()
        depth = max(len(draft.path(j)) for j in range(len(draft.tokens))) if draft.is_tree else None
        req.spec_stats.record(len(draft.tokens), accepted, depth)
        self.stats.record(len(draft.tokens), accepted, depth)
        proposer.on_verified(req)

    def sampled(self, req, logits) -> None:
        """A speculative request sampled its next token without drafts (logits [1, V], its last
        known token's row): proposers that keep the target's candidates see the row too."""
        if req.params.speculative is not None:
            proposer = self.proposer(req.params.speculative)
            if proposer.uses_target_logits:
                proposer.on_target_logits(req, None, logits)

    def forget(self) -> None:
        """Every method forgets what it learnt from earlier requests (Proposer.forget)."""
        for proposer in self._proposers.values():
            proposer.forget()

    def release(self, req) -> None:
        if req.params.speculative is not None and req.params.speculative in self._proposers:
            self._proposers[req.params.speculative].on_reset(req)
