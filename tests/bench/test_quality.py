"""`falconet bench quality`'s measures: perplexity against transformers' loss, and agreement."""

from __future__ import annotations

import math

import torch

from falconet.bench.quality import agreement, held_out_text, perplexity
from falconet.models.loader import load_model


def test_perplexity_is_transformers_loss(tiny_llama_hf, tiny_llama_dir):
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(0))
    ours = perplexity(load_model(tiny_llama_dir, with_tokenizer=False).model, ids.tolist(), window=200)
    with torch.no_grad():
        loss = tiny_llama_hf(ids[None], labels=ids[None]).loss.item()
    assert math.isclose(ours, math.exp(loss), rel_tol=1e-4)
    # in windows, each window's first token is not predicted: a different, higher-or-equal count
    assert perplexity(load_model(tiny_llama_dir, with_tokenizer=False).model, ids.tolist(), window=50) > 1


def test_agreement_counts_identical_answers_and_shared_prefixes():
    assert agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == (0.5, 0.75)
    assert agreement([[1, 2, 3, 4]], [[9]]) == (0.0, 0.0)
    assert len(held_out_text()) > 10_000  # the shipped prompts' text
