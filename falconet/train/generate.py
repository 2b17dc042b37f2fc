"""Batched generation outside the engine, on any device: training data for the trained drafters.

The engine's kernels, paged cache and scheduler are built for CPU serving. Collecting a drafter's
training data (the target's answers to thousands of prompts, with its hidden states) is plain
batched generation, which a GPU does in seconds; `generate` does it with the model's own forward
over a dense cache, so `falconet train-head --device cuda` collects and trains on the GPU.
Greedy output matches the engine's (tests/train/test_generate.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from falconet.engine.sampler import apply_top_p


class DenseKVCache:
    """Keys and values of a batch of left-padded sequences that advance in lockstep, stored
    contiguously per sequence ([layers, batch, kv heads, max_len, head_dim]). The model calls
    `attend` in every layer; `advance` moves past the step's tokens once the forward is done."""

    decode_only = False  # the model's general attention path: q, k, v -> attend

    def __init__(self, config, padding: torch.Tensor, max_len: int, dtype: torch.dtype, device):
        batch = len(padding)
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        # A sequence's keys before its padding count are masked out, except for a padding query
        # itself: a query that sees no key at all would make NaNs that reach the values.
        self.real_key = torch.arange(max_len, device=device)[None, :] >= padding.to(device)[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, kv_heads, _, dim = self.k.shape[1:]
        n = q.shape[0] // batch
        start, end = self.length, self.length + n
        self.k[layer, :, :, start:end] = k.view(batch, n, kv_heads, dim).transpose(1, 2)
        self.v[layer, :, :, start:end] = v.view(batch, n, kv_heads, dim).transpose(1, 2)
        query_pos = torch.arange(start, end, device=q.device)[:, None]
        key_pos = torch.arange(end, device=q.device)[None, :]
        mask = (key_pos <= query_pos) & (self.real_key[:, None, :end] | (key_pos == query_pos))
        o = F.scaled_dot_product_attention(
            q.view(batch, n, -1, dim).transpose(1, 2),
            self.k[layer, :, :, :end],
            self.v[layer, :, :, :end],
            attn_mask=mask[:, None],
            enable_gqa=True,
        )
        return o.transpose(1, 2).reshape(batch * n, -1, dim)

    def advance(self, n: int) -> None:
        self.length += n


@dataclasses.dataclass
class Generation:
    output_ids: list[int]
    # [len(prompt) + len(output_ids) - 1, hidden]: the final (normed) hidden state at every
    # position but the last, as the engine's hidden-state taps see them; None unless asked for.
    features: torch.Tensor | None = None


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_tokens: int,
    eos_ids=(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    features: bool = False,
) -> list[Generation]:
    """Each prompt's continuation (greedy, or sampled at `temperature` with nucleus `top_p`), up
    to `max_tokens` or an EOS token (kept), batched by similar length on the model's device."""
    device = model.embed_tokens.weight.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    for first in range(0, len(order), batch_size):
        chunk = order[first : first + batch_size]
        results = _generate_batch(
            model, [prompts[i] for i in chunk], max_tokens, eos, temperature, top_p, gen, features
        )
        for i, result in zip(chunk, results, strict=True):
            out[i] = result
    return out


def _generate_batch(model, prompts, max_tokens, eos, temperature, top_p, gen, features):
    device = model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    padding = torch.tensor([width - len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    dtype = model.embed_tokens.weight.dtype
    cache = DenseKVCache(model.config, padding, width + max_tokens, dtype, device)
    positions = (torch.arange(width, device=device)[None, :] - padding[:, None]).clamp(min=0)
    tokens = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    hidden_rows = []
    for _ in range(max_tokens):
        hidden = model.forward(ids.flatten(), positions.flatten(), cache).view(*ids.shape, -1)
        cache.advance(ids.shape[1])
        if features:
            hidden_rows.append(hidden)
        logits = model.compute_logits(hidden[:, -1])
        if temperature > 0:
            logits = apply_top_p(logits / temperature, torch.full((len(prompts),), top_p, device=device))
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]
        else:
            token = logits.argmax(-1)
        tokens = torch.cat([tokens, torch.where(done, 0, token)[:, None]], dim=1)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        ids, positions = tokens[:, -1:], positions[:, -1:] + 1
    states = torch.cat(hidden_rows, dim=1) if features else None
    results, stops = [], set(eos.tolist())
    for i, p in enumerate(prompts):
        row = tokens[i].tolist()
        stop = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        row = row[:stop]
        feats = None
        if features:
            pad = width - len(p)
            feats = states[i, pad : pad + len(p) + len(row) - 1].clone()
        results.append(Generation(row, feats))
    return results
