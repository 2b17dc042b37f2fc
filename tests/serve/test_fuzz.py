"""Schema fuzzing with hypothesis: request bodies mixing plausible and hostile values (wrong types,
NaN, huge numbers, nested junk) never get a 5xx, every 4xx is an OpenAI error body, and a
stream that starts ends with [DONE] and no error event. Bounded: a fixed number of examples,
each generating at most a few tokens."""

from __future__ import annotations

import json

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from live import MODEL  # noqa: E402

EXAMPLES = 150

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
vocabulary = ["w5", "w17", "w96", "<s>", "</s>", "zz", " ", "日本"]
words = st.lists(st.sampled_from(vocabulary), max_size=12).map(" ".join)
huge = st.sampled_from([2**31, 2**63, 2**64, 10**30, -(2**63) - 1])
floats = st.floats(-3, 3) | st.floats(0, 1) | st.floats() | huge


def maybe(strategy):
    """The field's plausible values, three times in four; junk otherwise."""
    return st.integers(0, 3).flatmap(lambda i: junk if i == 0 else strategy)


SAMPLING = {
    "model": maybe(st.sampled_from([MODEL, "other", ""])),
    "n": maybe(st.integers(-1, 3) | huge),
    "temperature": maybe(floats),
    "top_p": maybe(floats),
    "top_k": maybe(st.integers(-3, 200) | huge),
    "min_p": maybe(floats),
    "seed": maybe(st.integers(-(2**65), 2**65)),
    "stop": maybe(words | st.lists(words, max_size=3)),
    "stop_token_ids": maybe(st.lists(st.integers(-2, 200) | huge, max_size=3)),
    "presence_penalty": maybe(floats),
    "frequency_penalty": maybe(floats),
    "repetition_penalty": maybe(floats),
    "logit_bias": maybe(st.dictionaries(st.integers(-2, 200).map(str) | st.text(max_size=3), floats)),
    "ignore_eos": maybe(st.booleans()),
    "skip_special_tokens": maybe(st.booleans()),
    "include_stop_str_in_output": maybe(st.booleans()),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "speculative": maybe(st.sampled_from(["eagle", "medusa"])),
    "user": junk,
    "unknown_field": junk,
}
COMPLETION = {
    **SAMPLING,
    "prompt": maybe(
        words | st.lists(st.integers(-2, 120), max_size=12) | st.lists(words, max_size=3)
        | st.lists(st.lists(st.integers(0, 96), max_size=4), max_size=3) | st.just(" ".join(["w5"] * 300))
    ),
    "logprobs": maybe(st.integers(-1, 25)),
    "echo": maybe(st.booleans()),
    "best_of": maybe(st.integers(0, 4)),
    "suffix": maybe(words),
}  # fmt: skip
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))},
    optional={
        "content": maybe(words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}))),
        "name": maybe(words),
    },
)
CHAT = {
    **SAMPLING,
    "messages": maybe(st.lists(message, max_size=4)),
    "max_completion_tokens": maybe(st.integers(-1, 4)),
    "logprobs": maybe(st.booleans()),
    "top_logprobs": maybe(st.integers(-1, 25)),
    "tools": maybe(st.lists(junk, max_size=1)),
    "response_format": maybe(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
}


def bodies(fields: dict, required: dict):
    """Objects with the `required` fields and any of the others."""
    optional = {k: v for k, v in fields.items() if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


# Generation stays short: max_tokens is always there, and when it is a valid number it is small.
SHORT = maybe(st.integers(1, 4))
JSON = {"content-type": "application/json"}


def check(server, path: str, body) -> None:
    content = json.dumps(body).encode()  # NaN and Infinity included, as Python writes them
    with httpx.stream("POST", server.url + path, content=content, headers=JSON, timeout=60) as res:
        text = res.read().decode()
    assert res.status_code < 500, text
    assert "Traceback" not in text
    hypothesis.event(f"status {res.status_code}")
    if res.status_code >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif res.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"error"' in e for e in events[:-1]), text
    else:
        assert json.loads(text)["choices"]


FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(body=bodies(COMPLETION, {"prompt": COMPLETION["prompt"], "max_tokens": SHORT}) | junk)
def test_completions_never_5xx(server, body):
    check(server, "/v1/completions", body)


@FUZZ
@given(body=bodies(CHAT, {"messages": CHAT["messages"], "max_tokens": SHORT}) | junk)
def test_chat_never_5xx(server, body):
    check(server, "/v1/chat/completions", body)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/tokenize", "/detokenize"]),
    body=st.fixed_dictionaries(
        {}, optional={"prompt": maybe(words), "messages": maybe(st.lists(message, max_size=2)),
                      "tokens": maybe(st.lists(st.integers(-5, 200) | huge, max_size=5))},
    ) | junk,
)  # fmt: skip
def test_tokenize_never_5xx(server, path, body):
    check_plain(server, path, body)


def check_plain(server, path: str, body) -> None:
    res = httpx.post(server.url + path, content=json.dumps(body), headers=JSON)
    assert res.status_code < 500, res.text
    if res.status_code >= 400:
        assert set(res.json()["error"]) == {"message", "type", "param", "code"}


# Plausible values only: most of these requests are served, which exercises the combinations
# (n, best_of, logprobs, stop strings, echo, penalties, streaming) rather than the validation.
text = words.filter(str.strip)
PLAUSIBLE = {
    "model": st.just(MODEL),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**63 - 1),
    "stop": text | st.lists(text, max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 96), max_size=2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 100),
    "logit_bias": st.dictionaries(st.integers(0, 96).map(str), st.floats(-100, 100), max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
}
PLAUSIBLE_COMPLETION = {
    **PLAUSIBLE,
    "logprobs": st.integers(0, 20),
    "echo": st.booleans(),
    "best_of": st.integers(1, 4),
}
PLAUSIBLE_CHAT = {**PLAUSIBLE, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}
token_ids = st.lists(st.integers(0, 96), min_size=1, max_size=12)
prompts = text | token_ids | st.lists(text, min_size=1, max_size=2)
plausible_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": words}),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    completion=bodies(PLAUSIBLE_COMPLETION, {"prompt": prompts, "max_tokens": st.integers(1, 4)}),
    chat=bodies(PLAUSIBLE_CHAT, {"messages": plausible_messages, "max_tokens": st.integers(1, 4)}),
)
def test_plausible_requests_never_5xx(server, path, completion, chat):
    check(server, path, completion if path == "/v1/completions" else chat)
