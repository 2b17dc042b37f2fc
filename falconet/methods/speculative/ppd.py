"""Parallel Prompt Decoding: the target drafts its own next tokens in the verifying forward.

PPD (Chen et al., 2024, "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient
Acceleration of LLM Inference"): m trained embeddings P_1..P_m (`falconet train-prompts`),
appended after a sequence, make the unchanged target guess the tokens 2..m+1 places ahead. Each
step's forward runs the request's last token and its drafts, and, as extra rows (Draft.extra_*),
a group P_1..P_m under the last token and under every draft, each group seeing its node's path
only (tree attention). Whichever draft the verifier stops at, the group under it guessed what
follows the target's token there: those guesses are the next step's drafts. No draft model and
no second forward; the cost is the extra rows.

The drafts are the argmax at each prompt row (point masses), so verification is exact for greedy
and sampled requests alike. The paper's hardware-aware sparse tree (several candidates per
prompt row, sized to the device) is left out: a 2-core CPU's forward grows with every row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from falconet.errors import FalconetError
from falconet.methods.speculative.artifacts import find_artifact, read_artifact
from falconet.methods.speculative.base import Draft, ExtraInputs, Proposer, ProposerError
from falconet.train.train_prompts import MARKER, default_prompts_path


def load_prompt_embeddings(path, model) -> torch.Tensor:
    """[m, hidden] prompt embeddings saved by `falconet train-prompts` for a model like `model`."""
    _, tensors = read_artifact(path, "set of PPD prompt tokens", model.config)
    if "prompt_embeddings" not in tensors:
        raise FalconetError(f"{path}: holds no prompt embeddings")
    return tensors["prompt_embeddings"].to(model.embed_tokens.weight.dtype)


class PromptInputs(ExtraInputs):
    """The extra rows' input embeddings are the trained prompt tokens."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def edit(self, layer, x, residual, first, rows) -> None:
        if layer == 0:
            x[rows] = self.embeddings


class PPDProposer(Proposer):
    """Parallel Prompt Decoding (Chen et al., 2024): trained prompt tokens in the verify forward."""

    name = "ppd"
    paper = (
        "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient Acceleration of LLM Inference "
        "(Chen et al., 2024)"
    )
    # One draft a step: on 2 CPU cores every extra row costs ~3% of a step, and the second and
    # third guesses are kept too rarely to pay for their rows (docs/benchmarks.md).
    default_num_tokens = 1

    # the artifact: marker file, what makes it, its default folder
    marker, command, default_path = MARKER, "falconet train-prompts", staticmethod(default_prompts_path)

    def __init__(self, engine):
        super().__init__(engine)
        given = engine.config.draft_head
        if given is not None and not (Path(given) / self.marker).is_file():
            given = None  # --draft-head names another method's artifact (an EAGLE head)
        default = self.default_path(engine.model_path)
        path = find_artifact(
            given, default, self.marker,
            f"speculative method {self.name!r} needs trained parameters: run `{self.command}` "
            f"(they are then found at {default}), or pass draft_head= to LLM (--draft-head)",
        )  # fmt: skip
        try:
            self.load(path)
        except FalconetError as e:
            raise ProposerError(str(e)) from None
        # request id -> (the token count its guesses continue from, the guesses)
        self._guesses: dict[str, tuple[int, list[int]]] = {}

    def load(self, path) -> None:
        self.embeddings = load_prompt_embeddings(path, self.engine.model)
        self.num_prompt_tokens = self.embeddings.shape[0]

    def inputs(self, lengths: list[int]) -> ExtraInputs:
        """What the groups of these lengths (one per anchor, in order) are fed."""
        return PromptInputs(torch.cat([self.embeddings[:m] for m in lengths]))

    def lookahead(self, num_drafts: int) -> int:
        # The group under the last draft continues the request's own blocks (tree branch 0); a
        # group guesses only as far as the next step drafts.
        return 2 * min(num_drafts, self.num_prompt_tokens)

    def propose(self, requests, max_tokens: list[int]) -> list[Draft]:
        out = []
        for req, budget in zip(requests, max_tokens, strict=True):
            known, guesses = self._guesses.pop(req.request_id, (-1, []))
            guesses = guesses if known == req.num_tokens else []
            wanted = min(self.engine.speculator.num_drafts(req), self.num_prompt_tokens)
            k = min(len(guesses), wanted, budget)
            out.append(self._with_groups(guesses[:k], budget, wanted))
        return out

    def _with_groups(self, tokens: list[int], budget: int, length: int | None = None) -> Draft:
        """A chain of drafts with a group P_1..P_length (default: all m) under the last token and
        under each draft, each cut to end within `budget` places past the last token (the slots
        and positions granted)."""
        length = self.num_prompt_tokens if length is None else length
        parents: list[int] = []
        lengths = []
        for anchor in range(-1, len(tokens)):
            m = min(length, budget - (anchor + 1))
            if m <= 0:
                break
            first = len(tokens) + len(parents)
            parents += [anchor] + list(range(first, first + m - 1))
            lengths.append(m)
        if not parents:
            return Draft(list(tokens))
        return Draft(list(tokens), extra_parents=parents, extra_inputs=self.inputs(lengths))

    def on_extra_rows(self, request, draft: Draft, end: int, logits: torch.Tensor) -> None:
        parents = draft.extra_parents
        if end not in parents:
            return  # no group under that draft (the end of the budget)
        first = parents.index(end)  # a group's later rows hang under its earlier ones
        last = first + 1
        while last < len(parents) and parents[last] == len(draft.tokens) + last - 1:
            last += 1
        # they continue the known tokens, the kept drafts and the target's own token
        self._guesses[request.request_id] = (
            request.num_tokens + end + 2,
            logits[first:last].argmax(-1).tolist(),
        )

    def on_reset(self, request) -> None:
        self._guesses.pop(request.request_id, None)

    def forget(self) -> None:
        self._guesses.clear()
