"""Token Recycling: the target's own discarded candidates, kept per token, drafted as a tree.

Luo et al. (2024), "Turning Trash into Treasure: Accelerating Inference of Large Language Models
with Token Recycling". Every row the target computes ends in a distribution over the next token,
of which decoding keeps one and verification at most one; the runners-up are thrown away, yet
after the same token the model tends to continue the same few ways again. Token Recycling keeps,
for each token t, the top-k tokens of the latest row whose input was t (an adjacency matrix,
k x vocabulary ids: under 2 MB), updated after every step from all of the step's rows, rejected
draft nodes included. To draft, it grows a tree from the request's last token through the
matrix: the candidates of the last token, their candidates, and so on, verified in one forward.
No draft model, no training; the matrix is shared by all requests and outlives them.

Where this differs from the paper, and why (measured in docs/benchmarks.md):
- The paper walks a fixed tree shape breadth-first (about 80 nodes, for GPUs where extra rows
  are nearly free). A row costs about 2% of a step here, so the tree is grown best-first under
  the step's node budget (6): a node's value is the product, along its path, of how often a
  candidate of its rank has turned out to be the target's next token (counted online, each time
  a context's candidates are replaced by fresh ones), as DySpec grows trees by draft probability.
- Candidates are also kept per context of 2 and 3 tokens ending in the token, and the longest
  known context is used, for the root and for every node along its own path: after the same two
  tokens the model's next token is far more predictable than after one (1.64 -> 1.77 tokens per
  verifying forward on its own, with pairs; contexts of 3 or 4 tokens measured alike, 3 kept).
- A request's prompt seeds the contexts the target has not scored yet with the token that
  followed them in the prompt (the target computes logits for a prompt's last row only): without
  it, a fresh request finds its first tokens unknown (1.77 -> 2.03 tokens per verifying forward).
Drafts are point masses: exact at any temperature.

`ngram-recycling` drafts the n-gram (prompt lookup) chain where the request's text repeats itself
and the recycled tree elsewhere: lookup finds long copied spans that the matrix, one context at a
time, finds only piece by piece, and the matrix drafts on the many steps where lookup finds
nothing.
"""

from __future__ import annotations

import heapq

import torch

from falconet.kernels import top_k_indices
from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.ngram import _Indexed, lookup

TOP_K = 8  # candidates kept per token
MAX_DEPTH = 6  # a tree's deepest node
# Prior rank hit rates (pseudo-counts): how often the default model's next token was its
# previous candidate of each rank, measured on our Spec-Bench prompts; online counts take over.
PRIOR = (0.36, 0.08, 0.05, 0.036, 0.025, 0.019, 0.015, 0.012)
PRIOR_WEIGHT = 50
MAX_ORDER = 3  # longest context (in tokens) that candidates are kept for
MAX_CONTEXTS = 50_000  # contexts of each length > 1 kept, the oldest dropped first (~27 MB each)


class CandidateMatrix:
    """For each token, the top-k next tokens of the last target row it was the input of (the
    paper's adjacency matrix); with max_order n > 1, also for each context of 2..n tokens ending
    in it, preferred where known (longest first). And how often a candidate of each rank proved
    to be the next row's argmax, per context length."""

    def __init__(self, top_k: int = TOP_K, max_order: int = MAX_ORDER, max_contexts: int = MAX_CONTEXTS):
        self.top_k, self.max_order, self.max_contexts = top_k, max_order, max_contexts
        # tables[n - 1]: context of n tokens -> candidates
        self.tables: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(max_order)]
        prior = [p * PRIOR_WEIGHT for p in PRIOR[:top_k]] + [0.0] * max(0, top_k - len(PRIOR))
        # per context length: [hits by rank, trials]
        self.tally = [[list(prior), float(PRIOR_WEIGHT)] for _ in range(max_order)]

    def update(self, contexts: list[tuple[int, ...]], logits: torch.Tensor) -> None:
        """Rows of the target: contexts[j] ends with row j's input token (up to max_order
        tokens), logits[j] are its next-token scores."""
        top = top_k_indices(logits, min(self.top_k, logits.shape[-1])).tolist()
        for context, candidates in zip(contexts, top, strict=True):
            if candidates[-1] < 0:  # a row with NaN scores has fewer candidates than k
                candidates = [t for t in candidates if t >= 0]
            for n in range(1, min(self.max_order, len(context)) + 1):
                table, key = self.tables[n - 1], context[-n:]
                old = table.pop(key, None)  # re-inserted last: the newest
                if old is not None:  # score the stale candidates against the fresh argmax
                    self.tally[n - 1][1] += 1
                    if candidates[0] in old:
                        self.tally[n - 1][0][old.index(candidates[0])] += 1
                table[key] = candidates
                if n > 1 and len(table) > self.max_contexts:
                    del table[next(iter(table))]

    def seed(self, ids: list[int]) -> None:
        """Text the target has not scored (a prompt): where the target has given no candidates
        after a context yet, the token that followed it there is its only one."""
        for j in range(len(ids) - 1):
            for n in range(1, min(self.max_order, j + 1) + 1):
                self.tables[n - 1].setdefault(tuple(ids[j - n + 1 : j + 1]), [ids[j + 1]])

    def candidates(self, context: tuple[int, ...]) -> tuple[list[int], list[float]]:
        """The candidates after `context` (its longest known ending) and each rank's hit rate."""
        for n in range(min(self.max_order, len(context)), 0, -1):
            found = self.tables[n - 1].get(context[-n:])
            if found is not None:
                hits, trials = self.tally[n - 1]
                return found, [h / trials for h in hits]
        return [], []

    def tree(
        self,
        context: tuple[int, ...],
        budget: int,
        max_depth: int = MAX_DEPTH,
        values: list[float] | None = None,
    ):
        """Up to `budget` nodes (tokens, parents; -1: under the context's last token) grown
        best-first by the product of their ranks' hit rates along the path: each node's estimate
        of the chance that it is kept, appended to `values` if given (non-increasing: a child's
        value is at most its parent's)."""
        tokens: list[int] = []
        parents: list[int] = []
        contexts: list[tuple[int, ...]] = []
        heap: list[tuple[float, int, int, int]] = []  # (-value, tie, parent node, token)

        def offer(node: int, ctx: tuple[int, ...], value: float) -> None:
            found, rates = self.candidates(ctx)
            for rank, candidate in enumerate(found):
                heapq.heappush(heap, (-value * rates[rank], len(heap), node, candidate))

        offer(-1, context, 1.0)
        while heap and len(tokens) < budget:
            value, _, parent, token = heapq.heappop(heap)
            ctx = (context if parent < 0 else contexts[parent]) + (token,)
            tokens.append(token)
            parents.append(parent)
            contexts.append(ctx[-self.max_order :])
            if values is not None:
                values.append(-value)
            if len(self._path(parents, len(tokens) - 1)) < max_depth:
                offer(len(tokens) - 1, contexts[-1], -value)
        return tokens, parents

    @staticmethod
    def _path(parents: list[int], node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = parents[node]
        return out


class TokenRecyclingProposer(_Indexed):
    """Drafts a token tree from the target's recycled candidates (Token Recycling)."""

    name = "token-recycling"
    paper = (
        "Turning Trash into Treasure: Accelerating Inference of Large Language Models with "
        "Token Recycling (Luo et al., 2024)"
    )
    default_num_tokens = 6  # tree nodes: 7 rows cost ~1.13x one; past 8 rows the linears' cost jumps
    drafts_trees = True
    uses_target_logits = True
    use_ngram = False  # ngram-recycling: prompt lookup's chain first
    ngram_length = 5  # its chain's longest, as `ngram`'s default
    max_order = MAX_ORDER

    def __init__(self, engine):
        super().__init__(engine)
        self.forget()

    def forget(self) -> None:
        self.matrix = CandidateMatrix(max_order=self.max_order)
        self._seeded: set[str] = set()

    def on_target_logits(self, request, draft, logits):
        n = self.max_order
        root = tuple(request.all_ids[-n:])
        contexts = [root]
        if draft is not None:
            for j, token in enumerate(draft.tokens):
                parent = draft.parents[j] if draft.parents is not None else j - 1
                contexts.append(((root if parent < 0 else contexts[parent + 1]) + (token,))[-n:])
        self.matrix.update(contexts, logits)

    def propose(self, requests, max_tokens):
        drafts = []
        for req, k in zip(requests, max_tokens, strict=True):
            if req.request_id not in self._seeded:
                self._seeded.add(req.request_id)
                self.matrix.seed(req.prompt_ids)
            ids = req.all_ids
            if self.use_ngram:
                chain = lookup(ids, min(k, self.ngram_length), self.max_n, self.min_n, self.index(req))
                if chain:  # (recycled nodes beside the chain gained nothing measurable)
                    drafts.append(Draft(chain))
                    self.drafted(req, drafts[-1], None)
                    continue
            values: list[float] = []
            tokens, parents = self.matrix.tree(tuple(ids[-self.max_order :]), k, values=values)
            drafts.append(Draft(tokens, parents=parents))
            self.drafted(req, drafts[-1], values)
        return drafts

    def drafted(self, req, draft: Draft, values: list[float] | None) -> None:
        """Hook (smartspec-recycling): `draft` was made for `req`; values: a recycled tree's
        estimated chance, per node, that it is kept; None for prompt lookup's chain."""

    def on_reset(self, req) -> None:
        super().on_reset(req)
        self._seeded.discard(req.request_id)


class NgramRecyclingProposer(TokenRecyclingProposer):
    """Prompt lookup's chain where the text repeats, Token Recycling's tree elsewhere."""

    name = "ngram-recycling"
    paper = (
        "Prompt Lookup Decoding (Saxena, 2023) with Token Recycling (Luo et al., 2024) where "
        "lookup finds nothing"
    )
    use_ngram = True
