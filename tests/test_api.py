"""End to end on the real SmolLM2-135M-Instruct GGUF: our greedy continuations equal transformers'."""

from __future__ import annotations

import pytest
import torch

from falconet import LLM, SamplingParams
from falconet.errors import FalconetError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Water boils at a temperature of",
]
STEPS = 32


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(str(default_gguf), dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()


def _hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


def test_greedy_matches_transformers(llm, hf_model):
    chat = llm.tokenizer.encode_chat([{"role": "user", "content": "Name a fruit that is yellow."}])
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS] + [chat]
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    ours = llm.generate(prompts, params)  # all six share each forward pass
    for ids, out in zip(prompts, ours, strict=True):
        assert out.token_ids == _hf_greedy(hf_model, ids, STEPS), llm.tokenizer.decode(ids)


def test_generate_returns_text_and_finish_reason(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0))[0]
    assert out.finish_reason in ("length", "stop")
    assert len(out.token_ids) <= 5
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.prompt == "The capital of France is"


def test_chat_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=64, temperature=0))
    assert out.finish_reason == "stop"
    assert out.text.strip()
    assert "<|im_end|>" not in out.text


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = llm.generate("Tell me a story.", p)[0].token_ids
    b = llm.generate(["Unrelated prompt here", "Tell me a story."], p)[1].token_ids
    assert a == b


def test_stream_equals_generate(llm):
    p = SamplingParams(max_tokens=24, temperature=0)
    streamed = "".join(llm.stream("Emoji test: 🦅🔥 and 日本語", p))
    assert streamed == llm.generate("Emoji test: 🦅🔥 and 日本語", p)[0].text


def test_prompt_longer_than_context_is_rejected(llm):
    with pytest.raises(FalconetError, match="context"):
        llm.generate([1] * 2000, SamplingParams(max_tokens=4))
    # the engine is still usable afterwards
    assert llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0))[0].token_ids


def test_stop_string_cuts_output(llm):
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate("The capital of France is", greedy)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    out = llm.generate("The capital of France is", SamplingParams(**{**greedy.__dict__, "stop": [stop]}))[0]
    assert (out.text, out.finish_reason, out.outputs[0].stop_reason) == (cut, "stop", stop)
    kept = SamplingParams(**{**greedy.__dict__, "stop": [stop], "include_stop_str_in_output": True})
    assert llm.generate("The capital of France is", kept)[0].text == cut + stop
    streamed = "".join(
        llm.stream("The capital of France is", SamplingParams(**{**greedy.__dict__, "stop": [stop]}))
    )
    assert streamed == cut


def test_n_samples_and_best_of(llm):
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=3)
    out = llm.generate("Tell me a story.", p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    single = llm.generate("Tell me a story.", SamplingParams(max_tokens=8, temperature=1.0, seed=3))[0]
    assert out.outputs[0].token_ids == single.token_ids
    best = llm.generate("Tell me a story.", SamplingParams(max_tokens=8, seed=3, best_of=4, logprobs=2))[0]
    assert len(best.outputs) == 1
    all_four = llm.generate("Tell me a story.", SamplingParams(max_tokens=8, seed=3, n=4, logprobs=2))[0]
    assert best.outputs[0].cumulative_logprob == max(c.cumulative_logprob for c in all_four.outputs)
    lps = best.outputs[0].logprobs
    assert len(lps) == len(best.outputs[0].token_ids)
    assert all(tok in d and len(d) <= 3 for tok, d in zip(best.outputs[0].token_ids, lps, strict=True))


def test_logit_bias_forces_token(llm):
    token = llm.tokenizer.encode(" falcon", add_special_tokens=False)[0]
    p = SamplingParams(max_tokens=4, temperature=0, logit_bias={token: 100.0})
    assert llm.generate("Hello", p)[0].token_ids == [token] * 4
    with pytest.raises(FalconetError, match="logit_bias"):
        llm.generate("Hello", SamplingParams(logit_bias={10**6: 1.0}))


def test_repetition_penalty_matches_transformers(llm, hf_model):
    ids = llm.tokenizer.encode("List the numbers: one, two, one, two,")
    ours = llm.generate(
        ids, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3, ignore_eos=True)
    )
    ref = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.3
    )
    assert ours[0].token_ids == ref[0, len(ids) :].tolist()
