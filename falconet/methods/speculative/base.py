"""The speculative-decoding interfaces: a Proposer drafts tokens, the engine verifies them.

Speculative decoding (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al., 2023, "Accelerating Large Language Model Decoding with Speculative
Sampling"): a cheap proposer guesses the next k tokens, the target model scores all of them in
one forward pass, and exact speculative sampling (verifier.py) keeps a prefix of the guesses plus
one token of its own, so the output is distributed exactly as plain sampling from the target.

A step of a speculative request, inside the normal engine step:
1. the scheduler grants it 1 + k tokens (its last sampled token plus k lookahead slots) under
   the same token budget as everything else, and the KV blocks to hold them;
2. its proposer drafts up to k tokens (`Proposer.propose`), with the probabilities it drew them
   from (None: drafted deterministically, a point mass), as a chain or a token tree of k nodes;
3. the target forward computes the last token and the drafts as one segment of the batch (each
   tree node attending to its own ancestors only);
4. the verifier accepts a prefix of the drafts (a root-to-node path of a tree) and adds one
   token; the KV entries of rejected drafts are rolled back (the request's computed length
   shrinks; the slots are overwritten later).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from falconet.engine.engine import LLMEngine
    from falconet.engine.request import Request


class ExtraInputs(ABC):
    """What a draft's extra rows (Draft.extra_parents) are fed in the verifying forward."""

    @abstractmethod
    def edit(
        self, layer: int, x: torch.Tensor, residual: torch.Tensor | None, first: int, rows: slice
    ) -> None:
        """Called before each decoder layer (LlamaForCausalLM.forward's edit_rows) over the whole
        step's rows: the draft's segment starts at row `first` (its last known token) and its
        extra rows are `rows`; rewrite their stream in place where the method feeds them."""


@dataclass
class Draft:
    """Draft tokens for one request: a chain, or a token tree.

    A tree (SpecInfer, Miao et al., 2024) offers several continuations at once: `parents[j]` is
    the index of token j's parent draft (parents come first), -1 when token j continues the
    request's known tokens directly; the target verifies every node in one forward (tree
    attention, models/tree_attention.py) and keeps one root-to-node path.

    A tree is deterministic (probs None: every node a point mass), or sampled, with `scheme`
    saying how (multi_draft.py verifies each): "without-replacement", each node's children drawn
    one after another from the drafter's q at the node without replacement, in index order
    (Recursive Speculative Decoding); "iid", `sequences` drafted independently, each a list of
    node indices from the root down, merged where they agree (SpecTr). probs[j] is then the
    drafter's q at node j's parent, the distribution j was drawn from. A sampled tree must come
    within its budget: which draws are verified may not depend on their values, so it is never
    cut afterwards.
    """

    tokens: list[int]
    # [len(tokens), V] float32: the distribution each token was drawn from; None if the tokens
    # were chosen deterministically (n-gram lookup, greedy drafting): q is then a point mass.
    probs: torch.Tensor | None = None
    parents: list[int] | None = None  # None: a chain, token j follows token j - 1
    scheme: str | None = None  # a sampled tree's: "without-replacement" or "iid"
    sequences: list[list[int]] | None = None  # "iid": the drafted sequences' node paths
    # a model drafter's probability of each token it chose (its own guess of acceptance)
    confidence: list[float] | None = None
    # Rows the target runs in the same forward but does not verify (Parallel Prompt Decoding's
    # prompt tokens, hidden transfer's pseudo tokens): extra row e hangs under extra_parents[e], a
    # draft index, -1 for the request's last known token, len(tokens) + e' for an earlier extra
    # row; `extra_inputs` says what they are fed. The proposer gets their logits
    # (`Proposer.on_extra_rows`); their KV entries are dropped like a rejected branch's.
    extra_parents: list[int] | None = None
    extra_inputs: ExtraInputs | None = None

    def __post_init__(self) -> None:
        if self.parents is not None:
            if len(self.parents) != len(self.tokens):
                raise ValueError("a token tree needs one parent per draft token")
            if (self.probs is None) != (self.scheme is None):
                raise ValueError("a sampled token tree needs probs and a scheme, a deterministic one neither")
            if self.scheme not in (None, "without-replacement", "iid"):
                raise ValueError(f"unknown draft scheme {self.scheme!r}")
            if self.scheme == "iid" and self.sequences is None:
                raise ValueError("an i.i.d. multi-draft tree lists its sequences")
            if self.scheme is None and self.parents == list(range(-1, len(self.tokens) - 1)):
                self.parents = None  # a chain after all: the chain path is cheaper

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    @property
    def num_extra(self) -> int:
        return len(self.extra_parents) if self.extra_parents else 0

    def segment_parents(self) -> list[int] | None:
        """The parent of each row after the root in the target's forward (the drafts, then the
        extra rows), as a token tree's; None for a plain chain."""
        if not self.num_extra:
            return self.parents
        chain = self.parents if self.parents is not None else list(range(-1, len(self.tokens) - 1))
        return chain + list(self.extra_parents)

    def drop_extra(self) -> None:
        self.extra_parents = self.extra_inputs = None

    def truncate(self, n: int) -> None:
        """Keep the first n drafts (a tree stays a tree: parents come before children); extra
        rows go with any cut, as they may hang under a dropped draft."""
        if n >= len(self.tokens):
            return
        self.drop_extra()
        if self.scheme is not None:
            raise ValueError("a sampled draft tree cannot be cut after drafting (see Draft)")
        self.tokens = self.tokens[:n]
        if self.probs is not None:
            self.probs = self.probs[:n]
        if self.confidence is not None:
            self.confidence = self.confidence[:n]
        if self.parents is not None:
            self.parents = self.parents[:n]
            if self.parents == list(range(-1, n - 1)):
                self.parents = None

    def path(self, node: int) -> list[int]:
        """Draft indices from the root's child down to `node` (-1: empty)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node] if self.parents is not None else node - 1
        return out[::-1]


def merge_trees(tokens: list[int], parents: list[int], more: list[int], more_parents: list[int], budget: int):
    """Tree (tokens, parents) with the nodes of tree `more` added where they are new (a path
    already there is shared), in `more`'s order, up to `budget` nodes in all."""
    tokens, parents = list(tokens), list(parents)
    node_of = {(p, t): j for j, (t, p) in enumerate(zip(tokens, parents, strict=True))}
    mapped: list[int] = []  # node of `more` -> node of the result
    for t, p in zip(more, more_parents, strict=True):
        parent = -1 if p < 0 else mapped[p]
        if parent is None:
            mapped.append(None)  # its parent did not fit
            continue
        key = (parent, t)
        if key not in node_of and len(tokens) < budget:
            node_of[key] = len(tokens)
            tokens.append(t)
            parents.append(parent)
        mapped.append(node_of.get(key))
    return tokens, parents


class Proposer(ABC):
    """Drafts tokens for the speculative requests of a step. One instance per engine and method.

    Subclasses set the catalogue fields and implement `propose`. A proposer may keep per-request
    state (a draft model's KV cache position): `on_verified` tells it what the target accepted,
    `on_reset` that a request lost its KV cache (preempted) or left.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    exact: ClassVar[bool] = True  # verified by exact speculative sampling: output = target's
    default_num_tokens: ClassVar[int] = 4
    # True: the engine passes the target's hidden states to `observe` (feature-level drafters)
    uses_hidden_states: ClassVar[bool] = False
    # True: drafts token trees; the tokens granted are a node budget, not a depth
    drafts_trees: ClassVar[bool] = False
    # True: drafts sampled trees for sampled requests (Draft.scheme), which may not be cut to fit
    # the step's scratch blocks afterwards: the engine sizes their budgets before drafting
    samples_trees: ClassVar[bool] = False
    # True: the engine passes the target's most likely token at every verified row to
    # `on_target_predictions` (a drafter that learns from verification results)
    uses_target_predictions: ClassVar[bool] = False
    # True: the engine passes the target's logits at every row it computed for a request, verified
    # or sampled, to `on_target_logits` (a drafter that keeps the target's candidate tokens)
    uses_target_logits: ClassVar[bool] = False

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    @abstractmethod
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Draft]:
        """Up to max_tokens[i] draft tokens for requests[i], which continue its `all_ids`.

        When this is called, each request's block table already covers its lookahead slots:
        a proposer may write KV entries past `num_computed` (they are rewritten by the target)."""

    def select(  # noqa: B027 - optional hook
        self, requests: list[Request], drafts: list[Draft], base_rows: int, base_tokens: int
    ) -> None:
        """A load-aware proposer cuts its drafts here (`Draft.truncate`), once the whole step is
        drafted: `requests` are this method's drafting requests of the step; without these
        drafts the step's forward has `base_rows` rows (other requests' tokens and drafts
        included) and yields `base_tokens` tokens (one per request that samples);
        `self.engine.step_cost` predicts a step's time from its rows."""

    def launch(self, requests: list[Request], drafts: list[Draft]) -> None:  # noqa: B027
        """Called once the step's drafts are final, just before the target's forward: a proposer
        that drafts while the target computes (PEARL) starts its work here."""

    def lookahead(self, num_drafts: int) -> int:
        """KV slots a request reserves beyond its last token, for up to `num_drafts` drafts a
        step (a proposer that drafts further ahead than it verifies asks for more)."""
        return num_drafts

    def observe(self, request: Request, start: int, hidden: torch.Tensor) -> None:  # noqa: B027
        """With `uses_hidden_states`: the target's final hidden states (after its norm, the LM
        head's input) for positions [start, start + len(hidden)) of `request`, computed this
        step. Rows of drafts are included; `on_verified` then says which were kept."""

    def usable_prefix(self, blocks: list[int]) -> int:
        """With `uses_hidden_states`: how many of these prefix-cached blocks (leading blocks of a
        new request) this proposer holds state for. The target recomputes the rest, so the
        proposer sees their hidden states."""
        return len(blocks)

    def on_target_predictions(  # noqa: B027 - optional hook
        self, request: Request, draft: Draft, accepted: int, predicted: list[int]
    ) -> None:
        """With `uses_target_predictions`: predicted[j] is the target's argmax after the request's
        known tokens (`all_ids`, not yet extended by this step's tokens) and drafts 0..j-1,
        rows past the first rejection included; `accepted` drafts were kept."""

    def on_target_logits(  # noqa: B027 - optional hook
        self, request: Request, draft: Draft | None, logits: torch.Tensor
    ) -> None:
        """With `uses_target_logits`: the target's logits computed this step for `request`, one
        row for its last known token, then, if it verified `draft`, one per draft token, rejected
        ones included. On steps where it sampled without drafts, draft is None. Called before the
        step's tokens join `all_ids`."""

    def on_extra_rows(  # noqa: B027 - optional hook
        self, request: Request, draft: Draft, end: int, logits: torch.Tensor
    ) -> None:
        """For a draft with extra rows: their target logits [num_extra, V], once verified; `end`
        is the last kept draft (-1: none), after which the target added its own token."""

    def on_verified(self, request: Request) -> None:  # noqa: B027 - optional hook
        """The target accepted some drafts; `request.num_computed` is the new valid length."""

    def on_reset(self, request: Request) -> None:  # noqa: B027 - optional hook
        """The request's KV cache was freed (preempted, finished or aborted)."""

    def forget(self) -> None:  # noqa: B027 - optional hook
        """Drop what was learnt from earlier requests (a pool of their tokens, acceptance
        rates), as if none had been served: benchmarks repeating the same prompts call this."""


class ProposerError(RuntimeError):
    """A method cannot run here (a missing trained artifact, an incompatible model)."""
