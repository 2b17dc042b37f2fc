"""The engine loop: `step()` = schedule -> run the model once -> sample -> update requests.

Every step is one forward pass over the flattened new tokens of the scheduled requests
(prefill chunks and decodes alike). A request whose known tokens are all computed after the
step gets its next token sampled; one still mid-prefill just waits for its next chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from falconet.engine.block_manager import BlockManager
from falconet.engine.detokenizer import IncrementalDetokenizer
from falconet.engine.request import Request, RequestStatus
from falconet.engine.sampler import TokenLogprobs, make_generator, sample_batch, token_logprobs
from falconet.engine.scheduler import ScheduledBatch, Scheduler
from falconet.engine.speculator import Speculator
from falconet.engine.step_cost import StepCostModel
from falconet.engine.stop import StopChecker
from falconet.errors import FalconetError
from falconet.methods.speculative.verifier import verify
from falconet.models.compiled import CompiledDecode
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import LoadedModel
from falconet.models.tree_attention import depths
from falconet.sampling_params import SamplingParams

# KV blocks beside the block manager's for the side branches of token trees (within one step).
TREE_SCRATCH_BLOCKS = 64


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's context length
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb (tests force preemption with it)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    draft_model: str | None = None  # for speculative="draft-model": a model sharing the tokenizer
    # for speculative="eagle": a head made by `falconet train-head`; for "ppd": prompt tokens made by
    # `falconet train-prompts` (each method also looks under $FALCONET_HOME; ppd ignores an EAGLE head)
    draft_head: str | None = None
    compile: bool = False  # decode-only steps through torch.compile (models/compiled.py)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise FalconetError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class StepOutput:
    """One new token. A speculative request can add several in one step: `index` is the token's
    place in the request's output and `finish_reason` is set only on its last token."""

    request: Request
    new_token_id: int
    text_delta: str
    index: int = 0
    finish_reason: str | None = None


@dataclass
class EngineStats:
    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prefix-cache hits are not)
    num_generated_tokens: int = 0


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        self.max_model_len = min(config.max_model_len or self.model.max_positions, self.model.max_positions)
        dtype = self.model.embed_tokens.weight.dtype
        num_blocks = config.num_kv_blocks
        if num_blocks is None:
            budget_blocks = int(config.kv_cache_memory_gb * 2**30) // PagedKVCache.bytes_per_block(
                loaded.config, config.block_size, dtype
            )
            # The cache is allocated and touched up front: never more than twice what a full batch
            # of full-length sequences can use (the second half keeps prefixes cached).
            useful = 2 * config.max_num_seqs * -(-self.max_model_len // config.block_size)
            num_blocks = max(1, min(budget_blocks, useful))
        self.kv_cache = PagedKVCache(
            loaded.config, num_blocks, config.block_size, dtype, num_scratch_blocks=TREE_SCRATCH_BLOCKS
        )
        # the model's forward, or the compiled one for decode-only steps
        self.forward = CompiledDecode(self.model, self.kv_cache) if config.compile else self.model
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # Without chunking, a whole prompt must fit in one step's budget.
        budget = config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, budget, config.enable_chunked_prefill
        )
        self.eos_ids = set(loaded.config.eos_token_ids)
        if self.tokenizer is not None:
            self.eos_ids |= set(self.tokenizer.eos_token_ids)
        self.stats = EngineStats()
        self.step_cost = StepCostModel()  # step seconds by rows, for load-aware speculation
        self.speculator = Speculator(self)
        self.scheduler.usable_prefix = self.speculator.usable_prefix
        # Called as tap(request, start, hidden_rows) with the final hidden states of the positions
        # each request computed in a step (feature-level drafters; train-head's collection).
        self.hidden_taps = [self.speculator.observe]

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        seed: int | None = None,
    ) -> Request:
        """Queue one sequence. `seed` overrides params.seed (n > 1 gives each sample its own)."""
        seed = params.seed if seed is None else seed
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
        longest = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise FalconetError(
                f"the request needs up to {longest} tokens of KV cache; the cache holds "
                f"{self.block_manager.num_blocks * self.block_manager.block_size} (raise kv_cache_memory_gb)"
            )
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise FalconetError(f"logit_bias token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise FalconetError("stop strings need a tokenizer")
        if params.speculative is not None:
            self.speculator.proposer(params.speculative)  # a method that cannot run fails here
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        req = Request(list(prompt_ids), params, make_generator(seed), detok, prompt=prompt)
        if params.stop:
            req.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        self.scheduler.add(req)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request: Request) -> None:
        if not request.finished:
            self._finish(request, "abort")

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.hit_rate

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        self.speculator.set_lookahead(self.scheduler.running)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        drafts = self.speculator.propose(batch)
        logits, sampling, verifying = self._run_model(batch, drafts)
        outputs = []
        if sampling:
            result = sample_batch(logits[: len(sampling)], sampling)
            for i, (req, token) in enumerate(zip(sampling, result.token_ids, strict=True)):
                self.speculator.sampled(req, logits[i : i + 1])
                self._record_logprob(req, logits[i], token, result.logprobs[i])
                outputs.append(self._append_token(req, token))
        for req, draft, rows, extra, tree in verifying:
            outputs.extend(self._accept_drafts(req, draft, logits[rows], tree, logits[extra]))
        # Decode and verification steps only: prefill rows cost differently, and the decisions
        # the fit serves are about draft rows.
        if all(n == 1 or i in drafts for i, n in enumerate(batch.num_tokens)):
            self.step_cost.record(sum(batch.num_tokens), self._forward_s, time.perf_counter() - started)
        return outputs

    def _accept_drafts(
        self, req: Request, draft, logits: torch.Tensor, tree, extra_logits
    ) -> list[StepOutput]:
        """Verify a request's drafts (logits: its last token's row, then one per draft), roll
        its KV back to the accepted prefix and append the kept tokens.

        tree: for a token tree, (its segment in the step, its hidden rows): the accepted path's
        KV entries move into place and the hidden-state taps see that path only. extra_logits:
        the rows of the draft's extra rows (Draft.extra_parents), for its proposer."""
        verdict = verify(logits, draft, req)
        # roll back the rejected drafts and the extra rows
        req.num_computed -= len(draft.tokens) + draft.num_extra - verdict.num_accepted
        path = verdict.path if verdict.path is not None else list(range(verdict.num_accepted))
        rows = [0] + [j + 1 for j in path]  # the logits row each kept token was chosen at
        if tree is not None:
            segment, hidden = tree
            self.kv_cache.commit_tree(segment, path[-1] if path else -1)
            start = req.num_computed - len(rows)
            for tap in self.hidden_taps:
                tap(req, start, hidden[rows])
        self.block_manager.cache_full_blocks(req.block_table, req.all_ids + verdict.tokens, req.num_computed)
        end = path[-1] if path else -1
        self.speculator.verified(
            req, draft, verdict.num_accepted, logits, end, extra_logits if draft.num_extra else None
        )
        outputs = []
        for row, token in zip(rows, verdict.tokens, strict=True):
            info = None
            if req.params.logprobs is not None:
                lp = torch.log_softmax(logits[row], dim=-1)[None]
                info = token_logprobs(lp, [token], [req.params.logprobs])[0]
            self._record_logprob(req, logits[row], token, info)
            outputs.append(self._append_token(req, token))
            if req.finished:
                break
        return outputs

    @staticmethod
    def _record_logprob(req: Request, row: torch.Tensor, token: int, info: TokenLogprobs | None) -> None:
        if info is not None:
            req.logprobs.append(info)
            req.cumulative_logprob += info.logprob
        elif req.params.best_of is not None and req.params.best_of > req.params.n:
            # best_of ranks samples by cumulative logprob, asked for or not
            req.cumulative_logprob += float(torch.log_softmax(row, -1)[token])

    def _run_model(self, batch: ScheduledBatch, drafts: dict) -> tuple[torch.Tensor | None, list, list]:
        """One forward over the batch. Logits: first one row per request that samples its next
        token this step, then, per request verifying drafts, its last token's row and one per
        draft, then one per extra row (`verifying` lists (request, draft, verified rows, extra
        rows, tree info or None))."""
        ids, positions, segments, last_rows, sampling, spec = [], [], [], [], [], []
        edits = []  # (inputs, first row, extra rows) of drafts with extra rows
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            start = req.num_computed
            draft = drafts.get(i)
            tree = None
            if draft is None:
                ids.extend(req.all_ids[start : start + n])
                positions.extend(range(start, start + n))
            else:
                ids.extend(req.all_ids[start:] + draft.tokens + [0] * draft.num_extra)
                parents = draft.segment_parents()
                if parents is not None:
                    tree = (-1, *(p + 1 for p in parents))
                    positions.extend([start] + [start + d for d in depths(parents)])
                else:
                    positions.extend(range(start, start + n))
                if draft.num_extra:
                    edits.append(
                        (draft.extra_inputs, len(ids) - n, slice(len(ids) - draft.num_extra, len(ids)))
                    )
            segments.append(Segment(req.block_table, start, n, as_decodes=draft is not None, tree=tree))
            if draft is not None:
                spec.append((req, draft, len(ids) - n, i))
            elif start + n == req.num_tokens:
                last_rows.append(len(ids) - 1)
                sampling.append(req)
        self.kv_cache.begin_step(segments)
        started = time.perf_counter()
        extra = {"edit_rows": self._row_editor(edits)} if edits else {}
        hidden = self.forward(torch.tensor(ids), torch.tensor(positions), self.kv_cache, **extra)
        row, trees = 0, {}
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            if req.params.prompt_logprobs is not None:
                self._record_prompt_logprobs(req, hidden[row : row + n])
            if segments[i].tree is not None:  # taps see a tree's accepted path, once verified
                trees[i] = (i, hidden[row : row + n])
            else:
                for tap in self.hidden_taps:
                    tap(req, req.num_computed, hidden[row : row + n])
            row += n
            req.num_computed += n
            if i not in drafts:  # verified requests cache their blocks once the drafts are judged
                self.block_manager.cache_full_blocks(req.block_table, req.all_ids, req.num_computed)
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += len(ids)
        verifying, offset = [], len(last_rows)
        for req, draft, first, i in spec:
            rows = len(draft.tokens) + 1 + draft.num_extra
            last_rows.extend(range(first, first + rows))
            verify_rows = slice(offset, offset + len(draft.tokens) + 1)
            verifying.append((req, draft, verify_rows, slice(verify_rows.stop, offset + rows), trees.get(i)))
            offset += rows
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows)]) if last_rows else None
        self._forward_s = time.perf_counter() - started
        return logits, sampling, verifying

    @staticmethod
    def _row_editor(edits: list):
        """The forward's edit_rows for this step's drafts with extra rows (Draft.extra_inputs)."""

        def edit_rows(layer: int, x: torch.Tensor, residual: torch.Tensor | None) -> None:
            for inputs, first, rows in edits:
                inputs.edit(layer, x, residual, first, rows)

        return edit_rows

    def _record_prompt_logprobs(self, req: Request, hidden: torch.Tensor) -> None:
        """Row i of this chunk predicts token start + i + 1: keep those that are prompt tokens
        not recorded yet (a preempted request recomputes its prompt)."""
        start, prompt = req.num_computed, req.prompt_ids
        first, last = max(start, len(req.prompt_logprobs) - 1), min(start + len(hidden), len(prompt) - 1)
        if first >= last:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[first - start : last - start]), dim=-1)
        targets = prompt[first + 1 : last + 1]
        ks = [req.params.prompt_logprobs] * len(targets)
        req.prompt_logprobs.extend(token_logprobs(logprobs, targets, ks))

    def _append_token(self, req: Request, token: int) -> StepOutput:
        req.output_ids.append(token)
        self.stats.num_generated_tokens += 1
        delta = req.detokenizer.add(token) if req.detokenizer is not None else ""
        reason = self._stop_reason(req, token)
        if reason is not None and req.detokenizer is not None:
            delta += req.detokenizer.flush()
        if req.stop_checker is not None:
            delta, hit = req.stop_checker.check(delta)
            if hit:
                reason, req.stop_reason = "stop", req.stop_checker.matched
            elif reason is not None:
                delta += req.stop_checker.flush()
        req.output_text += delta
        if reason is not None:
            self._finish(req, reason)
        return StepOutput(req, token, delta, len(req.output_ids) - 1, req.finish_reason)

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            req.stop_reason = token if token in p.stop_token_ids else None
            return "stop"
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req)
        self.speculator.release(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
