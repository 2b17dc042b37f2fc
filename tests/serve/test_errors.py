"""Every refusal is an OpenAI error body with the right status, never a traceback: 400 for bad
values (naming the field), prompts past the context (naming the limit) and unknown methods;
404 for an unknown model or route; 401 for a wrong key; 429 + Retry-After for a full queue;
500 (or an error event mid-stream) when the engine itself fails, after which it keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest
from live import MODEL, slow_engine_class, start_server, wait_until

from falconet.methods.registry import SPECULATIVE_METHODS
from falconet.methods.speculative.ngram import NgramProposer

MESSAGES = [{"role": "user", "content": "w5"}]


def error_of(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    assert "Traceback" not in res.text
    body = res.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture()
def post(server):
    def post(path: str, **kwargs) -> httpx.Response:
        return httpx.post(server.url + path, timeout=30, **kwargs)

    return post


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"temperature": -1}, "temperature", "temperature must be >= 0"),
        ({"top_p": 0}, "top_p", "top_p"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be a positive integer"),
        ({"best_of": 1, "n": 2}, "best_of", "best_of must be an integer >= n"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 1000}}, "logit_bias", "less than or equal to 100"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"seed": 2**64}, "seed", "less than or equal to"),
        ({"prompt": 5}, "prompt", "expected one of str, list[str], list[int], list[list[int]]"),
        ({"prompt": []}, "prompt", "must not be empty"),
        ({"prompt": [1, 500]}, "prompt", "[0, 97)"),
        ({"prompt": [[5, 6], []]}, "prompt", "the prompt is empty"),
        ({"stream": True, "best_of": 3}, "best_of", "cannot be streamed"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "needs stream"),
        ({"suffix": "w5"}, "suffix", "not supported"),
        ({"logprobs": 1, "echo": True}, "echo", "not supported"),
    ],
)
def test_completion_400(post, body, param, needle):
    error = error_of(post("/v1/completions", json={"model": MODEL, "prompt": "w5", **body}), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert needle in error["message"]


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "text"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "text"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "positive"),
    ],
)
def test_chat_400(post, body, param, needle):
    error = error_of(post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **body}), 400)
    assert error["param"] == param
    assert needle in error["message"]


def test_prompt_longer_than_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=" ".join(["w5"] * 300), max_tokens=4)
    assert e.value.status_code == 400
    error = e.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "maximum context length is 256 tokens" in error["message"]
    assert "300 in the prompt" in error["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=255)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w7 " * 260}])
    assert e.value.body["param"] == "messages"


def test_unknown_method_lists_the_valid_ones(post):
    body = {"model": MODEL, "prompt": "w5", "max_tokens": 2, "speculative": "eagle-x"}
    error = error_of(post("/v1/completions", json=body), 400)
    assert error["param"] == "speculative" and error["code"] == "unknown_method"
    assert "unknown speculative method 'eagle-x'" in error["message"]
    assert "valid: " in error["message"] and "ngram" in error["message"]
    chat = {"model": MODEL, "messages": MESSAGES, "decoding_strategy": "beam"}
    error = error_of(post("/v1/chat/completions", json=chat), 400)
    assert "unknown decoding strategy 'beam'" in error["message"]
    # a method that cannot run here (no draft model given to the server) is a 400 too
    error = error_of(post("/v1/completions", json={**body, "speculative": "draft-model"}), 400)
    assert "needs a draft model" in error["message"]
    SPECULATIVE_METHODS.register("ngram-test", NgramProposer)
    try:
        error = error_of(post("/v1/completions", json=body), 400)
        assert "ngram-test" in error["message"]
        reply = post("/v1/completions", json={**body, "speculative": "ngram-test"})
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["speculative_metrics"]["method"] == "ngram-test"
    finally:
        SPECULATIVE_METHODS.unregister("ngram-test")


def test_malformed_bodies(post):
    assert error_of(post("/v1/completions", content=b"{not json", headers=JSON), 400)["message"].startswith(
        "invalid JSON"
    )
    for body in (b"[]", b'"w5"', b"null", b"{}"):
        error_of(post("/v1/completions", content=body, headers=JSON), 400)
    error_of(post("/v1/chat/completions", content=b"\xff\xfe", headers=JSON), 400)


JSON = {"content-type": "application/json"}


def test_unknown_model_404(client, post):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="w5", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    error_of(post("/tokenize", json={"model": "gpt-4", "prompt": "w5"}), 404)


def test_unknown_route_and_method(server, post):
    error_of(post("/v1/embeddings", json={}), 404)
    error_of(httpx.get(server.url + "/v1/completions"), 405)


def test_tokenize_errors(post):
    error_of(post("/tokenize", json={}), 400)
    error_of(post("/tokenize", json={"prompt": "w5", "messages": MESSAGES}), 400)
    assert "[0, 97)" in error_of(post("/detokenize", json={"tokens": [5, 97]}), 400)["message"]


# --- API key -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_chat_dir):
    s = start_server(tiny_chat_dir, api_key="sesame")
    yield s
    s.stop()


def test_api_key(keyed_server):
    url = keyed_server.url
    body = {"model": MODEL, "prompt": "w5", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        error = error_of(httpx.post(url + "/v1/completions", json=body, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    error_of(httpx.get(url + "/v1/models"), 401)
    error_of(httpx.post(url + "/tokenize", json={"prompt": "w5"}), 401)
    error_of(httpx.post(url + "/forget"), 401)  # what the server learnt is not anyone's to drop
    assert httpx.post(url + "/forget", headers={"Authorization": "Bearer sesame"}).json() == {}
    error_of(httpx.post(url + "/v1/completions", json={"bad": 1}), 401)  # the key is checked first
    assert httpx.get(url + "/health").status_code == 200  # probes and scrapes need no key
    assert httpx.get(url + "/metrics").status_code == 200
    with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    with openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0) as c:
        assert c.completions.create(**body).usage.completion_tokens >= 1


# --- full queue ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_server(tiny_chat_dir):
    """One running sequence, one waiting: the third concurrent request finds the queue full."""
    s = start_server(tiny_chat_dir, max_queue=1, max_num_seqs=1, engine_cls=slow_engine_class(0.02))
    yield s
    s.stop()


def test_full_queue_429(one_slot_server):
    url = one_slot_server.url
    long = {"model": MODEL, "prompt": "w5", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)  # it is running
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # admitted, waiting for the slot
                res = http.post("/v1/completions", json={**long, "stream": False})
                error = error_of(res, 429)
                assert error["code"] == "queue_full" and int(res.headers["Retry-After"]) >= 1
                with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
                    with pytest.raises(openai.RateLimitError):
                        c.completions.create(model=MODEL, prompt="w5", max_tokens=2)
                # more samples than running slots and queue together can never be admitted: 400, not 429
                too_many = http.post("/v1/completions", json={**long, "stream": False, "n": 3})
                error = error_of(too_many, 400)
                assert "holds 1 running and the queue 1" in error["message"] and error["param"] == "n"
    engine = one_slot_server.engine.engine
    assert wait_until(lambda: not engine.has_unfinished())  # both streams were aborted on close
    res = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "w5", "max_tokens": 2})
    assert res.status_code == 200  # and the queue has room again


# --- engine failure ------------------------------------------------------------------------


def failing_engine_class():
    """An engine whose step raises while `fail` is set."""
    from falconet.engine.engine import LLMEngine

    class FailingEngine(LLMEngine):
        fail = False

        def step(self):
            if FailingEngine.fail:
                raise RuntimeError("injected fault")
            return super().step()

    return FailingEngine


def test_engine_failure_is_500_and_the_server_recovers(tiny_chat_dir):
    cls = failing_engine_class()
    s = start_server(tiny_chat_dir, engine_cls=cls)
    try:
        body = {"model": MODEL, "prompt": "w5", "max_tokens": 3}
        cls.fail = True
        error = error_of(httpx.post(s.url + "/v1/completions", json=body), 500)
        assert error["type"] == "server_error" and "injected" not in error["message"]
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as res:
            lines = [line for line in res.iter_lines() if line.startswith("data: ")]
        assert '"server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        cls.fail = False
        assert httpx.post(s.url + "/v1/completions", json=body).status_code == 200
        engine = s.engine.engine
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        s.stop()
