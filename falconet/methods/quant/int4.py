"""Weight-only 4-bit linear layers: blockwise round to nearest with a scale and a minimum.

"The case for 4-bit precision: k-bit Inference Scaling Laws" (Dettmers & Zettlemoyer, 2023):
at a fixed number of model bits, 4-bit weights with small blocks (each block of weights with
its own scale) are the best trade; their zero-point (asymmetric) variant is what llama.cpp's
Q4_1 stores. Each run of `group_size` weights of an output row is q * d + m with q in [0, 15],
m the block's minimum and d = (max - min) / 15, d and m in fp16. On the default model, whose
GGUF is Q4_1 with blocks of 32 along the same rows, this finds each block's grid again (up to
the bf16 rounding of the loaded weights).

The output head keeps int8 (per output feature), as the GGUF keeps its Q8_0 head: at a quarter
of the model's weights it is read every token, and 4-bit there costs the most quality.
Activations stay bf16; the kernel (kernels/csrc/linear_bf16.cpp, linear_q4) never dequantizes:
it sums x * q per block with the bf16 dot-product instruction and applies d and m per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.methods.quant.base import QuantizedLinear
from falconet.methods.quant.int8 import Int8Linear
from falconet.models.linear import TILE


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (q uint8 [N, K] in 0..15, d fp16 [N, K/g], m fp16 [N, K/g]), W ~ q * d + m."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    scale = d.float().clamp(min=1e-12)
    q = torch.round((w - m.float()[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(n, k), d, m


def dequantize_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    g = k // d.shape[1]
    w = q.float().reshape(n, -1, g) * d.float()[..., None] + m.float()[..., None]
    return w.reshape(n, k)


def pack_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """The kernel's layout: bytes [tiles, K/4, 32] uint8, d and m [tiles, K/g, 16] fp16.

    Per tile of 16 outputs and pair of K, the 32 values run in the bf16 kernel's order (output,
    then the pair's two K); consecutive pairs share 32 bytes, the first in the low nibbles."""
    n, k = q.shape
    if k % 4:
        raise ValueError(f"in_features {k} is not a multiple of 4")
    tiles = -(-n // TILE)
    pad = tiles * TILE - n
    q = F.pad(q, (0, 0, 0, pad))
    values = q.view(tiles, TILE, k // 2, 2).permute(0, 2, 1, 3).reshape(tiles, k // 4, 2, 2 * TILE)
    packed = (values[:, :, 0] | (values[:, :, 1] << 4)).contiguous()
    scales = [
        F.pad(x.float(), (0, 0, 0, pad)).half().view(tiles, TILE, -1).transpose(1, 2).contiguous()
        for x in (d, m)
    ]
    return packed, scales[0], scales[1]


class Int4Linear(QuantizedLinear):
    """A Linear layer (the same in/out features and bias) over blockwise 4-bit weights."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, blocks: tuple | None = None):
        """`blocks`: the weight already as (q, d, m) (a GGUF's Q4_0/Q4_1 blocks), used as they are."""
        super().__init__(linear)
        self.group_size, self.tag = group_size, f"int4 g{group_size}"
        q, d, m = blocks if blocks is not None else quantize_int4(linear.weight, group_size)
        if q.shape != linear.weight.shape or d.shape != (q.shape[0], q.shape[1] // group_size):
            raise ValueError(
                f"4-bit blocks of shape {tuple(q.shape)} / {tuple(d.shape)} do not fit this layer"
            )
        self.register_buffer("qweight", q)  # uint8, one value per weight (the packed copy is below)
        self.d, self.m = d, m
        self._packed, self._d, self._m = pack_int4(q, d, m)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.d, self.m)

    def kernel_tensors(self):
        return [self._packed, self._d, self._m]

    def run_kernel(self, kernels, rows):
        return kernels.linear_q4(
            rows, self._packed, self._d, self._m, self.out_features, self._bias, self.group_size
        )


class Int4WeightOnly:
    """Blockwise 4-bit weights (scale and minimum per 32), the output head in int8."""

    name = "int4"
    paper = "The case for 4-bit precision: k-bit Inference Scaling Laws (Dettmers & Zettlemoyer, 2023)"
    exact = False
    group_size = 32

    @property
    def takes_gguf_blocks(self) -> bool:
        """Whether a GGUF's Q4_0/Q4_1 blocks (of 32) can be used as they are."""
        return self.group_size == 32

    def apply(self, model: nn.Module, blocks: dict[str, tuple] | None = None) -> nn.Module:
        """`blocks`: module name -> (q, d, m) already in this layout (a GGUF's 4-bit blocks of
        32, see loader.py), taken as they are instead of re-rounding the loaded weights."""
        head = getattr(model, "lm_head", None)
        blocks = blocks if self.group_size == 32 else None
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                # rows that blocks of group_size do not divide take the largest smaller block that does
                group = next((g for g in (self.group_size, 64, 32) if g <= self.group_size and
                              child.in_features % g == 0), None)  # fmt: skip
                if child is head or group is None:
                    setattr(parent, child_name, Int8Linear(child))
                    continue
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                found = (blocks or {}).get(name)
                setattr(parent, child_name, Int4Linear(child, group, found))
        return model


class Int4G64WeightOnly(Int4WeightOnly):
    """Blockwise 4-bit weights (scale and minimum per 64), the output head in int8."""

    name = "int4-g64"
    group_size = 64


class Int4G128WeightOnly(Int4WeightOnly):
    """Blockwise 4-bit weights (scale and minimum per 128, or 64 or 32 where a row's length is
    not a multiple of 128), the output head in int8."""

    name = "int4-g128"
    group_size = 128
