"""Recursive Speculative Decoding: a draft tree sampled without replacement.

Jeon et al. (2024), "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling
Without Replacement": each node's children are distinct tokens drawn from the drafter's q without
replacement (Gumbel-top-k), so no two siblings waste a verification row on the same token, and
the target verifies each node's children by recursive rejection sampling (multi_draft.py), which
keeps the output exactly distributed as its own. This is RSD with a constant branching factor per
depth (RSD-C); the drafter is the EAGLE head (head_tree.py). Greedy requests get each node's
best tokens (the temperature-0 limit of drawing without replacement).
"""

from __future__ import annotations

from falconet.methods.speculative.head_tree import DraftTree, HeadTreeProposer


class RecursiveSpeculativeProposer(HeadTreeProposer):
    """A tree drawn without replacement, verified by recursive rejection sampling (Jeon et al., 2024)."""

    name = "rsd"
    paper = (
        "Recursive Speculative Decoding: Accelerating LLM Inference via Sampling Without "
        "Replacement (Jeon et al., 2024)"
    )
    default_num_tokens = 9  # tree nodes: 3 + 3 + 3
    branching = (3, 1, 1, 1, 1, 1)  # children per node at each depth

    def levels(self, budget: int) -> list[int]:
        """Children per node at each depth that fit the budget (fixed before drafting)."""
        out, width, total = [], 1, 0
        for b in self.branching[: self.max_depth]:
            b = min(b, budget - total) if not out else b
            if b < 1 or total + width * b > budget:
                break
            out.append(b)
            width *= b
            total += width
        return out

    def grow(self, trees: list[DraftTree]) -> None:
        plans = [self.levels(t.budget) for t in trees]
        frontier = {id(t): [-1] for t in trees}
        for depth in range(max(map(len, plans), default=0)):
            if depth:
                self.expand(
                    [
                        (t, v)
                        for t, plan in zip(trees, plans, strict=True)
                        if depth < len(plan)
                        for v in frontier[id(t)]
                    ]
                )
            for tree, plan in zip(trees, plans, strict=True):
                if depth >= len(plan):
                    continue
                new = []
                for node in frontier[id(tree)]:
                    for _ in range(plan[depth]):
                        child = self.draw(tree, node)
                        if child is None:
                            break
                        new.append(child)
                frontier[id(tree)] = new
