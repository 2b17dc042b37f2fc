"""Ouroboros: phrase-level drafting, with the target's verification results feeding the phrases.

Zhao et al. (2024), "Ouroboros: Generating Longer Drafts Phrase by Phrase for Faster Speculative
Decoding". A draft model that drafts token by token pays one forward per draft token, so drafts
stay short. Ouroboros keeps a pool of candidate phrases and uses it three ways:
- phrase-level drafting: each draft forward also feeds the pool's phrase for the draft's last
  tokens, and keeps as much of it as the draft model itself agrees with, so one draft forward
  can add several tokens;
- longer drafts: the finished draft is extended by the pool's phrase for its end, unchecked
  (the target verifies it anyway);
- phrases from verification: the target scores every draft position, and past the first
  rejection its own predictions (computed, then discarded by plain speculative decoding) form a
  phrase that likely follows the token the target chose there. They go into the pool, keyed by
  that token, along with every prompt and answer.
The pool (a trie of continuations per context of 2-4 tokens, lookahead.py) is shared by all
requests and outlives them.

Here the draft model (`draft-model`) drafts with up to DRAFT_FORWARDS forwards per step. Drafts
are the draft model's argmax tokens and pool phrases, point masses for every request, so
verification is exact for sampled requests too.
"""

from __future__ import annotations

import torch

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.draft_model import DraftModelProposer
from falconet.methods.speculative.lookahead import TokenTrie
from falconet.models.kv_cache import Segment

DRAFT_FORWARDS = 2  # draft-model forwards per step; phrases make each add one token or more
PHRASE = 4  # tokens of a pool phrase fed to the draft model in one forward
EXTEND = True  # extend finished drafts by the pool's phrase


class OuroborosProposer(DraftModelProposer):
    """Draft-model drafts accelerated and extended by a phrase pool fed by verification (Ouroboros)."""

    name = "ouroboros"
    paper = (
        "Ouroboros: Generating Longer Drafts Phrase by Phrase for Faster Speculative Decoding "
        "(Zhao et al., 2024)"
    )
    default_num_tokens = 8
    uses_target_predictions = True

    def __init__(self, engine, draft=None):
        super().__init__(engine, draft)
        self.forget()

    def forget(self) -> None:
        self.pool = TokenTrie()
        self._recorded: dict[str, int] = {}  # request id -> tokens of it in the pool

    def propose(self, requests, max_tokens):
        for req in requests:  # the pool learns every prompt and answer as it goes
            done = self._recorded.get(req.request_id, 0)
            self._recorded[req.request_id] = max(done, req.num_tokens - self.pool.depth + 1)
            self.pool.add(req.all_ids, done)
        drafts = super().propose(requests, max_tokens)
        for req, draft, n in zip(requests, drafts, max_tokens, strict=True):  # longer drafts
            if EXTEND and len(draft.tokens) < n:
                draft.tokens += self.pool.best_path(req.all_ids + draft.tokens, n - len(draft.tokens))
        return drafts

    @torch.inference_mode()
    def _draft(self, requests, computed, max_tokens):
        """Phrase-level drafting: each forward feeds, per request, the tokens its cache lacks and
        the pool's phrase after them; the draft keeps its own argmax and the phrase's prefix
        that equals the draft model's own argmax tokens."""
        drafts = [Draft([]) for _ in requests]
        valid = list(computed)  # positions whose draft-cache entries match the text
        active = [i for i, n in enumerate(max_tokens) if n > 0]
        for _ in range(DRAFT_FORWARDS):
            if not active:
                break
            ids, positions, segments, rows, phrases = [], [], [], [], []
            for i in active:
                req, text = requests[i], requests[i].all_ids + drafts[i].tokens
                room = max_tokens[i] - len(drafts[i].tokens) - 1  # phrase tokens that could be kept
                phrase = self.pool.best_path(text, min(PHRASE, room)) if room > 0 else []
                feed = text[valid[i] :] + phrase
                first = len(ids) + len(feed) - len(phrase) - 1  # the row of the text's last token
                ids.extend(feed)
                positions.extend(range(valid[i], valid[i] + len(feed)))
                segments.append(Segment(req.block_table, valid[i], len(feed)))
                rows.append(first)
                phrases.append(phrase)
            self.cache.begin_step(segments)
            hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.cache)
            starts = torch.tensor(rows)
            width = max(len(p) for p in phrases) + 1
            picks = (starts[:, None] + torch.arange(width)).clamp_(max=len(ids) - 1)
            best = self._argmax(self.model.compute_logits(hidden[picks.flatten()])).view(len(active), width)
            for row, (i, phrase) in enumerate(zip(active, phrases, strict=True)):
                guesses = best[row].tolist()
                text_len = requests[i].num_tokens + len(drafts[i].tokens)
                new = [guesses[0]]
                while len(new) <= len(phrase) and phrase[len(new) - 1] == new[-1]:
                    new.append(guesses[len(new)])
                # the text and the phrase tokens equal to the new drafts have valid entries
                valid[i] = text_len + len(new) - 1
                drafts[i].tokens += new[: max_tokens[i] - len(drafts[i].tokens)]
            active = [i for i in active if len(drafts[i].tokens) < max_tokens[i]]
        return drafts

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        best = logits.argmax(dim=-1)
        vocab = getattr(self.model, "draft_vocab", None)  # a reduced head (falconet distill-draft)
        return best if vocab is None else vocab[best]

    def on_target_predictions(self, req, draft, accepted, predicted):
        """Past the first rejection, the target's own predictions likely continue the token it
        chose there: they join the pool as a phrase after that token."""
        if accepted < len(draft.tokens) and not draft.is_tree:
            virtual = req.all_ids + draft.tokens[:accepted] + predicted[accepted:]
            after = req.num_tokens + accepted + 1  # the phrase starts after the target's own token
            if after < len(virtual):
                self.pool.add(virtual, after, after + 1)

    def on_reset(self, req) -> None:
        super().on_reset(req)
        if req.finished:  # a finished answer's last continuations join the pool too
            done = self._recorded.pop(req.request_id, 0)
            self.pool.add(req.all_ids, done, len(req.all_ids))
