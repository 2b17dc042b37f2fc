"""Lookahead: multi-branch drafts retrieved from a trie of everything seen, no draft model.

Zhao et al. (2024), "Lookahead: An Inference Acceleration Framework for Large Language Model
with Lossless Generation Accuracy". The tokens of every prompt and of every generated answer go
into one pool, kept as a trie per context: for each n-gram (n = 2..4) the continuations that
followed it (up to DEPTH tokens), each node counting how often its path occurred. To draft, the
request's last n tokens (longest n first) select a trie, and its most frequent paths, taken
best-first by count, form a token tree under the node budget; all branches are verified in one
forward and the longest one the model agrees with is kept. The pool is shared by all requests
and outlives them, so an answer that repeats what an earlier request's prompt or answer said
(retrieved documents, boilerplate, a recurring phrase) is drafted whole; a new answer feeds the
pool as it is generated. Deterministic drafts (point masses): exact.
"""

from __future__ import annotations

import heapq

from falconet.methods.speculative.base import Draft, Proposer, merge_trees

DEPTH = 6  # tokens of continuation kept per context
MAX_CONTEXTS = 200_000  # the pool forgets its oldest contexts beyond this


class _Node:
    __slots__ = ("children", "count", "last")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0
        self.last = 0  # when its path was last seen


class TokenTrie:
    """For each context of min_n..max_n tokens, a trie of the continuations that followed it."""

    def __init__(self, min_n: int = 2, max_n: int = 4, depth: int = DEPTH, max_contexts: int = MAX_CONTEXTS):
        self.min_n, self.max_n, self.depth, self.max_contexts = min_n, max_n, depth, max_contexts
        self._roots: dict[tuple[int, ...], _Node] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self._roots)

    def add(self, ids: list[int], start: int, end: int | None = None) -> None:
        """Record the continuations that start at positions [start, end) of ids (default: those
        whose `depth` tokens are all known; at a sequence's end, pass end=len(ids))."""
        end = len(ids) - self.depth + 1 if end is None else end
        for j in range(max(start, 1), end):
            self._clock += 1
            path = ids[j : j + self.depth]
            for n in range(self.min_n, min(self.max_n, j) + 1):
                node = self._root(tuple(ids[j - n : j]))
                for token in path:
                    child = node.children.get(token)
                    if child is None:
                        child = node.children[token] = _Node()
                    child.count += 1
                    child.last = self._clock
                    node = child
        while len(self._roots) > self.max_contexts:
            del self._roots[next(iter(self._roots))]

    def _root(self, key: tuple[int, ...]) -> _Node:
        node = self._roots.get(key)
        if node is None:
            node = self._roots[key] = _Node()
        return node

    def branches(self, key: tuple[int, ...], budget: int) -> tuple[list[int], list[int]]:
        """The most frequent continuations of `key` as a token tree (tokens, parents) of at most
        `budget` nodes, taken best-first by count (a child never before its parent)."""
        root = self._roots.get(key)
        tokens: list[int] = []
        parents: list[int] = []
        if root is None:
            return tokens, parents
        # Most frequent first; among equals the deeper (a branch is followed to its end), then
        # the most recently seen.
        heap = [(-child.count, 0, -child.last, token, child, -1) for token, child in root.children.items()]
        heapq.heapify(heap)
        while heap and len(tokens) < budget:
            _, depth, _, token, node, parent = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            here = len(tokens) - 1
            for t, child in node.children.items():
                heapq.heappush(heap, (-child.count, depth - 1, -child.last, t, child, here))
        return tokens, parents

    def best_path(self, ids: list[int], limit: int) -> list[int]:
        """The most frequent continuation (a chain of up to `limit` tokens) of the longest
        context of `ids`' last tokens that the pool knows."""
        for n in range(min(self.max_n, len(ids)), self.min_n - 1, -1):
            node = self._roots.get(tuple(ids[-n:]))
            if node is not None and node.children:
                path = []
                while node.children and len(path) < limit:
                    token, node = max(node.children.items(), key=lambda kv: (kv[1].count, kv[1].last))
                    path.append(token)
                return path
        return []


class LookaheadProposer(Proposer):
    """Drafts the most frequent continuations in a trie of all prompts and answers (Lookahead)."""

    name = "lookahead"
    paper = (
        "Lookahead: An Inference Acceleration Framework for Large Language Model with Lossless "
        "Generation Accuracy (Zhao et al., 2024)"
    )
    default_num_tokens = 6  # tree nodes (6: 1.35x greedy on bench spec; 10: 1.30x; 14: 1.30x)
    drafts_trees = True

    def __init__(self, engine):
        super().__init__(engine)
        self.trie = TokenTrie()
        self._recorded: dict[str, int] = {}  # request id -> tokens of it in the pool

    def propose(self, requests, max_tokens):
        drafts = []
        for req, budget in zip(requests, max_tokens, strict=True):
            ids = req.all_ids
            done = self._recorded.get(req.request_id, 0)
            self._recorded[req.request_id] = max(done, len(ids) - self.trie.depth + 1)
            self.trie.add(ids, done)
            tokens: list[int] = []
            parents: list[int] = []
            for n in range(min(self.trie.max_n, len(ids)), self.trie.min_n - 1, -1):
                if len(tokens) >= budget:
                    break
                more, more_parents = self.trie.branches(tuple(ids[-n:]), budget)
                tokens, parents = merge_trees(tokens, parents, more, more_parents, budget)
            drafts.append(Draft(tokens, parents=parents))
        return drafts

    def forget(self) -> None:
        self.trie = TokenTrie(self.trie.min_n, self.trie.max_n, self.trie.depth, self.trie.max_contexts)
        self._recorded = {}

    def on_reset(self, req) -> None:
        # A finished answer's last continuations join the pool too. A preempted request keeps
        # its place: what it gave the pool stays there.
        if req.finished:
            done = self._recorded.pop(req.request_id, 0)
            self.trie.add(req.all_ids, done, len(req.all_ids))
