"""N-gram (prompt lookup) drafting: the tokens that followed the last occurrence of the
sequence's most recent n-gram.

Saxena (2023), "Prompt Lookup Decoding", and vLLM's ngram proposer; the same idea as LLMA
(Yang et al., 2023, "Inference with Reference: Lossless Acceleration of Large Language Models").
Output often repeats spans of the prompt (summaries, retrieval answers, code edits) or of
itself: the continuation of an earlier match is a free guess. Deterministic drafts (q is a
point mass), no model call, no state.
"""

from __future__ import annotations

import numpy as np

from falconet.methods.speculative.base import Draft, Proposer


def lookup(ids: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of ids' last n tokens, for the
    longest n in [min_n, max_n] that has one."""
    arr = np.asarray(ids, dtype=np.int64)
    length = len(arr)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # candidate starts s < length - n (not the suffix itself), with a token after the match
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


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
