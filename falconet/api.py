"""The library entry point: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.engine.group import returned_samples, submit_group
from falconet.engine.request import Request
from falconet.errors import FalconetError
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams

Messages = list[dict[str, str]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None  # with logprobs requested
    logprobs: list[dict[int, float]] | None = None  # per token: chosen + top alternatives
    # with speculative=...: drafted/accepted tokens, mean accepted length, acceptance by position
    speculative_metrics: dict | None = None


@dataclass
class RequestOutput:
    """Shaped like vLLM's: one prompt, its completions in `outputs`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with prompt_logprobs requested

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """A model loaded for offline generation.

    `model`: a known model name (default: smollm2-135m, pulled on first use), a GGUF file or a
    Hugging Face folder. `dtype`: "float32" or "bfloat16". Requests submitted together are
    served by continuous batching; each output is what the prompt would give alone.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype = "float32",
        quantization: str | None = None,
        **engine_options,
    ):
        """`quantization`: weight quantization by name (e.g. "int8"), None for none.
        `engine_options`: fields of `EngineConfig` (max_num_seqs, max_num_batched_tokens,
        max_model_len, kv_cache_memory_gb, enable_prefix_caching, enable_chunked_prefill, ...)."""
        try:
            config = EngineConfig(**engine_options)
        except TypeError as e:
            raise FalconetError(f"unknown engine option: {e}") from None
        loaded = load_model(model, dtype=dtype, max_model_len=config.max_model_len, quantization=quantization)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded, config)

    def generate(
        self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); outputs come back in prompt order.

        With n > 1 each prompt gets n samples (best_of: that many drawn, the n with the highest
        cumulative logprob kept); they share the prompt's KV blocks through the prefix cache.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        groups: list[list[Request]] = []
        try:
            for p in prompts:
                groups.append(self._submit(p, params))
        except BaseException:
            for r in (r for g in groups for r in g):  # a bad prompt rejects the whole call
                self.engine.abort(r)
            raise
        while self.engine.has_unfinished():
            self.engine.step()
        return [self._output(g) for g in groups]

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None):
        """Apply the chat template and generate; one conversation in, one RequestOutput out."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        outputs = self.generate(ids, params)
        return outputs[0] if single else outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it is generated. Closing the iterator aborts the request."""
        params = params or SamplingParams()
        if params.n > 1 or (params.best_of or 1) > 1:
            raise FalconetError("stream() returns one sample: use n=1 and no best_of")
        (req,) = self._submit(prompt, params)
        try:
            while not req.finished:
                for out in self.engine.step():
                    if out.request is req and out.text_delta:
                        yield out.text_delta
        finally:
            if not req.finished:
                self.engine.abort(req)

    def _submit(self, prompt: str | list[int], params: SamplingParams) -> list[Request]:
        """Queue the samples of one prompt (best_of of them, default n)."""
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return submit_group(self.engine, ids, params, prompt=text)

    @staticmethod
    def _output(group: list[Request]) -> RequestOutput:
        group = returned_samples(group)
        completions = [
            CompletionOutput(
                index=i,
                text=r.output_text,
                token_ids=list(r.output_ids),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                cumulative_logprob=r.cumulative_logprob if r.params.logprobs is not None else None,
                logprobs=[lp.as_dict() for lp in r.logprobs] if r.params.logprobs is not None else None,
                speculative_metrics=r.spec_stats.as_dict() if r.spec_stats is not None else None,
            )
            for i, r in enumerate(group)
        ]
        first = group[0]
        prompt_lps = None
        if first.params.prompt_logprobs is not None:
            prompt_lps = [lp.as_dict() if lp is not None else None for lp in first.prompt_logprobs]
        return RequestOutput(first.request_id, first.prompt, first.prompt_ids, completions, prompt_lps)
