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
   from (None: drafted deterministically, a point mass);
3. the target forward computes the last token and the drafts as one segment of the batch;
4. the verifier accepts a prefix of the drafts and adds one token; the KV entries of rejected
   drafts are rolled back (the request's computed length shrinks; the slots are overwritten
   later).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from falconet.engine.engine import LLMEngine
    from falconet.engine.request import Request


@dataclass
class Draft:
    """Draft tokens for one request: a chain (trees come with tree attention, later)."""

    tokens: list[int]
    # [len(tokens), V] float32: the distribution each token was drawn from; None if the tokens
    # were chosen deterministically (n-gram lookup, greedy drafting): q is then a point mass.
    probs: torch.Tensor | None = None


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

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    @abstractmethod
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Draft]:
        """Up to max_tokens[i] draft tokens for requests[i], which continue its `all_ids`.

        When this is called, each request's block table already covers its lookahead slots:
        a proposer may write KV entries past `num_computed` (they are rewritten by the target)."""

    def observe(self, request: Request, start: int, hidden: torch.Tensor) -> None:  # noqa: B027
        """With `uses_hidden_states`: the target's final hidden states (after its norm, the LM
        head's input) for positions [start, start + len(hidden)) of `request`, computed this
        step. Rows of drafts are included; `on_verified` then says which were kept."""

    def usable_prefix(self, blocks: list[int]) -> int:
        """With `uses_hidden_states`: how many of these prefix-cached blocks (leading blocks of a
        new request) this proposer holds state for. The target recomputes the rest, so the
        proposer sees their hidden states."""
        return len(blocks)

    def on_verified(self, request: Request) -> None:  # noqa: B027 - optional hook
        """The target accepted some drafts; `request.num_computed` is the new valid length."""

    def on_reset(self, request: Request) -> None:  # noqa: B027 - optional hook
        """The request's KV cache was freed (preempted, finished or aborted)."""


class ProposerError(RuntimeError):
    """A method cannot run here (a missing trained artifact, an incompatible model)."""
