"""Growing a draft token tree with the EAGLE head: the drafting side of SpecTr, RSD and DySpec.

The head drafts one tree level (or one batch of nodes) per forward: a node's row is the pair
(the head's predicted feature at its parent, the node's token) at the parent's position + 1,
and its output gives the drafter's distribution over the node's children. Each row must see the
real prefix and its own ancestors only, so, as for the target (models/tree_attention.py), every
branch of the tree gets a block table of its own in the head's cache: the first child expanded
under a node writes into its parent's table, every later one into scratch blocks that start as
a copy of its parent's (the scratch lies beyond the block manager's blocks and is reused every
step).

Subclasses decide the shape (`grow`): which nodes to expand and how many children to draw at
each. Greedy requests get deterministic trees (a node's best tokens by the head's probability);
sampled requests get sampled trees (base.Draft: children drawn from the head's q, shaped like the
request's own sampling), verified exactly by multi_draft.py. A sampled tree's shape may depend
only on what was drawn before (never on a draw's own value), or verification would be biased.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from falconet.engine.sampler import warp_logits
from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.eagle import EagleProposer
from falconet.methods.speculative.multi_draft import sample
from falconet.models.kv_cache import PagedKVCache, Segment

# Head cache blocks for side branches, shared by all requests of a step (each new branch takes
# at most 2 while a tree is no deeper than a block).
HEAD_SCRATCH_BLOCKS = 512


@dataclass
class DraftTree:
    """One request's tree while it grows. Node -1 is the root (the last known token)."""

    req: object
    budget: int  # nodes at most
    sampled: bool
    tokens: list[int] = field(default_factory=list)  # full-vocabulary ids
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # draft probability of the path
    probs: list[torch.Tensor] = field(default_factory=list)  # sampled: q each node was drawn from
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # expanded node -> head's q (draft vocab)
    feature: dict[int, torch.Tensor] = field(default_factory=dict)  # expanded node -> predicted feature
    left: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q not drawn yet
    q_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q over the full vocabulary
    children: dict[int, list[int]] = field(default_factory=dict)
    table: dict[int, list[int]] = field(default_factory=dict)  # node -> its row's block table
    claimed: set[int] = field(default_factory=set)  # nodes whose table a child continues
    sequences: list[list[int]] | None = None  # SpecTr's drafted sequences (node paths)

    def depth(self, node: int) -> int:
        return 0 if node < 0 else self.depths[node]

    def value(self, node: int) -> float:
        return 1.0 if node < 0 else self.values[node]

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.budget


class HeadTreeProposer(EagleProposer):
    """Base of the methods that grow token trees with the EAGLE head (not registered itself)."""

    drafts_trees = True
    samples_trees = True
    default_num_tokens = 10  # tree nodes
    max_depth = 6

    def __init__(self, engine, head=None):
        super().__init__(engine, head)
        kv = engine.kv_cache
        self.cache = PagedKVCache(
            self.head.config, kv.num_blocks, kv.block_size, self.head.fc.weight.dtype,
            num_scratch_blocks=HEAD_SCRATCH_BLOCKS,
        )  # fmt: skip
        self._next_scratch = 0

    def grow(self, trees: list[DraftTree]) -> None:
        """Add nodes to the trees (their roots are expanded): the method's shape."""
        raise NotImplementedError

    @torch.inference_mode()
    def propose(self, requests, max_tokens):
        # Decided before drafting, from the budgets alone: every tree fits the head's scratch.
        per_request = HEAD_SCRATCH_BLOCKS // (2 * max(1, len(requests)))
        budgets = [min(k, per_request + 1, 16) for k in max_tokens]
        active, out, logits = self._catch_up(requests, budgets)
        self._next_scratch = 0
        trees = []
        for row, i in enumerate(active):
            req = requests[i]
            tree = DraftTree(req, budgets[i], not req.params.greedy)
            tree.table[-1] = list(req.block_table)
            self._set_distribution(tree, -1, out[row], logits[row])
            trees.append(tree)
        if trees:
            self.grow(trees)
        drafts = [Draft([]) for _ in requests]
        for i, tree in zip(active, trees, strict=True):
            drafts[i] = self.to_draft(tree)
        return drafts

    def to_draft(self, tree: DraftTree) -> Draft:
        if not tree.tokens:
            return Draft([])
        if not tree.sampled:
            return Draft(tree.tokens, parents=tree.parents)
        return Draft(tree.tokens, torch.stack(tree.probs), tree.parents, scheme="without-replacement")

    # -- distributions and draws -------------------------------------------------------------

    def _set_distribution(
        self, tree: DraftTree, node: int, feature: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """The head's distribution over `node`'s children: the request's own sampling shape for a
        sampled tree (its q), plain softmax for a greedy one (only its order and values matter)."""
        if tree.sampled:
            q = torch.softmax(warp_logits(logits[None].float(), [tree.req.params]), dim=-1)[0]
            tree.left[node] = q.double().clone()
        else:
            q = torch.softmax(logits.float(), dim=-1)
            tree.left[node] = q.clone()
        tree.q[node] = q
        tree.feature[node] = feature

    def full_q(self, q: torch.Tensor) -> torch.Tensor:
        """q over the head's vocabulary, as a distribution over the whole vocabulary."""
        vocab = self.head.draft_vocab
        if vocab is None:
            return q.float()
        size = self.engine.model.config.vocab_size
        return torch.zeros(size).index_copy_(0, vocab, q.float())

    def draw(self, tree: DraftTree, node: int, replacement: bool = False) -> int | None:
        """Add one child of `node`: the next draw from its q (without replacement unless asked),
        or for a greedy tree its best token not yet drafted. Returns the child, or None when the
        budget is spent or nothing is left to draw."""
        if tree.full:
            return None
        left = tree.left[node]
        if tree.sampled:
            source = tree.q[node].double() if replacement else left
            if float(source.sum()) <= 0.0:
                return None
            x = sample(source, tree.req.generator)
        else:
            x = int(left.argmax())
            if float(left[x]) <= 0.0:
                return None
        value = tree.value(node) * float(tree.q[node][x])
        left[x] = 0.0
        vocab = self.head.draft_vocab
        token = x if vocab is None else int(vocab[x])
        return self.add_child(tree, node, token, value)

    def add_child(self, tree: DraftTree, node: int, token: int, value: float) -> int:
        j = len(tree.tokens)
        tree.tokens.append(token)
        tree.parents.append(node)
        tree.depths.append(tree.depth(node) + 1)
        tree.values.append(value)
        if tree.sampled:
            if node not in tree.q_rows:  # siblings share their parent's row
                tree.q_rows[node] = self.full_q(tree.q[node])
            tree.probs.append(tree.q_rows[node])
        tree.children.setdefault(node, []).append(j)
        return j

    # -- expansion: one head forward for a batch of nodes ---------------------------------------

    def expand(self, pairs: list[tuple[DraftTree, int]]) -> None:
        """Run the head on these (tree, node) rows: each node's distribution over its children."""
        if not pairs:
            return
        ids, feats, positions, segments = [], [], [], []
        for tree, node in pairs:
            parent = tree.parents[node]
            position = tree.req.num_tokens - 2 + tree.depths[node]
            table = self._table_for(tree, node, parent, position)
            ids.append(tree.tokens[node])
            feats.append(tree.feature[parent])
            positions.append(position)
            segments.append(Segment(table, position, 1))
        self.cache.begin_step(segments)
        out = self.head(torch.tensor(ids), torch.stack(feats), torch.tensor(positions), self.cache)
        logits = self.head.compute_logits(out)
        for row, (tree, node) in enumerate(pairs):
            self._set_distribution(tree, node, out[row], logits[row])

    def _table_for(self, tree: DraftTree, node: int, parent: int, position: int) -> list[int]:
        """The block table of `node`'s row: its parent's, if no other child has taken it, else
        a new branch in scratch blocks holding a copy of the parent's path."""
        bs = self.cache.block_size
        parent_table = tree.table[parent]
        if parent not in tree.claimed:
            tree.claimed.add(parent)
            tree.table[node] = parent_table
            return parent_table
        first = (tree.req.num_tokens - 1) // bs  # the first block a drafted row writes
        last = (tree.req.num_tokens - 2 + self.max_depth) // bs
        n = last - first + 1
        start = self.cache.num_blocks + self._next_scratch
        if self._next_scratch + n > self.cache.num_scratch_blocks:
            raise RuntimeError("head scratch blocks exhausted (budgets are capped to prevent this)")
        self._next_scratch += n
        blocks = list(range(start, start + n))
        # The parent's path lies in blocks first .. (position - 1) // bs.
        copies = [(parent_table[first + i], blocks[i]) for i in range((position - 1) // bs - first + 1)]
        self.cache.copy_blocks(copies)
        table = parent_table[:first] + blocks
        tree.table[node] = table
        tree.claimed.add(parent)
        return table
