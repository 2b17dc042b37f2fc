"""Which tokens of which requests the next forward pass computes.

One rule covers prefill, decode and speculative tokens: each request needs the tokens it has
not computed yet (a speculative request also lookahead slots for its drafts), and a step grants
them under a token budget (max_num_batched_tokens) and a sequence budget (max_num_seqs).
Running decodes are granted first, then unfinished prefills, then new requests:
Sarathi-Serve's stall-free batching (Agrawal et al., 2024), where new prefills fill the budget
left over by ongoing decodes and never pause them. With chunked prefill on, a prompt larger
than the budget left is split into chunks, SARATHI's chunked prefill with decode-maximal
batching (Agrawal et al., 2023).

When the KV cache runs out of blocks, the most recently admitted request is preempted: its
blocks are freed and it goes back to the front of the queue to be recomputed later (its
sampled tokens are kept, so its output does not change).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from falconet.engine.block_manager import BlockManager
from falconet.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_tokens: list[int]  # new tokens computed for each request this step

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission
        self.num_preemptions = 0
        # (request, matched prefix blocks) -> how many of them it may use (the engine's speculator
        # limits feature-level drafters to blocks their own cache holds).
        self.usable_prefix = lambda req, blocks: len(blocks)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_num_batched_tokens
        decoding = [r for r in self.running if r.num_computed >= len(r.prompt_ids)]
        prefilling = [r for r in self.running if r.num_computed < len(r.prompt_ids)]
        preempted = False
        for req in decoding + prefilling:
            if req.status is not RequestStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or no budget left
            n = self._grant(req, budget)
            if n == 0:
                continue
            if n > req.num_tokens - req.num_computed and not self.block_manager.can_grow(
                req.block_table, req.num_computed + n
            ):
                n = req.num_tokens - req.num_computed  # no lookahead rather than a preemption
            while not self.block_manager.can_grow(req.block_table, req.num_computed + n):
                victim = self._pick_victim(batch, req)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                self.block_manager.grow(req.block_table, req.num_computed + n)
                batch.requests.append(req)
                batch.num_tokens.append(n)
                budget -= n
        # New requests only when nothing had to be preempted: memory is tight otherwise.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            # Prompt logprobs need every prompt position computed, so no prefix-cache reuse.
            matched = not req.block_table and req.params.prompt_logprobs is None
            if matched:
                # Recorded in the hit rate only once admitted: a request that waits for blocks
                # looks its prefix up again at every step.
                req.block_table, req.num_computed = self.block_manager.match_prefix(req.all_ids, record=False)
                usable = self.usable_prefix(req, req.block_table)
                if usable < len(req.block_table):  # e.g. a drafter has no state for the rest
                    self.block_manager.free(req.block_table[usable:])
                    del req.block_table[usable:]
                    req.num_computed = usable * self.block_manager.block_size
            n = self._grant(req, budget)
            if n == 0 or not self.block_manager.can_grow(req.block_table, req.num_computed + n):
                # Hand back the prefix blocks it matched: a waiting request must not pin blocks
                # that running requests may need (they stay cached and can match again).
                self.block_manager.free(req.block_table)
                req.block_table, req.num_computed = [], 0
                break
            self.block_manager.grow(req.block_table, req.num_computed + n)
            if matched:
                self.block_manager.record_query(len(req.all_ids), req.num_computed)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_tokens.append(n)
            budget -= n
        return batch

    def _grant(self, req: Request, budget: int) -> int:
        need = req.num_tokens - req.num_computed
        if need == 1 and req.num_lookahead:
            # A decoding speculative request: its lookahead slots are tokens to compute like
            # any other, but optional: it takes what budget there is.
            return min(1 + req.num_lookahead, budget)
        if need <= budget:
            return need
        return budget if self.enable_chunked_prefill else 0

    def _pick_victim(self, batch: ScheduledBatch, req: Request) -> Request:
        """The most recently admitted running request not already in this batch (else `req`)."""
        for other in reversed(self.running):
            if other is not req and other not in batch.requests:
                return other
        return req

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req.block_table)
        req.block_table, req.num_computed = [], 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def finish(self, req: Request) -> None:
        """Retire a request (finished or aborted) and release its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req.block_table)
        req.block_table = []
