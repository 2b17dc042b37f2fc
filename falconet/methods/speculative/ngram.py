"""N-gram (prompt lookup) drafting: the tokens that followed the last occurrence of the
sequence's most recent n-gram.

Saxena (2023), "Prompt Lookup Decoding", and vLLM's ngram proposer; the same idea as LLMA
(Yang et al., 2023, "Inference with Reference: Lossless Acceleration of Large Language Models").
Output often repeats spans of the prompt (summaries, retrieval answers, code edits) or of
itself: the continuation of an earlier match is a free guess. Deterministic drafts (q is a
point mass), no model call. Each request keeps an index of its n-grams, extended by the new
tokens of each step, so a lookup costs the same however long the text grows.

`ngram-tree` drafts every earlier match at once: the continuations of the most recent matches of
the longest n-grams first, merged into a token tree (shared prefixes once) under a node budget,
all verified in one forward. Where the text repeats a phrase with different continuations, one
of them is likely the right one; that is the retrieval side of Lookahead decoding (Fu et al.,
2024) and of REST (He et al., 2024), over the request's own tokens.
"""

from __future__ import annotations

from falconet.methods.speculative.base import Draft, Proposer


class NgramIndex:
    """Where each n-gram (min_n <= n <= max_n) of a growing token list occurred, by the position
    of the token that followed it. The list's last n-gram has no follower yet, so a lookup
    never finds the suffix itself."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.ids: list[int] = []
        self._followers: dict[tuple[int, ...], list[int]] = {}

    def update(self, ids: list[int]) -> None:
        """ids: the whole list, which only grows (earlier tokens never change)."""
        old = len(self.ids)
        self.ids.extend(ids[old:])
        for follower in range(max(old, 1), len(self.ids)):
            for n in range(self.min_n, min(self.max_n, follower) + 1):
                self._followers.setdefault(tuple(self.ids[follower - n : follower]), []).append(follower)

    def continuations(self, n: int, limit: int):
        """Positions after the up to `limit` latest earlier occurrences of the last n tokens."""
        if n > len(self.ids):
            return []
        found = self._followers.get(tuple(self.ids[len(self.ids) - n :]), [])
        return found[::-1][:limit]


def lookup(ids: list[int], k: int, max_n: int, min_n: int, index: NgramIndex | None = None) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ids' last n tokens, for the
    longest n in [min_n, max_n] that has one."""
    if index is None:
        index = NgramIndex(min_n, max_n)
    index.update(ids)
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        found = index.continuations(n, 1)
        if found:
            return list(ids[found[0] : found[0] + k])
    return []


def lookup_tree(
    ids: list[int],
    budget: int,
    depth: int,
    max_n: int,
    min_n: int,
    max_matches: int,
    index: NgramIndex | None = None,
) -> tuple[list[int], list[int]]:
    """A token tree (tokens, parents) of at most `budget` nodes: the continuations (up to `depth`
    tokens) of up to `max_matches` earlier matches of the last n tokens per n, longest n and
    most recent match first. The first continuation is the tree's first chain."""
    if index is None:
        index = NgramIndex(min_n, max_n)
    index.update(ids)
    tokens: list[int] = []
    parents: list[int] = []
    node_of: dict[tuple[int, int], int] = {}
    seen: set[int] = set()
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        for start in index.continuations(n, max_matches):
            if start in seen:  # the same place, found again by a shorter n-gram
                continue
            seen.add(start)
            node = -1
            for token in ids[start : start + depth]:
                key = (node, token)
                if key not in node_of:
                    if len(tokens) == budget:
                        return tokens, parents
                    node_of[key] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = node_of[key]
    return tokens, parents


class _Indexed(Proposer):
    """A proposer that keeps each request's n-gram index until the request leaves."""

    max_n, min_n = 4, 2

    def __init__(self, engine):
        super().__init__(engine)
        self._indexes: dict[str, NgramIndex] = {}

    def index(self, req) -> NgramIndex:
        index = self._indexes.get(req.request_id)
        if index is None:
            index = self._indexes[req.request_id] = NgramIndex(self.min_n, self.max_n)
        return index

    def on_reset(self, req) -> None:
        self._indexes.pop(req.request_id, None)


class NgramProposer(_Indexed):
    """Drafts what followed the last earlier match of the latest n-gram (Prompt Lookup Decoding)."""

    name = "ngram"
    paper = "Prompt Lookup Decoding (Saxena, 2023); LLMA (Yang et al., 2023)"
    default_num_tokens = 5

    def propose(self, requests, max_tokens):
        return [
            Draft(lookup(r.all_ids, k, self.max_n, self.min_n, self.index(r)))
            for r, k in zip(requests, max_tokens, strict=True)
        ]


class NgramTreeProposer(_Indexed):
    """Drafts the continuations of many earlier n-gram matches as one token tree."""

    name = "ngram-tree"
    paper = "Prompt Lookup Decoding (Saxena, 2023) as a token tree (SpecInfer, Miao et al., 2024)"
    default_num_tokens = 12  # tree nodes
    drafts_trees = True
    max_n, min_n, depth, max_matches = 4, 1, 6, 4

    def propose(self, requests, max_tokens):
        drafts = []
        for r, k in zip(requests, max_tokens, strict=True):
            tokens, parents = lookup_tree(
                r.all_ids, k, self.depth, self.max_n, self.min_n, self.max_matches, self.index(r)
            )
            drafts.append(Draft(tokens, parents=parents))
        return drafts
