"""Linear layers that run on falconet's packed-weight bf16 kernel where it exists.

torch's bf16 matmul reads the weights at about half the memory bandwidth at decode batch
sizes (a few to a few dozen rows), and a decode step is mostly weight reading. `Linear` keeps
nn.Linear's parameters and semantics; on CPUs with AVX512-BF16 its bf16 forward goes through
`linear_bf16` (kernels/csrc/linear_bf16.cpp) over a copy of the weight repacked for that kernel,
made on first use and remade whenever the weight changes. Anything else (float32, other
devices, no kernels) is plain F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.kernels import cpu_kernels

TILE = 16  # output features per tile of the packed layout


def pack_weight_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K/2, 16, 2]: tiles of 16 output rows, K in interleaved pairs."""
    n, k = weight.shape
    tiles = -(-n // TILE)
    padded = F.pad(weight, (0, 0, 0, tiles * TILE - n))
    return padded.view(tiles, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def bf16_linear_kernels():
    """The kernel module if it can run bf16 linears here, else None."""
    k = cpu_kernels()
    return k if k is not None and k.has_bf16_linear() else None


class Linear(nn.Linear):
    _packed: tuple | None = None  # (weight version, weight data pointer, packed weight, float32 bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is torch.bfloat16 and x.device.type == "cpu" and self.in_features % 2 == 0:
            kernels = bf16_linear_kernels()
            if kernels is not None and self.weight.dtype is torch.bfloat16:
                packed, bias = self._packed_weight()
                rows = x.reshape(-1, self.in_features)
                if rows.stride(-1) != 1:
                    rows = rows.contiguous()
                out = kernels.linear_bf16(rows, packed, self.out_features, bias)
                return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # A compiled model's weights do not change; compiled.py packs them before tracing.
            return self._packed[2], self._packed[3]
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed is None or self._packed[:2] != key:
            # Made outside inference mode so the copy is an ordinary tensor usable anywhere.
            with torch.inference_mode(False), torch.no_grad():
                packed = pack_weight_bf16(w.detach())
                bias = torch.empty(0)
                if self.bias is not None:
                    bias = F.pad(self.bias.detach().float(), (0, packed.shape[0] * TILE - self.out_features))
            self._packed = (*key, packed, bias)
        return self._packed[2], self._packed[3]
