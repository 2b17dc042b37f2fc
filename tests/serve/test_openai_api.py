"""The endpoints through the official `openai` client against a live server: completions, chat,
streaming, n > 1, logprobs, stop strings, usage; plus /tokenize, /detokenize, /health, /metrics."""

from __future__ import annotations

import httpx
import pytest
from live import MODEL, metric

from falconet import LLM, SamplingParams

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPT = "w10 w11 w12 w13"
MESSAGES = [{"role": "system", "content": "w20"}, {"role": "user", "content": "w21 w22"}]


@pytest.fixture(scope="module")
def llm(tiny_chat_dir):
    """The offline reference for the same model."""
    return LLM(str(tiny_chat_dir), num_kv_blocks=128)


def offline(llm, prompt, max_tokens, **kwargs):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)
    return llm.generate(prompt, params)[0]


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_equals_offline(client, llm):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, **GREEDY)
    ref = offline(llm, PROMPT, 7)
    assert res.object == "text_completion" and res.model == MODEL
    assert res.choices[0].text == ref.text
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == 4
    assert res.usage.completion_tokens == 7 and res.usage.total_tokens == 11


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_batch_of_prompts(client, llm, as_ids):
    prompts = [PROMPT, "w40 w41"]
    sent = [llm.tokenizer.encode(p) for p in prompts] if as_ids else prompts
    res = client.completions.create(model=MODEL, prompt=sent, max_tokens=3, n=2, **GREEDY)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]  # prompt * n + sample
    assert [c.text for c in res.choices] == [offline(llm, p, 3).text for p in prompts for _ in range(2)]
    assert res.usage.prompt_tokens == 6 and res.usage.completion_tokens == 12


def test_completion_token_ids_prompt(client, llm):
    res = client.completions.create(model=MODEL, prompt=[10, 11, 12, 13], max_tokens=3, **GREEDY)
    assert res.choices[0].text == offline(llm, PROMPT, 3).text


def test_default_model_and_echo(server, llm):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "ignore_eos": True}
    res = httpx.post(server.url + "/v1/completions", json=body).json()  # no "model": the served one
    assert res["choices"][0]["text"] == PROMPT + offline(llm, PROMPT, 3).text


def test_chat_equals_offline(client, llm):
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ref = llm.chat(MESSAGES, params)
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.text
    assert res.usage.prompt_tokens == len(ref.prompt_token_ids) == 8  # w3 w20 w6 w4 w21 w22 w6 w5
    assert res.usage.completion_tokens == 6


def test_chat_default_max_tokens_fills_the_context(client, server):
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert res.choices[0].finish_reason == "length"
    assert res.usage.total_tokens == server.engine.max_model_len


def test_streaming_completion(client, llm):
    usage = {"include_usage": True}
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, stream=True, stream_options=usage, **GREEDY
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline(llm, PROMPT, 6).text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_n2(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, n=2, seed=3, temperature=1.0, stream=True
    )
    texts, roles, finishes = {0: "", 1: ""}, {}, {}
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] = c.delta.role
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert set(finishes) == {0, 1}
    # the same seed gives the same samples without streaming
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=2, seed=3)
    assert [c.message.content for c in res.choices] == [texts[0], texts[1]]


def test_n_seeded_samples_differ(client):
    res = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, n=3, seed=1, temperature=1.0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert len({c.text for c in res.choices}) > 1
    assert res.usage.completion_tokens == 24


def test_best_of_returns_the_most_likely(client):
    common = dict(model=MODEL, prompt=PROMPT, max_tokens=4, seed=5, extra_body={"ignore_eos": True})
    best = client.completions.create(best_of=4, n=1, logprobs=0, **common).choices[0]
    every = client.completions.create(n=4, logprobs=0, **common).choices
    totals = [sum(c.logprobs.token_logprobs) for c in every]
    assert sum(best.logprobs.token_logprobs) == pytest.approx(max(totals))


def test_completion_logprobs(client, llm):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=3, **GREEDY)
    lp = res.choices[0].logprobs
    ref = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert lp.tokens == [llm.tokenizer.decode([t]) for t in ref.token_ids]
    chosen = [d[t] for d, t in zip(ref.outputs[0].logprobs, ref.token_ids, strict=True)]
    assert lp.token_logprobs == pytest.approx(chosen)
    for top, token in zip(lp.top_logprobs, lp.tokens, strict=True):
        assert 3 <= len(top) <= 4 and token in top  # the chosen token plus the top 3
    text = res.choices[0].text  # "wA wB wC wD": each token after the first is " wN"
    assert lp.text_offset == [0] + [i for i, ch in enumerate(text) if ch == " "]


def test_streamed_logprobs_match(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=1, **GREEDY)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)]
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [x for c in chunks for x in c.token_logprobs] == pytest.approx(whole.token_logprobs)
    assert [x for c in chunks for x in c.text_offset] == whole.text_offset


def test_chat_logprobs(client):
    res = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = res.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
    assert "".join(e.token for e in content).replace("w", " w").strip() == res.choices[0].message.content


def test_stop_string(client, llm):
    full = offline(llm, PROMPT, 8).text  # e.g. "w88 w12 w45 ..."
    stop = full.split()[2]
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stop=[stop], **GREEDY)
    choice = res.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, stop=stop, **GREEDY)
    streamed = client.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_stop_token_ids_and_extra_sampling_fields(client, llm):
    ids = offline(llm, PROMPT, 8).token_ids
    res = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [ids[3]], "top_k": 5, "min_p": 0.01,
                    "repetition_penalty": 1.0},
    )  # fmt: skip
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.completion_tokens == ids.index(ids[3]) + 1


def test_penalties_and_logit_bias_change_the_output(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **GREEDY).choices[0].text
    biased = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logit_bias={"50": 100}, **GREEDY
    ).choices[0]
    assert biased.text == "w50 w50 w50 w50" != plain
    unpenalised = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logit_bias={"50": 5}, **GREEDY
    ).choices[0]
    assert unpenalised.text == "w50 w50 w50 w50"
    penalised = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logit_bias={"50": 5},
        frequency_penalty=2, presence_penalty=2, **GREEDY,
    ).choices[0]  # fmt: skip
    assert penalised.text.count("w50") < 4


def test_tokenize_detokenize(server, llm):
    url = server.url
    res = httpx.post(url + "/tokenize", json={"prompt": PROMPT}).json()
    assert res == {"count": 4, "max_model_len": 256, "tokens": [10, 11, 12, 13]}
    chat = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(MESSAGES)
    assert httpx.post(url + "/detokenize", json={"tokens": [10, 11]}).json() == {"prompt": "w10 w11"}


def test_health_and_metrics(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    before = metric(server, "falconet_generation_tokens_total")
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "falconet_num_requests_running",
        "falconet_num_requests_waiting",
        "falconet_time_to_first_token_seconds_bucket",
        "falconet_time_per_output_token_seconds_bucket",
        "falconet_generation_tokens_per_second",
        "falconet_kv_cache_usage_ratio",
        "falconet_prefix_cache_hit_rate",
    ):
        assert name in text
    assert metric(server, "falconet_generation_tokens_total") == before + 5
    assert metric(server, "falconet_generation_tokens_per_second") > 0


def test_prefix_cache_hit_rate_is_reported(client, server):
    prompt = " ".join(f"w{i}" for i in range(10, 60))  # 50 tokens: three full blocks of 16
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY)
    assert metric(server, "falconet_prefix_cache_hit_rate") > 0


def test_speculative_requests_stream_and_report(client, server, llm):
    """A speculative request (several tokens per step) streams every token once, ends once, and
    returns the same text as plain decoding; its metrics come back in the response and /metrics."""
    prompt = "w10 w11 w12 w10 w11 w12 w10 w11 w12 w10 w11"  # repeats: n-gram lookup drafts
    spec = {"speculative": "ngram", "num_speculative_tokens": 3, "ignore_eos": True}
    ref = offline(llm, prompt, 24)
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body=spec)
    assert res.choices[0].text == ref.text
    metrics = res.choices[0].model_extra["speculative_metrics"]  # the extension field
    assert metrics["method"] == "ngram" and metrics["num_steps"] > 0
    assert metrics["num_drafted_tokens"] >= metrics["num_accepted_tokens"] > 0
    before = metric(server, "falconet_spec_decode_num_draft_tokens_total")
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True, extra_body=spec
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks].count("length") == 1
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].model_extra["speculative_metrics"] == metrics  # same greedy run
    assert metric(server, "falconet_spec_decode_num_draft_tokens_total") > before
    assert metric(server, "falconet_spec_decode_num_accepted_tokens_total") > 0
