"""The two generation endpoints: turn a request into prompts and SamplingParams, submit it to the
engine loop, and answer with one JSON body or a stream of server-sent events.

Everything that can be refused is refused before the response starts (a streaming response
cannot change its status once it has begun): bad values, an unknown model or method, a prompt
longer than the context, a full queue. Once a response is under way the only failures left are
the engine's own, reported in the stream as an OpenAI error event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from falconet.errors import FalconetError
from falconet.methods.registry import DECODING_STRATEGIES, SPECULATIVE_METHODS
from falconet.serve.async_engine import (
    AsyncEngine,
    EngineFailure,
    QueueFull,
    RequestStream,
    ShuttingDown,
    TooManySequences,
)
from falconet.serve.errors import APIError, bad_request, server_error
from falconet.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, _SamplingRequest
from falconet.serve.responses import ChatFormat, CompletionFormat

HEARTBEAT_S = 1.0  # an idle stream sends an SSE comment this often, which also detects a gone client
RETRY_AFTER_S = 1  # what a 429 tells the client to wait

Prompts = list[tuple[list[int], str | None]]
# Extension fields: a request names a method, looked up in its registry (plumbing only for now).
METHOD_FIELDS = (("speculative", SPECULATIVE_METHODS), ("decoding_strategy", DECODING_STRATEGIES))


class EventStreamResponse(StreamingResponse):
    """A streaming response that aborts its submission whenever it ends without finishing it:
    client gone, server shutting down, or anything else. Starlette does not close the body
    iterator when the client disconnects, so its own `finally` would run late or never."""

    def __init__(self, content: AsyncIterator[str], engine: AsyncEngine, stream: RequestStream):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._engine, self._stream = engine, stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._stream.finished:
                self._engine.abort(self._stream)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                param="model", code="model_not_found",
            )  # fmt: skip

    # --- /v1/completions ------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_common(body)
        if body.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs is not supported", param="echo")
        best_of = body.best_of if body.best_of is not None and body.best_of != body.n else None
        if body.stream and best_of is not None and best_of > body.n:
            raise bad_request("best_of > n cannot be streamed", param="best_of")
        prompts = await self._completion_prompts(body.prompt)
        max_tokens = body.max_tokens
        if max_tokens is None:  # null: up to the end of the context, as vLLM
            max_tokens = max(1, self.engine.max_model_len - max(len(ids) for ids, _ in prompts))
        params = self._params(body, max_tokens, body.logprobs, best_of, "max_tokens")
        self._check_length(prompts, max_tokens, "prompt")
        fmt = CompletionFormat(
            self.model_name, self.tokenizer, body.n, body.logprobs is not None, body.echo, body.include_usage
        )
        return await self._respond(body, prompts, params, fmt, request)

    async def _completion_prompts(self, prompt) -> Prompts:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        encoded = iter(await run_in_threadpool(lambda: [self.tokenizer.encode(t) for t in texts]))
        return [(next(encoded), p) if isinstance(p, str) else (list(p), None) for p in prompt]

    # --- /v1/chat/completions -------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_common(body)
        if body.tools:
            raise bad_request("tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad_request("only the 'text' response_format is supported", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", param="top_logprobs")
        ids = await self.encode_chat(body.messages, body.add_generation_prompt)
        requested, param = body.max_completion_tokens, "max_completion_tokens"
        if requested is None:
            requested, param = body.max_tokens, "max_tokens"
        if requested is None:  # up to the end of the context
            requested = max(1, self.engine.max_model_len - len(ids))
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, requested, top_logprobs, None, param)
        self._check_length([(ids, None)], requested, "messages")
        fmt = ChatFormat(self.model_name, self.tokenizer, body.n, top_logprobs, body.include_usage)
        return await self._respond(body, [(ids, None)], params, fmt, request)

    async def encode_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        conversation = [self._message(i, m) for i, m in enumerate(messages)]
        try:
            return await run_in_threadpool(self.tokenizer.encode_chat, conversation, add_generation_prompt)
        except FalconetError as e:
            raise bad_request(str(e), param="messages") from None

    @staticmethod
    def _message(i: int, m: ChatMessage) -> dict:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise bad_request("only text content parts are supported", param=f"messages.{i}.content")
            content = "\n".join(part.text for part in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        return message

    # --- shared ---------------------------------------------------------------------------

    def _check_common(self, body: _SamplingRequest) -> None:
        self.check_model(body.model)
        for field, registry in METHOD_FIELDS:
            name = getattr(body, field)
            if name is not None:
                try:
                    registry.lookup(name)
                except FalconetError as e:
                    raise bad_request(str(e), param=field, code="unknown_method") from None
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options needs stream to be true", param="stream_options")

    @staticmethod
    def _params(body: _SamplingRequest, max_tokens, logprobs, best_of, max_tokens_param: str):
        try:
            return body.sampling_params(max_tokens, logprobs, best_of)
        except FalconetError as e:
            param = body.error_param(e)
            if str(e).startswith("max_tokens"):
                param = max_tokens_param
            raise bad_request(str(e), param=param) from None

    def _check_length(self, prompts: Prompts, max_tokens: int, param: str) -> None:
        limit = self.engine.max_model_len
        for ids, _ in prompts:
            if len(ids) >= limit or len(ids) + max_tokens > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} for the "
                    "completion). Please reduce the length of the prompt or of the completion.",
                    param=param, code="context_length_exceeded",
                )  # fmt: skip

    async def _respond(self, body: _SamplingRequest, prompts: Prompts, params, fmt, request: Request):
        if self.engine.draining:
            raise _shutting_down()
        stream = self.engine.submit(prompts, params, stream=body.stream)
        try:
            await stream.admitted()
        except asyncio.CancelledError:
            self.engine.abort(stream)
            raise
        except QueueFull as e:
            raise APIError(
                429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None  # fmt: skip
        except ShuttingDown:
            raise _shutting_down() from None
        except TooManySequences as e:
            raise bad_request(str(e), param="n") from None
        except FalconetError as e:
            raise bad_request(str(e), param=body.error_param(e) or "prompt") from None
        except EngineFailure as e:
            raise server_error(str(e)) from None
        if body.stream:
            return EventStreamResponse(self._events(stream, fmt), self.engine, stream)
        return await self._collect(stream, fmt, request)

    async def _collect(self, stream: RequestStream, fmt, request: Request) -> JSONResponse:
        """Wait for the whole response, aborting if the client goes away meanwhile."""
        try:
            while not await stream.wait_end(HEARTBEAT_S):
                if await request.is_disconnected():
                    self.engine.abort(stream)
                    return JSONResponse({}, status_code=499)  # nobody reads it
        except EngineFailure as e:
            raise server_error(str(e)) from None
        finally:
            if not stream.finished:
                self.engine.abort(stream)
        return JSONResponse(fmt.response(stream))

    async def _events(self, stream: RequestStream, fmt) -> AsyncIterator[str]:
        completion_tokens = 0
        start = fmt.start_chunks(stream)
        if start:
            yield "".join(_sse(chunk) for chunk in start)
        while not stream.finished:
            try:
                events = await stream.get(HEARTBEAT_S)
            except EngineFailure as e:
                yield _sse(server_error(str(e)).body())
                break
            if not events and not stream.finished:
                yield ": keep-alive\n\n"
                continue
            completion_tokens += sum(e.token_id is not None for e in events)
            # Everything that arrived since the last write goes out in one write.
            chunks = [chunk for chunk in map(fmt.event_chunk, events) if chunk is not None]
            if chunks:
                yield "".join(map(_sse, chunks))
        if fmt.include_usage:
            yield _sse(fmt.usage_chunk(stream, completion_tokens))
        yield "data: [DONE]\n\n"


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
