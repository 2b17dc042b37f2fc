"""Rotary position embeddings (RoFormer), with the linear and Llama 3 frequency scalings."""

from __future__ import annotations

import math

import torch

from falconet.config import ModelConfig
from falconet.errors import FalconetError
from falconet.kernels import cpu_kernels


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "freq_factors":  # llama.cpp stores Llama 3 scaling as explicit per-frequency divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    raise FalconetError(f"unsupported rope scaling type {kind!r}")


def _llama3_frequencies(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (rotate-half layout)."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = inverse_frequencies(config)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotated q, k: in place by the C++ kernel where available, else new tensors."""
        cpu = q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
        kernels = cpu_kernels() if cpu and positions.dtype == torch.long else None
        if kernels is not None:
            kernels.rope_(q, k, positions, self.cos, self.sin)
            return q, k
        return self(positions, q, k)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, H, D], k: [T, Hkv, D], positions: [T] -> rotated q, k."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
