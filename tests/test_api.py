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
