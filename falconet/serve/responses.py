"""OpenAI response bodies: whole responses from finished requests, stream chunks from token events.

One class per endpoint, holding what every body of one response shares (id, model, creation
time, which logprobs were asked for). Choice `index` = prompt index * n + sample index, as
OpenAI numbers the choices of a batch of prompts.
"""

from __future__ import annotations

import time
import uuid

from falconet.engine.detokenizer import IncrementalDetokenizer
from falconet.engine.group import returned_samples
from falconet.engine.request import Request
from falconet.engine.sampler import TokenLogprobs
from falconet.engine.speculator import metrics_of
from falconet.serve.async_engine import RequestStream, TokenEvent

MIN_LOGPROB = -9999.0  # JSON has no -inf: the floor vLLM uses too


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def with_speculative_metrics(choice: dict, metrics: dict | None) -> dict:
    """Extension field of a speculative request's choice (its last chunk when streaming):
    drafted/accepted tokens, mean accepted length, acceptance rate by draft position."""
    if metrics is not None:
        choice["speculative_metrics"] = metrics
    return choice


def _lp(x: float) -> float:
    return x if x >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


class _Format:
    object: str
    prefix: str

    def __init__(self, model: str, tokenizer, n: int):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.n = n

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _body(self, object: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def usage_chunk(self, stream: RequestStream, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(ids) for ids, _ in stream.prompts)
        return self._body(self.chunk_object, [], usage=usage(prompt_tokens, completion_tokens))

    def response(self, stream: RequestStream) -> dict:
        """The whole response of a finished submission."""
        choices, completion_tokens = [], 0
        for p, group in enumerate(stream.groups):
            for s, req in enumerate(returned_samples(group)):
                choices.append(self.choice(p * self.n + s, req, stream.prompts[p][1]))
                completion_tokens += len(req.output_ids)
        prompt_tokens = sum(len(ids) for ids, _ in stream.prompts)
        return self._body(self.object, choices, usage=usage(prompt_tokens, completion_tokens))


class CompletionFormat(_Format):
    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, tokenizer, n: int, logprobs: bool, echo: bool, include_usage: bool):
        super().__init__(model, tokenizer, n)
        self.logprobs, self.echo, self.include_usage = logprobs, echo, include_usage
        self._offsets: dict[int, int] = {}  # streaming: text offset reached by each choice

    def _logprobs(self, lps: list[TokenLogprobs], offsets: list[int]) -> dict:
        return {
            "tokens": [self.token_str(lp.token_id) for lp in lps],
            "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [{self.token_str(t): _lp(v) for t, v in lp.as_dict().items()} for lp in lps],
            "text_offset": offsets,
        }

    def _text_offsets(self, req: Request, start: int) -> list[int]:
        """Where each token's text starts in the choice's text: replay the detokenizer."""
        detok = IncrementalDetokenizer(self.tokenizer, req.params.skip_special_tokens)
        offsets = []
        for token in req.output_ids:
            offsets.append(start)
            start += len(detok.add(token))
        return offsets

    def choice(self, index: int, req: Request, prompt_text: str | None) -> dict:
        prefix = self._prompt_text(req.prompt_ids, prompt_text) if self.echo else ""
        choice = {
            "index": index,
            "text": prefix + req.output_text,
            "logprobs": None,
            "finish_reason": req.finish_reason,
            "stop_reason": req.stop_reason,
        }
        if self.logprobs:
            choice["logprobs"] = self._logprobs(req.logprobs, self._text_offsets(req, len(prefix)))
        return with_speculative_metrics(choice, metrics_of(req))

    def _prompt_text(self, ids: list[int], text: str | None) -> str:
        return text if text is not None else self.tokenizer.decode(ids)

    def _chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return self._body(self.chunk_object, [choice], **extra)

    def start_chunks(self, stream: RequestStream) -> list[dict]:
        """With echo, each choice starts with its prompt."""
        if not self.echo:
            return []
        chunks = []
        for p, (ids, text) in enumerate(stream.prompts):
            for s in range(self.n):
                prompt = self._prompt_text(ids, text)
                self._offsets[p * self.n + s] = len(prompt)
                chunks.append(self._chunk(p * self.n + s, prompt, None, None))
        return chunks

    def event_chunk(self, event: TokenEvent) -> dict | None:
        """The chunk of one token event; None when it has nothing to say (text held back)."""
        index = event.prompt * self.n + event.sample
        with_logprobs = self.logprobs and event.logprobs is not None
        if not (event.text or event.finish_reason or with_logprobs):
            return None
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(event.text)
        logprobs = self._logprobs([event.logprobs], [offset]) if with_logprobs else None
        chunk = self._chunk(index, event.text, logprobs, event.finish_reason)
        with_speculative_metrics(chunk["choices"][0], event.speculative_metrics)
        return chunk


class ChatFormat(_Format):
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, model: str, tokenizer, n: int, top_logprobs: int | None, include_usage: bool):
        super().__init__(model, tokenizer, n)
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.include_usage = include_usage

    def _entry(self, token_id: int, logprob: float) -> dict:
        token = self.token_str(token_id)
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

    def _logprobs(self, lps: list[TokenLogprobs]) -> dict:
        content = []
        for lp in lps:
            entry = self._entry(lp.token_id, lp.logprob)
            top = list(lp.top.items())[: self.top_logprobs]
            entry["top_logprobs"] = [self._entry(t, v) for t, v in top]
            content.append(entry)
        return {"content": content}

    def choice(self, index: int, req: Request, prompt_text: str | None) -> dict:
        choice = {
            "index": index,
            "message": {"role": "assistant", "content": req.output_text},
            "logprobs": self._logprobs(req.logprobs) if self.top_logprobs is not None else None,
            "finish_reason": req.finish_reason,
            "stop_reason": req.stop_reason,
        }
        return with_speculative_metrics(choice, metrics_of(req))

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        extra = {"usage": None} if self.include_usage else {}
        return self._body(self.chunk_object, [choice], **extra)

    def start_chunks(self, stream: RequestStream) -> list[dict]:
        """Each choice opens with the assistant role, as OpenAI's streams do."""
        count = len(stream.prompts) * self.n
        return [self._chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(count)]

    def event_chunk(self, event: TokenEvent) -> dict | None:
        """The chunk of one token event; None when it has nothing to say (text held back)."""
        with_logprobs = self.top_logprobs is not None and event.logprobs is not None
        if not (event.text or event.finish_reason or with_logprobs):
            return None
        logprobs = self._logprobs([event.logprobs]) if with_logprobs else None
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        chunk = self._chunk(event.prompt * self.n + event.sample, delta, logprobs, event.finish_reason)
        with_speculative_metrics(chunk["choices"][0], event.speculative_metrics)
        return chunk
