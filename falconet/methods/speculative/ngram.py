"""N-gram (prompt lookup) drafting: the tokens that followed the last occurrence of the
sequence's most recent n-gram.

Saxena (2023), "Prompt Lookup Decoding", and vLLM's ngram proposer; the same idea as LLMA
(Yang et al., 2023, "Inference with Reference: Lossless Acceleration of Large Language Models").
Output often repeats spans of the prompt (summaries, retrieval answers, code edits) or of
itself: the continuation of an earlier match is a free guess. Deterministic drafts (q is a
point mass), no model call, no state.

`ngram-tree` drafts every earlier match at once: the continuations of the most recent matches of
the longest n-grams first, merged into a token tree (shared prefixes once) under a node budget,
all verified in one forward. Where the text repeats a phrase with different continuations, one
of them is likely the right one; that is the retrieval side of Lookahead decoding (Fu et al.,
2024) and of REST (He et al., 2024), over the request's own tokens.
"""

from __future__ import annotations

import numpy as np

from falconet.methods.speculative.base import Draft, Proposer


def _matches(arr: np.ndarray, n: int) -> np.ndarray:
    """Starts of the earlier occurrences of arr's last n tokens, most recent first."""
    windows = np.lib.stride_tricks.sliding_window_view(arr[: len(arr) - 1], n)
    return np.flatnonzero((windows == arr[len(arr) - n :]).all(axis=1))[::-1]


def lookup(ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ids' last n tokens, for the
    longest n in [min_n, max_n] that has one."""
    arr = np.asarray(ids, dtype=np.int64)
    length = len(arr)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # candidate starts s < length - n (not the suffix itself), with a token after the match
        hits = _matches(arr, n)
        if hits.size:
            start = int(hits[0]) + n
            return arr[start : start + k].tolist()
    return []


def lookup_tree(
    ids: list[int], budget: int, depth: int, max_n: int, min_n: int, max_matches: int
) -> tuple[list[int], list[int]]:
    """A token tree (tokens, parents) of at most `budget` nodes: the continuations (up to `depth`
    tokens) of up to `max_matches` earlier matches of the last n tokens per n, longest n and
    most recent match first. The first continuation is the tree's first chain."""
    arr = np.asarray(ids, dtype=np.int64)
    tokens: list[int] = []
    parents: list[int] = []
    node_of: dict[tuple[int, int], int] = {}
    seen: set[int] = set()
    for n in range(min(max_n, len(arr) - 1), min_n - 1, -1):
        for hit in _matches(arr, n)[:max_matches].tolist():
            start = hit + n
            if start in seen:  # the same place, found again by a shorter n-gram
                continue
            seen.add(start)
            node = -1
            for token in arr[start : start + depth].tolist():
                key = (node, token)
                if key not in node_of:
                    if len(tokens) == budget:
                        return tokens, parents
                    node_of[key] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = node_of[key]
    return tokens, parents


class NgramProposer(Proposer):
    """Drafts what followed the last earlier match of the latest n-gram (Prompt Lookup Decoding)."""

    name = "ngram"
    paper = "Prompt Lookup Decoding (Saxena, 2023); LLMA (Yang et al., 2023)"
    default_num_tokens = 5
    max_n, min_n = 4, 2

    def propose(self, requests, max_tokens):
        return [
            Draft(lookup(r.all_ids, k, self.max_n, self.min_n))
            for r, k in zip(requests, max_tokens, strict=True)
        ]


class NgramTreeProposer(Proposer):
    """Drafts the continuations of many earlier n-gram matches as one token tree."""

    name = "ngram-tree"
    paper = "Prompt Lookup Decoding (Saxena, 2023) as a token tree (SpecInfer, Miao et al., 2024)"
    default_num_tokens = 12  # tree nodes
    drafts_trees = True
    max_n, min_n, depth, max_matches = 4, 1, 6, 4

    def propose(self, requests, max_tokens):
        drafts = []
        for r, k in zip(requests, max_tokens, strict=True):
            tokens, parents = lookup_tree(r.all_ids, k, self.depth, self.max_n, self.min_n, self.max_matches)
            drafts.append(Draft(tokens, parents=parents))
        return drafts
