"""Our decoder's logits equal transformers' on tiny random Llama, Mistral and Qwen2 models."""

from __future__ import annotations

import pytest
import torch

from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import load_model

transformers = pytest.importorskip("transformers")

CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3-rope-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=500000.0,
        ),
    ),
    "llama-bias-headdim": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(attention_bias=True, mlp_bias=True, head_dim=32),
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "mistral-sliding": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=1000000.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny_pair(request, tmp_path_factory, tiny_llama_kwargs):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = config_cls(**{**tiny_llama_kwargs, **extra})
    ref = model_cls(config).eval()
    with torch.no_grad():  # random biases, so a dropped bias would show
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours = load_model(path, dtype=torch.float32, with_tokenizer=False).model
    return request.param, ref, ours


def test_logits_match_transformers(tiny_pair):
    name, ref, ours = tiny_pair
    torch.manual_seed(1)
    prompt = torch.randint(0, ours.config.vocab_size, (13,))
    steps = torch.randint(0, ours.config.vocab_size, (5,))

    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
        ref_logits, past = [out.logits[0]], out.past_key_values
        for t in steps:
            out = ref(t.view(1, 1), past_key_values=past, use_cache=True)
            ref_logits.append(out.logits[0])
            past = out.past_key_values
        ref_logits = torch.cat(ref_logits)

        # Block size 4 with a shuffled block table: the sequence spans non-contiguous blocks.
        cache = PagedKVCache(ours.config, num_blocks=16, block_size=4, dtype=torch.float32)
        table = [9, 2, 14, 0, 5, 11]
        cache.begin_step([Segment(table, 0, len(prompt))])
        logits = [ours.compute_logits(ours(prompt, torch.arange(len(prompt)), cache))]
        for i, t in enumerate(steps):
            cache.begin_step([Segment(table, len(prompt) + i, 1)])
            pos = torch.tensor([len(prompt) + i])
            logits.append(ours.compute_logits(ours(t.view(1), pos, cache)))
        logits = torch.cat(logits)

    assert logits.shape == ref_logits.shape
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"


def test_batched_sequences_match_single(tiny_pair):
    """Two sequences in one flattened forward give the same logits as each alone."""
    _, _, ours = tiny_pair
    torch.manual_seed(2)
    v = ours.config.vocab_size
    a, b = torch.randint(0, v, (9,)), torch.randint(0, v, (4,))
    with torch.no_grad():
        alone = []
        for seq in (a, b):
            cache = PagedKVCache(ours.config, 8, 4, torch.float32)
            cache.begin_step([Segment([0, 1, 2], 0, len(seq))])
            alone.append(ours.compute_logits(ours(seq, torch.arange(len(seq)), cache)))
        cache = PagedKVCache(ours.config, 8, 4, torch.float32)
        cache.begin_step([Segment([0, 1, 2], 0, len(a)), Segment([3, 4], 0, len(b))])
        both = ours.compute_logits(
            ours(torch.cat([a, b]), torch.cat([torch.arange(9), torch.arange(4)]), cache)
        )
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32(tiny_pair, tmp_path):
    name, ref, _ = tiny_pair
    ref.save_pretrained(tmp_path)
    ours16 = load_model(tmp_path, dtype=torch.bfloat16, with_tokenizer=False).model
    ours32 = load_model(tmp_path, dtype=torch.float32, with_tokenizer=False).model
    prompt = torch.arange(10)
    with torch.no_grad():
        res = []
        for m, dt in ((ours16, torch.bfloat16), (ours32, torch.float32)):
            cache = PagedKVCache(m.config, 4, 4, dt)
            cache.begin_step([Segment([0, 1, 2], 0, 10)])
            res.append(m.compute_logits(m(prompt, torch.arange(10), cache)))
    assert res[0].dtype == torch.float32
    assert (res[0] - res[1]).abs().max().item() < 0.1 * res[1].abs().max().item()
