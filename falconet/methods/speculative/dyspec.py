"""DySpec: the draft tree grown greedily where the drafter is most confident.

Xiong et al. (2024), "DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure":
a draft token's probability under the drafter predicts its chance of being accepted, so instead
of a fixed tree shape, the tree is grown one node at a time by expanding the candidate with the
highest estimated value (the product of draft probabilities along its path) until the token
budget is spent. Here the drafter is the EAGLE head (head_tree.py), and nodes are added in rounds
of up to `per_round` per request, one head forward per round. A candidate below `min_value` is not
drafted at all: on these 2 cores one more verified row costs about 3% of a step, more than an
unlikely node brings.

Greedy requests: a node's next candidate is its best token not drafted yet, valued at the path's
probability. Sampled requests: children are drawn without replacement and verified by recursive
rejection sampling (as in RSD); the next candidate at a node is valued, before it is drawn, by the
node's value times the draft mass not drawn yet, so the tree's shape never depends on a draw's own
value and verification stays exact.
"""

from __future__ import annotations

from falconet.methods.speculative.head_tree import DraftTree, HeadTreeProposer


class DySpecProposer(HeadTreeProposer):
    """A token tree grown greedily by draft probability under a node budget (Xiong et al., 2024)."""

    name = "dyspec"
    paper = "DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure (Xiong et al., 2024)"
    default_num_tokens = 10  # tree nodes at most
    per_round = 4
    min_value = 0.05

    def candidate(self, tree: DraftTree, node: int) -> float:
        """The estimated value of `node`'s next child, known before it is drawn."""
        left = tree.left[node]
        rest = float(left.sum()) if tree.sampled else float(left.max())
        return tree.value(node) * rest

    def grow(self, trees: list[DraftTree]) -> None:
        while True:
            pairs = []
            for tree in trees:
                added = []
                for _ in range(self.per_round):
                    open_nodes = [v for v in tree.q if tree.depth(v) < self.max_depth]
                    if tree.full or not open_nodes:
                        break
                    best = max(open_nodes, key=lambda v: self.candidate(tree, v))
                    if self.candidate(tree, best) < self.min_value and tree.tokens:
                        break  # (the first draft is always made, as EAGLE's chain does)
                    child = self.draw(tree, best)
                    if child is None:
                        break
                    added.append(child)
                if not tree.full:
                    pairs.extend(
                        (tree, c) for c in added
                        if tree.depths[c] < self.max_depth and tree.values[c] >= self.min_value
                    )  # fmt: skip
            if not pairs:
                return
            self.expand(pairs)
