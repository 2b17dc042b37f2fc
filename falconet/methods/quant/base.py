"""What every quantized linear layer shares: nn.Linear's interface, our kernel for bf16 inputs
on the CPU, and the dequantized weight everywhere else (float32 inputs, no AVX512-BF16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.models.linear import TILE, bf16_linear_kernels


class QuantizedLinear(nn.Module):
    """Subclasses quantize in __init__ and implement `dequantize` and `run_kernel`."""

    tag = ""  # shown by repr

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        # the kernels take a float32 bias padded to whole tiles of 16 outputs (empty: none)
        pad = -(-self.out_features // TILE) * TILE - self.out_features
        self._bias = torch.empty(0) if self.bias is None else F.pad(self.bias.float(), (0, pad))
        self._dequantized: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """The weight the quantized values stand for, [out, in] float32."""
        raise NotImplementedError

    def run_kernel(self, kernels, rows: torch.Tensor) -> torch.Tensor | None:
        """rows [M, in] bf16, contiguous rows -> [M, out] bf16; None if the kernel cannot."""
        raise NotImplementedError

    def kernel_tensors(self) -> list[torch.Tensor]:
        """What the kernel reads each forward (weights and their scales)."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kernel_tensors())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dequantized is None or self._dequantized.dtype != dtype:
            self._dequantized = self.dequantize().to(dtype)
        return self._dequantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = bf16_linear_kernels()
        if kernels is not None and x.dtype is torch.bfloat16 and x.device.type == "cpu":
            rows = x.reshape(-1, self.in_features)
            out = self.run_kernel(kernels, rows if rows.stride(-1) == 1 else rows.contiguous())
            if out is not None:
                return out.view(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.tag}"
