"""The engine loop: admit requests, run the model once per step over every running request,
sample, detokenize, retire finished requests.

One step computes, for each running request, the tokens it still needs (the whole prompt
on its first step, then one token), flattened into a single forward pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from falconet.engine.detokenizer import IncrementalDetokenizer
from falconet.engine.request import Request, RequestStatus
from falconet.engine.sampler import make_generator, sample
from falconet.errors import FalconetError
from falconet.models.kv_cache import ContiguousKVCache
from falconet.models.loader import LoadedModel
from falconet.sampling_params import SamplingParams


@dataclass
class StepOutput:
    request: Request
    new_token_id: int
    text_delta: str


class LLMEngine:
    def __init__(self, loaded: LoadedModel, max_num_seqs: int = 8, max_model_len: int | None = None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(max_model_len or self.model.max_positions, self.model.max_positions)
        dtype = self.model.embed_tokens.weight.dtype
        self.kv_cache = ContiguousKVCache(loaded.config, max_num_seqs, self.max_model_len, dtype)
        self.eos_ids = set(loaded.config.eos_token_ids)
        if self.tokenizer is not None:
            self.eos_ids |= set(self.tokenizer.eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> Request:
        if not prompt_ids:
            raise FalconetError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise FalconetError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                "(leave room for at least one generated token)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise FalconetError(f"prompt token ids must be in [0, {vocab})")
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        req = Request(prompt_ids, params, make_generator(params.seed), detok, prompt=prompt)
        self.waiting.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "abort")

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        while self.waiting and self.kv_cache.free_slots:
            req = self.waiting.popleft()
            req.slot, req.status = self.kv_cache.allocate(), RequestStatus.RUNNING
            self.running.append(req)
        if not self.running:
            return []
        batch = list(self.running)
        ids, positions, counts = [], [], []
        for req in batch:
            new = req.all_ids[req.num_computed :]
            ids.extend(new)
            positions.extend(range(req.num_computed, req.num_computed + len(new)))
            counts.append(len(new))
        self.kv_cache.begin_step([r.slot for r in batch], counts)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv_cache)
        last_rows = torch.tensor(counts).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last_rows])
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch])

        outputs = []
        for req, n, token in zip(batch, counts, tokens, strict=True):
            req.num_computed += n
            req.output_ids.append(token)
            delta = req.detokenizer.add(token) if req.detokenizer is not None else ""
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
                if req.detokenizer is not None:
                    delta += req.detokenizer.flush()
            outputs.append(StepOutput(req, token, delta))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            return "stop"
        if len(req.output_ids) >= p.max_tokens or len(req.all_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot is not None:
            self.kv_cache.free(req.slot)
            req.slot = None
        if req in self.running:
            self.running.remove(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
