"""The library entry point: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from falconet.engine.engine import EngineConfig, LLMEngine
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
    finish_reason: str | None


@dataclass
class RequestOutput:
    """Shaped like vLLM's: one prompt, its completions in `outputs`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

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

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "float32", **engine_options):
        """`engine_options`: fields of `EngineConfig` (max_num_seqs, max_num_batched_tokens,
        max_model_len, kv_cache_memory_gb, enable_prefix_caching, enable_chunked_prefill, ...)."""
        try:
            config = EngineConfig(**engine_options)
        except TypeError as e:
            raise FalconetError(f"unknown engine option: {e}") from None
        loaded = load_model(model, dtype=dtype, max_model_len=config.max_model_len)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.engine = LLMEngine(loaded, config)

    def generate(
        self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        requests: list[Request] = []
        try:
            for p in prompts:
                requests.append(self._submit(p, params))
        except BaseException:
            for r in requests:  # a bad prompt rejects the whole call; nothing stays queued
                self.engine.abort(r)
            raise
        while self.engine.has_unfinished():
            self.engine.step()
        return [self._output(r) for r in requests]

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None):
        """Apply the chat template and generate; one conversation in, one RequestOutput out."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        outputs = self.generate(ids, params)
        return outputs[0] if single else outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text as it is generated. Closing the iterator aborts the request."""
        req = self._submit(prompt, params or SamplingParams())
        try:
            while not req.finished:
                for out in self.engine.step():
                    if out.request is req and out.text_delta:
                        yield out.text_delta
        finally:
            if not req.finished:
                self.engine.abort(req)

    def _submit(self, prompt: str | list[int], params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            return self.engine.add_request(self.tokenizer.encode(prompt), params, prompt=prompt)
        return self.engine.add_request(list(prompt), params)

    @staticmethod
    def _output(req: Request) -> RequestOutput:
        text = req.detokenizer.text if req.detokenizer is not None else ""
        completion = CompletionOutput(0, text, list(req.output_ids), req.finish_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, [completion])
