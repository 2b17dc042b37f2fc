"""Load, bounded in time: 64 concurrent streaming clients. Every request completes or gets an
explicit error, no token is lost or duplicated (each chunk carries exactly one token, checked
through its logprobs entry), and greedy outputs equal offline `LLM.generate` for the same prompts."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
from live import MODEL, slow_engine_class, start_server

from falconet import LLM, SamplingParams

CLIENTS = 64
MAX_TOKENS = 8
TIME_LIMIT_S = 90


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, 97)}" for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def expected(tiny_chat_dir):
    """Offline greedy outputs, as token strings, of completions and of chats over the same prompts."""
    llm = LLM(str(tiny_chat_dir), num_kv_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    prompts = make_prompts(CLIENTS)
    words = lambda out: [llm.tokenizer.decode([t]) for t in out.token_ids]  # noqa: E731
    completions = [words(o) for o in llm.generate(prompts, params)]
    chats = [words(o) for o in llm.chat([[{"role": "user", "content": p}] for p in prompts], params)]
    return prompts, completions, chats


async def stream_one(client: openai.AsyncOpenAI, prompt: str, chat: bool) -> list[str]:
    """The tokens of one streamed greedy request; asserts one token per content chunk."""
    common = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    common.update(stream=True, stream_options={"include_usage": True})
    tokens, text, usage = [], "", None
    if chat:
        messages = [{"role": "user", "content": prompt}]
        stream = await client.chat.completions.create(messages=messages, logprobs=True, **common)
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                if c.logprobs is not None:
                    assert len(c.logprobs.content) == 1
                    tokens.append(c.logprobs.content[0].token)
                text += c.delta.content or ""
    else:
        stream = await client.completions.create(prompt=prompt, logprobs=0, **common)
        async for chunk in stream:
            usage = chunk.usage or usage
            for c in chunk.choices:
                assert len(c.logprobs.tokens) == 1
                tokens.append(c.logprobs.tokens[0])
                text += c.text
    assert usage.completion_tokens == len(tokens)
    assert text == " ".join(tokens)  # the text is exactly the tokens, in order
    return tokens


async def run_clients(url: str, prompts: list[str]) -> list:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        jobs = [stream_one(client, p, chat=i % 4 == 3) for i, p in enumerate(prompts)]
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), TIME_LIMIT_S)


def check(results, expected) -> tuple[int, int]:
    """Every result is the offline output or a 429; returns (completed, rejected)."""
    prompts, completions, chats = expected
    completed = rejected = 0
    for i, res in enumerate(results):
        if isinstance(res, openai.RateLimitError):
            rejected += 1
            continue
        assert not isinstance(res, BaseException), f"request {i}: {res!r}"
        assert res == (chats if i % 4 == 3 else completions)[i], f"request {i}"
        completed += 1
    return completed, rejected


def test_64_streaming_clients(server, expected):
    results = asyncio.run(run_clients(server.url, expected[0]))
    assert check(results, expected) == (CLIENTS, 0)
    engine = server.engine.engine
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_64_clients_against_a_short_queue(tiny_chat_dir, expected):
    """With room for 8 running and 8 waiting, the rest are refused with 429, and only them."""
    s = start_server(tiny_chat_dir, max_queue=8, engine_cls=slow_engine_class(0.05))
    try:
        results = asyncio.run(run_clients(s.url, expected[0]))
    finally:
        s.stop()
    completed, rejected = check(results, expected)
    assert completed + rejected == CLIENTS
    assert completed >= 16 and rejected > 0
