"""SpecTr: several draft sequences drawn independently, verified jointly by optimal transport.

Sun et al. (2023), "SpecTr: Fast Speculative Decoding via Optimal Transport": the drafter samples
k sequences i.i.d.; at each position the target chooses among the next tokens of the sequences
that still agree with what it has accepted, by the k-sequential selection rule (multi_draft.py),
which keeps the output distributed exactly as the target's and accepts a draft with probability
within a factor (1 - 1/e) of the best possible. With k = 1 it is standard speculative sampling.

Here the drafter is the EAGLE head (head_tree.py): the sequences share their common prefixes as
one token tree, so a token drafted by several sequences is verified once. Greedy requests get
the head's k best first tokens, each continued by its argmax (the temperature-0 limit).
"""

from __future__ import annotations

import torch

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.head_tree import DraftTree, HeadTreeProposer
from falconet.methods.speculative.multi_draft import sample


class SpecTrProposer(HeadTreeProposer):
    """k i.i.d. draft sequences from the EAGLE head, SpecTr's k-sequential selection (Sun et al., 2023)."""

    name = "spectr"
    paper = "SpecTr: Fast Speculative Decoding via Optimal Transport (Sun et al., 2023)"
    default_num_tokens = 9  # tree nodes: 3 sequences of 3
    num_sequences = 3

    def shape(self, budget: int) -> tuple[int, int]:
        """(sequences, length) for a node budget: fixed before drafting, from the budget alone."""
        k = max(1, min(self.num_sequences, budget))
        return k, max(1, min(self.max_depth, budget // k))

    def grow(self, trees: list[DraftTree]) -> None:
        shapes = [self.shape(t.budget) for t in trees]
        for tree, (k, _) in zip(trees, shapes, strict=True):
            tree.sequences = [[] for _ in range(k)]
        for depth in range(max(length for _, length in shapes)):
            todo = [
                (t, seq) for t, (_, length) in zip(trees, shapes, strict=True)
                for seq in t.sequences if len(seq) == depth < length
            ]  # fmt: skip
            pending = {(id(t), seq[-1]): (t, seq[-1]) for t, seq in todo if seq and seq[-1] not in t.q}
            self.expand(list(pending.values()))
            for tree, seq in todo:
                node = seq[-1] if seq else -1
                child = self._next(tree, node)
                if child is None:
                    continue
                seq.append(child)

    def _next(self, tree: DraftTree, node: int) -> int | None:
        if not tree.sampled:  # the best token not yet drafted here (top-k at the root, then argmax)
            return self.draw(tree, node)
        x = sample(tree.q[node], tree.req.generator)
        vocab = self.head.draft_vocab
        token = x if vocab is None else int(vocab[x])
        for c in tree.children.get(node, []):  # drawn before: the sequences share the node
            if tree.tokens[c] == token:
                return c
        return self.add_child(tree, node, token, tree.value(node) * float(tree.q[node][x]))

    def to_draft(self, tree: DraftTree) -> Draft:
        if not tree.tokens or not tree.sampled:
            return super().to_draft(tree)
        return Draft(
            tree.tokens, torch.stack(tree.probs), tree.parents, scheme="iid", sequences=tree.sequences
        )
