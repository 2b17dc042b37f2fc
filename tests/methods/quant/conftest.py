"""Shared by the quantization tests: how far a quantized model's predictions move."""

from __future__ import annotations

import pytest
import torch

from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import load_model


@pytest.fixture
def next_token_kl(tiny_llama64_dir):
    """kl(quantization, dtype): the largest per-position KL divergence of the quantized tiny
    model's next-token distribution from the unquantized one's, over 40 random tokens; also
    returns the quantized model."""

    def kl(quantization: str, dtype: torch.dtype):
        ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0))
        logprobs = []
        for method in (None, quantization):
            model = load_model(tiny_llama64_dir, dtype=dtype, with_tokenizer=False, quantization=method).model
            cache = PagedKVCache(model.config, 8, 16, dtype)
            cache.begin_step([Segment(list(range(8)), 0, 40)])
            with torch.no_grad():
                logprobs.append(
                    torch.log_softmax(model.compute_logits(model(ids, torch.arange(40), cache)), -1)
                )
        return (logprobs[0].exp() * (logprobs[0] - logprobs[1])).sum(-1).max().item(), model

    return kl
