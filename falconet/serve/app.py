"""The FastAPI app: routes, API-key check, and every error turned into OpenAI's error body.

    /v1/models, /v1/models/{id}        the served model
    /v1/completions                    text completion, streaming or not
    /v1/chat/completions               chat through the model's template, streaming or not
    /tokenize, /detokenize             vLLM's helpers
    /health, /metrics                  liveness; Prometheus metrics
    /forget                            speculative methods drop what they learnt (benchmarks)

With an API key set, every route but /health and /metrics wants `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from falconet.serve.async_engine import AsyncEngine
from falconet.serve.errors import APIError, bad_request, server_error
from falconet.serve.metrics import CONTENT_TYPE
from falconet.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from falconet.serve.serving import OpenAIServing

logger = logging.getLogger("falconet.serve")


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """An app serving `engine` as `model_name`. The app's lifespan starts and stops the engine loop."""
    serving = OpenAIServing(engine, model_name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="Falconet", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key", code="invalid_api_key")

    v1 = APIRouter(dependencies=[Depends(check_key)])

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "falconet",
            "max_model_len": engine.max_model_len,
        }

    @v1.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @v1.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        serving.check_model(model_id)
        return model_card()

    @v1.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completions(body, request)

    @v1.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat(body, request)

    @v1.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = await serving.encode_chat(body.messages, body.add_generation_prompt)
        else:
            ids = await run_in_threadpool(serving.tokenizer.encode, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @v1.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        serving.check_model(body.model)
        vocab = serving.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await run_in_threadpool(serving.tokenizer.decode, body.tokens)}

    @v1.post("/forget")
    async def forget():
        """Speculative methods drop what they learnt from earlier requests (Proposer.forget: a
        pool of their tokens, acceptance rates), so that a benchmark repeating the same prompts
        measures each run afresh (as vLLM's benchmarks reset its prefix cache between runs)."""
        engine.forget()
        return {}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not engine.alive or engine.draining:
            raise APIError(503, "the engine is not running", type="server_error", code="unavailable")
        return {}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return bad_request(message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return server_error().response()


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable message from pydantic's errors: the first field's first error, or, when the
    field is a union (pydantic then reports every branch, each tagged with its type), the types
    it accepts."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc:
        return str(first.get("msg")), None
    field = loc[0]
    branches = []
    for e in errors:
        rest = [str(x) for x in e.get("loc", ()) if x != "body"]
        if len(rest) > 1 and rest[0] == field and _is_type_tag(rest[1]) and rest[1] not in branches:
            branches.append(rest[1])
    if len(branches) > 1:
        return f"{field}: expected one of {', '.join(branches)}", field
    return f"{'.'.join(loc)}: {first.get('msg')}", field


def _is_type_tag(segment: str) -> bool:
    return "[" in segment or segment in ("str", "int", "float", "bool", "dict", "list", "none")
