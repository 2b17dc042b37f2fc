"""Shared fixtures: the real default model (pulled once into the cache) and tiny random models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the model cache if missing."""
    from falconet.models.catalog import DEFAULT_MODEL, pull

    return pull(DEFAULT_MODEL, progress=False)


TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tiny_llama_kwargs() -> dict:
    """Config fields of the tiny test models (transformers' names)."""
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_hf():
    """A random-initialised transformers Llama (fixed seed), the reference for our model."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama_hf, tmp_path_factory):
    """`tiny_llama_hf` saved as a Hugging Face folder (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama64_dir(tmp_path_factory):
    """A tiny random Llama with head_dim 64 (the default model's), saved as a Hugging Face folder:
    the shape the CPU fast paths (tiled bf16 cache, flash prefill, paged decode) are built for."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    config = dict(TINY_LLAMA, hidden_size=256, intermediate_size=256, num_attention_heads=4)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    path = tmp_path_factory.mktemp("tiny-llama64")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def built_kernels():
    """Build the C++ kernels (about a minute the first time) before any test times a server or
    CLI subprocess, which would otherwise spend its start-up compiling them."""
    from falconet.kernels import cpu_kernels

    return cpu_kernels()


@pytest.fixture(scope="session")
def tiny_eagle_head_dir(tiny_llama_dir, tmp_path_factory):
    """An EAGLE head for the tiny Llama, briefly trained on its greedy answers to random prompts
    (some drafts are kept, some rejected: both paths of verification run)."""
    import random

    from falconet.methods.speculative.eagle import EagleHead, save_head
    from falconet.models.loader import load_model
    from falconet.train.distill_draft import draft_vocabulary
    from falconet.train.train_head import collect_features, train_head

    loaded = load_model(tiny_llama_dir, with_tokenizer=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(rng.randint(4, 12))] for _ in range(32)]
    examples = collect_features(loaded, prompts, 24)
    head = EagleHead(loaded.model, draft_vocabulary(examples, 64, 97, always=[2]))
    head.init_from_target()
    train_head(head, examples, steps=60, batch_size=16, lr=3e-3, log=None)
    path = tmp_path_factory.mktemp("tiny-eagle")
    save_head(head, path, {"note": "test"})
    return path


@pytest.fixture(scope="session")
def tiny_ppd_dir(tiny_llama_dir, tmp_path_factory):
    """Parallel Prompt Decoding's prompt tokens for the tiny Llama, briefly trained on its greedy
    answers to random prompts (some guesses kept, most rejected)."""
    import random

    import torch

    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.models.loader import load_model
    from falconet.sampling_params import SamplingParams
    from falconet.train.distill_draft import Example
    from falconet.train.train_prompts import save_prompts, train_prompt_tokens

    loaded = load_model(tiny_llama_dir, with_tokenizer=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(rng.randint(4, 12))] for _ in range(32)]
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=32))
    reqs = [
        engine.add_request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)) for p in prompts
    ]
    while engine.has_unfinished():
        engine.step()
    examples = [Example(r.all_ids, len(p)) for p, r in zip(prompts, reqs, strict=True)]
    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model
    embeddings, _ = train_prompt_tokens(
        target, examples, 3, steps=40, batch_size=8, num_anchors=8, lr=3e-2, log=None
    )
    path = tmp_path_factory.mktemp("tiny-ppd")
    save_prompts(path, embeddings, target.config, {"note": "test"})
    return path


@pytest.fixture(scope="session")
def tiny_transfer_dir(tiny_llama_dir, tmp_path_factory):
    """Hidden transfer's maps for the tiny Llama (transfer at layer 1 of 2), briefly trained on
    random prompts' greedy answers."""
    import random

    import torch

    from falconet.methods.speculative.hidden_transfer import TransferLayers, save_transfer
    from falconet.models.loader import load_model
    from falconet.train.distill_draft import Example
    from falconet.train.train_prompts import train_extra_rows
    from falconet.train.train_transfer import transfer_logits

    target = load_model(tiny_llama_dir, dtype=torch.float32, with_tokenizer=False).model.requires_grad_(False)
    rng = random.Random(1)
    examples = [Example([rng.randrange(97) for _ in range(30)], 10) for _ in range(16)]
    transfer = TransferLayers(3, target.config.hidden_size, 1)
    logits_of = lambda ids, anchors: transfer_logits(target, transfer, ids, anchors)  # noqa: E731
    train_extra_rows(logits_of, list(transfer.parameters()), examples, 3, 10, 8, 8, 1e-2, log=None)
    path = tmp_path_factory.mktemp("tiny-transfer")
    save_transfer(path, transfer, target.config, {"note": "test"})
    return path
