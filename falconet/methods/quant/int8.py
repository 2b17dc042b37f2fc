"""Weight-only int8 linear layers: one scale per output feature, round to nearest.

As in gpt-fast's int8 path (and LLM.int8()'s vector-wise quantization without its outlier
split, Dettmers et al., 2022): W ~ scale[n] * q[n, k] with q in [-127, 127] and
scale[n] = max_k |W[n, k]| / 127. Activations stay bf16. Batch-1 decode reads every weight
once per token, so half the bytes of bf16 is up to twice the tokens/s; the kernel
(kernels/csrc/linear_bf16.cpp, linear_int8) widens each int8 tile to bf16 in registers.
Elsewhere (float32 activations, no AVX512-BF16) the layer multiplies by the dequantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.methods.quant.base import QuantizedLinear
from falconet.models.linear import TILE, pack_weight_bf16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scale [N]) with W ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(QuantizedLinear):
    """A Linear layer (the same in/out features and bias) over int8 weights."""

    tag = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        pad = -(-self.out_features // TILE) * TILE - self.out_features
        self._packed = pack_weight_bf16(q) if self.in_features % 2 == 0 else None
        self._scale = F.pad(scale, (0, pad))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def kernel_tensors(self):
        return [self.qweight, self._scale]

    def run_kernel(self, kernels, rows):
        if self._packed is None:
            return None
        return kernels.linear_int8(rows, self._packed, self._scale, self.out_features, self._bias)


class Int8WeightOnly:
    """Weight-only int8 per output channel (round to nearest), every linear layer incl. the head."""

    name = "int8"
    paper = (
        "weight-only int8 per output channel (gpt-fast; LLM.int8(), Dettmers et al., 2022, without outliers)"
    )
    exact = False

    def apply(self, model: nn.Module) -> nn.Module:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, Int8Linear(child))
        return model
