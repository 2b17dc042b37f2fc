"""PEARL: the draft model drafts while the target verifies, so neither waits for the other.

Liu et al. (2024), "Parallel Speculative Decoding with Adaptive Draft Length". In plain
speculative decoding the target idles while the draft model drafts and the draft model idles
while the target verifies. PEARL runs them at the same time:
- post-verify: while the target verifies a draft, the draft model goes on drafting past it, as
  if all of it will be accepted; when it is, and the target's own next token is the one the
  draft model guessed, the drafts made meanwhile are the next step's draft, at no waiting;
- pre-verify: when there is no such draft, the target computes the next token alone while the
  draft model drafts from the token before it; the target's token verifies the first draft.
Both are one rule here: during every target forward, the draft model drafts the continuation of
the step's text (the last token and its drafts, if any), g1, g2, ...; g1 is its guess of the
token the target is about to produce, and if the target produces the step's drafts and g1,
then g2, g3, ... are verified in the next step. The draft length adapts by itself: the draft
model drafts for as long as the target's forward takes (up to the slots the request has).

The draft model runs on a worker thread with one intra-op thread, beside the engine's forward
(the kernels release Python's lock). On 2 CPU cores the two compete for the cores, so each
runs slower than alone; on separate devices, as in the paper, they would not.

Drafts are the draft model's argmax tokens (point masses) for every request: which of them are
verified depends only on the text and on the target's tokens, never on a draft's own random
draw, so verification stays exact for sampled requests too.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.draft_model import DraftModelProposer
from falconet.methods.speculative.drafting import draft_autoregressively

_GREEDY = SimpleNamespace(greedy=True)


@dataclass
class _Job:
    """What the worker drafts from: a snapshot, since the engine goes on changing the request."""

    request_id: str
    epoch: int  # the request's preemption count
    start: int  # its token count before this step's drafts
    drafts: list[int]  # this step's drafts, assumed accepted
    all_ids: list[int]  # start tokens + drafts
    block_table: list[int]
    computed: int  # positions of all_ids the draft cache already holds
    limit: int  # the most tokens to draft: g1 and the drafts after it
    params = _GREEDY

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)


def _init_worker() -> None:
    torch.set_num_threads(1)  # this thread's OpenMP team; the engine's thread keeps its own


class PearlProposer(DraftModelProposer):
    """Draft-model drafts made during the target's forward, used when they still apply (PEARL)."""

    name = "pearl"
    paper = "Parallel Speculative Decoding with Adaptive Draft Length (PEARL, Liu et al., 2024)"
    default_num_tokens = 6  # the most drafts verified in a step
    # Tokens drafted past a step (g1 included): at least min_ahead, as the paper's fixed window
    # (the next step waits for them), then more while the target's forward still runs.
    min_ahead = 2
    max_ahead = 4  # longer drafting slows the forward more than it pays on 2 CPU cores

    def __init__(self, engine, draft=None):
        super().__init__(engine, draft)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="pearl-draft", initializer=_init_worker)
        self._pending: Future | None = None
        self._on_cpu = engine.model.embed_tokens.weight.device.type == "cpu"
        self._threads = torch.get_num_threads()
        self._stop = threading.Event()
        # request id -> (epoch, the tokens the draft cache holds entries for, how many are sure)
        self._held: dict[str, tuple[int, list[int], int]] = {}
        self._ahead: dict[str, tuple[_Job, list[int]]] = {}  # request id -> (job, g1, g2, ...)

    def lookahead(self, num_drafts):
        # Room for the drafts verified now and for the worker drafting past them.
        return 2 * num_drafts + 1

    def propose(self, requests, max_tokens):
        self._collect()
        drafts = []
        for req, n in zip(requests, max_tokens, strict=True):
            k = req.params.num_speculative_tokens or self.default_num_tokens
            job, ahead = self._ahead.pop(req.request_id, (None, []))
            tokens = []
            if job is not None and job.epoch == req.num_preemptions and len(ahead) > 1:
                ids = req.all_ids
                # the target kept every draft of the step and produced g1 after them
                if (
                    len(ids) == job.num_tokens + 1
                    and ids[job.start : -1] == job.drafts
                    and ids[-1] == ahead[0]
                ):
                    tokens = ahead[1 : 1 + min(n, k)]
            drafts.append(Draft(tokens))
        return drafts

    def launch(self, requests, drafts):
        """Start drafting past each request's step text on the worker, during the forward."""
        jobs = []
        bs = self.engine.kv_cache.block_size
        for req, draft in zip(requests, drafts, strict=True):
            text = req.all_ids + draft.tokens
            # the worker stores KV at positions up to len(text) + limit - 2: in the request's blocks
            room = len(req.block_table) * bs - len(text) + 1
            left = req.params.max_tokens - len(req.output_ids) - len(draft.tokens)
            limit = min(room, left, self.max_ahead, self.engine.max_model_len - len(text))
            if limit < 2:  # g1 alone is no draft
                continue
            jobs.append(
                _Job(
                    req.request_id, req.num_preemptions, req.num_tokens, list(draft.tokens), text,
                    # the last token is fed again even if cached: its logits give g1
                    list(req.block_table), min(self._valid_prefix(req, text), len(text) - 1), limit,
                )
            )  # fmt: skip
        if jobs:
            self._stop.clear()
            self._pending = self._worker.submit(self._draft_ahead, jobs)
            if self._on_cpu:  # the worker takes one of the cores for the forward's duration
                self._threads = torch.get_num_threads()
                torch.set_num_threads(max(1, self._threads - 1))

    def _valid_prefix(self, req, text: list[int]) -> int:
        epoch, held, sure = self._held.get(req.request_id, (-1, [], 0))
        if epoch != req.num_preemptions:
            return 0  # preempted: its blocks are new
        n = min(sure, len(text))  # positions before the last step's drafts were known tokens
        while n < min(len(held), len(text)) and held[n] == text[n]:
            n += 1
        return n

    @torch.inference_mode()
    def _draft_ahead(self, jobs: list[_Job]) -> list[tuple[_Job, list[int]]]:
        steps = iter(range(10**9))  # drafts made so far: g1 and at least one draft, then as time allows

        made = draft_autoregressively(
            self.model, self.cache, jobs, [j.computed for j in jobs], [j.limit for j in jobs],
            keep_going=lambda: next(steps) < self.min_ahead - 1 or not self._stop.is_set(),
        )  # fmt: skip
        return [(job, d.tokens) for job, d in zip(jobs, made, strict=True)]

    def _collect(self) -> None:
        """The target's forward is over: stop the worker after its current draft step."""
        if self._pending is None:
            return
        self._stop.set()
        pending, self._pending = self._pending, None
        try:
            results = pending.result()  # a failure in the worker surfaces in the engine's step
        except BaseException:
            self._held.clear()  # what it wrote is unknown: every request catches up from scratch
            raise
        finally:
            if self._on_cpu:
                torch.set_num_threads(self._threads)
        for job, ahead in results:
            # It fed the step text and every draft token but the last.
            self._held[job.request_id] = (job.epoch, job.all_ids + ahead[:-1], job.start)
            self._ahead[job.request_id] = (job, ahead)

    def on_verified(self, req) -> None:
        pass  # the worker's own record (`_held`) says what the draft cache holds

    def on_reset(self, req) -> None:
        self._collect()  # the worker may be writing to the request's blocks
        self._held.pop(req.request_id, None)
        self._ahead.pop(req.request_id, None)

    def forget(self) -> None:
        self._collect()
        self._ahead.clear()
