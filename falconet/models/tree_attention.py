"""Where a token tree's keys and values go, so every tree row attends like a plain decode.

A token tree (SpecInfer, Miao et al., 2024; Medusa; EAGLE-2) verifies several candidate
continuations in one forward: row 0 is the sequence's last known token, row j + 1 is draft node j
at position start + depth(j), and each row must see the cached prefix plus only its own
ancestors. Instead of an ancestor mask, every root-to-leaf branch gets a block table of its own
in which the branch's path lies contiguous at its true positions; each row then runs through the
ordinary decode kernel over its branch's table, so its result is bitwise what decoding its path
one token at a time gives (the greedy-identity tests rely on that).

Branches: a node's first child (lowest index) continues its parent's branch; each later child
starts a new one. Branch 0, the root's first chain, lives in the sequence's own blocks (the
lookahead slots). Every other branch shares the sequence's blocks up to the block holding
position start + 1 and continues in scratch blocks (kept by the cache beyond the block
manager's), which start as a copy of that block; the rows above the branch (the root and its
ancestors in this step) are stored into the scratch as well. Once the verifier has chosen a path,
`commit` copies its branch's scratch blocks over the sequence's own, so the accepted tokens'
entries sit where a plain decode would have put them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (1 for the root's children); parents[j] < j, -1 for the root."""
    out: list[int] = []
    for j, p in enumerate(parents):
        if not -1 <= p < j:
            raise ValueError(f"node {j} has parent {p}: parents must come before their children")
        out.append(1 if p < 0 else out[p] + 1)
    return out


def branches(parents: list[int]) -> list[int]:
    """The branch of each node: a first child keeps its parent's branch (the root's: 0)."""
    out: list[int] = []
    seen_parent: set[int] = set()
    count = 1
    for p in parents:
        if p in seen_parent:
            out.append(count)
            count += 1
        else:
            seen_parent.add(p)
            out.append(0 if p < 0 else out[p])
    return out


def scratch_blocks_needed(parents: list[int], start: int, block_size: int) -> int:
    d, b = depths(parents), branches(parents)
    deepest: dict[int, int] = {}
    for j, branch in enumerate(b):
        if branch:
            deepest[branch] = max(deepest.get(branch, 0), d[j])
    first = (start + 1) // block_size
    return sum((start + n) // block_size - first + 1 for n in deepest.values())


@dataclass
class TreeLayout:
    """One tree segment's rows: position, block table and KV slot of each, and the extra stores."""

    start: int
    block_size: int
    block_table: list[int]
    parents: list[int]
    positions: list[int] = field(default_factory=list)  # per row (row 0: the root token)
    tables: list[list[int]] = field(default_factory=list)  # per row
    copies: list[tuple[int, int]] = field(default_factory=list)  # (from block, to block) before the forward
    extra_rows: list[int] = field(default_factory=list)  # rows also stored at extra_slots
    extra_slots: list[int] = field(default_factory=list)
    _node_branch: list[int] = field(default_factory=list)
    _scratch: dict[int, list[int]] = field(default_factory=dict)  # branch -> scratch blocks

    @classmethod
    def plan(cls, block_table, start: int, parents: list[int], block_size: int, take_scratch) -> TreeLayout:
        """take_scratch(n) gives n free scratch block ids."""
        layout = cls(start, block_size, list(block_table), list(parents))
        d, b = depths(parents), branches(parents)
        layout._node_branch = b
        first = (start + 1) // block_size
        deepest: dict[int, int] = {}
        starts: dict[int, int] = {}
        for j, branch in enumerate(b):
            if branch:
                deepest[branch] = max(deepest.get(branch, 0), d[j])
                starts.setdefault(branch, j)
        tables = {0: layout.block_table}
        for branch, n in deepest.items():
            blocks = take_scratch((start + n) // block_size - first + 1)
            layout._scratch[branch] = blocks
            tables[branch] = layout.block_table[:first] + blocks
            if first * block_size < start:  # cached positions of that block the branch must see
                layout.copies.append((layout.block_table[first], blocks[0]))
        layout.positions = [start] + [start + x for x in d]
        row_branch = [0] + b
        layout.tables = [tables[x] for x in row_branch]
        # rows above each branch: the root and the ancestors of the branch's first node
        for branch, node in starts.items():
            above, p = [0], parents[node]
            while p >= 0:
                above.append(p + 1)
                p = parents[p]
            for row in above:
                if layout.positions[row] >= first * block_size:
                    layout.extra_rows.append(row)
                    layout.extra_slots.append(layout.slot(tables[branch], layout.positions[row]))
        return layout

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    @property
    def row_slots(self) -> list[int]:
        return [self.slot(t, p) for t, p in zip(self.tables, self.positions, strict=True)]

    def commit(self, node: int) -> list[tuple[int, int]]:
        """Block copies (from, to) that put the path ending at `node` (-1: the root alone) in the
        sequence's own blocks."""
        if node < 0 or self._node_branch[node] == 0:
            return []
        first = (self.start + 1) // self.block_size
        last = self.positions[node + 1] // self.block_size
        blocks = self._scratch[self._node_branch[node]]
        return [(blocks[i], self.block_table[first + i]) for i in range(last - first + 1)]
