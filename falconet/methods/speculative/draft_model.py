"""A separate, smaller draft model that shares the target's tokenizer.

The original setting of speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a
small model of the same family drafts k tokens autoregressively and the target verifies them.
The draft keeps its own KV cache, laid out like the target's and indexed by the same block
tables (the engine's block manager allocates for both), so it needs no allocator of its own;
per request it remembers how many positions of that cache are valid, and catches up from there
(the whole prompt the first time) before each proposal.
"""

from __future__ import annotations

from falconet.methods.speculative.artifacts import find_artifact
from falconet.methods.speculative.base import Proposer, ProposerError
from falconet.methods.speculative.drafting import draft_autoregressively
from falconet.models.kv_cache import PagedKVCache


class DraftModelProposer(Proposer):
    """Drafts with a separate smaller model sharing the tokenizer (Leviathan et al., 2023)."""

    name = "draft-model"
    paper = "Speculative decoding (Leviathan et al., 2023; Chen et al., 2023)"
    default_num_tokens = 4

    def __init__(self, engine, draft=None):
        super().__init__(engine)
        draft = draft if draft is not None else engine.config.draft_model
        if draft is None:
            from falconet.train.distill_draft import MARKER, default_draft_path

            found = default_draft_path(engine.model_path)
            draft = find_artifact(
                None, found, MARKER,
                f"speculative method {self.name!r} needs a draft model: pass draft_model= to LLM "
                "(--draft-model on the command line), a model that shares the target's tokenizer, "
                f"or run `falconet distill-draft` to train one (it is then found at {found})",
            )  # fmt: skip
        if isinstance(draft, str) or hasattr(draft, "__fspath__"):
            from falconet.models.loader import load_model
            from falconet.train.distill_draft import is_distilled_draft, load_draft

            dtype = engine.model.embed_tokens.weight.dtype
            if is_distilled_draft(draft):  # made by `falconet distill-draft` for this target
                draft = load_draft(draft, engine.model, dtype)
            else:
                draft = load_model(draft, dtype=dtype, with_tokenizer=False).model
        self.model = draft
        target, mine = engine.model.config, draft.config
        if mine.vocab_size != target.vocab_size:
            raise ProposerError(
                f"the draft model's vocabulary ({mine.vocab_size}) differs from the target's "
                f"({target.vocab_size}): they must share a tokenizer"
            )
        blocks, block_size = engine.kv_cache.num_blocks, engine.kv_cache.block_size
        dtype = draft.embed_tokens.weight.dtype
        self.cache = PagedKVCache(mine, blocks, block_size, dtype)
        self._valid: dict[str, tuple[int, int]] = {}  # request id -> (preemptions, valid positions)

    def _computed(self, req) -> int:
        epoch, valid = self._valid.get(req.request_id, (req.num_preemptions, 0))
        return valid if epoch == req.num_preemptions else 0  # preempted: its blocks are new

    def propose(self, requests, max_tokens):
        computed = [self._computed(r) for r in requests]
        drafts = self._draft(requests, computed, max_tokens)
        for req, draft in zip(requests, drafts, strict=True):
            # It fed the known tokens and every draft but the last.
            fed = req.num_tokens + max(len(draft.tokens) - 1, 0)
            self._valid[req.request_id] = (req.num_preemptions, fed)
        return drafts

    def _draft(self, requests, computed: list[int], max_tokens: list[int]):
        return draft_autoregressively(self.model, self.cache, requests, computed, max_tokens)

    def on_verified(self, req) -> None:
        epoch, fed = self._valid.get(req.request_id, (req.num_preemptions, 0))
        # Positions past the target's accepted prefix hold rejected drafts.
        self._valid[req.request_id] = (epoch, min(fed, req.num_computed))

    def on_reset(self, req) -> None:
        self._valid.pop(req.request_id, None)
