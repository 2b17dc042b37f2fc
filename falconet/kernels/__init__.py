"""C++ CPU kernels, compiled on first use with torch.utils.cpp_extension.

torch caches the build (under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
rebuilds only when the sources or flags change. Everything here has a pure-PyTorch fallback:
set FALCONET_KERNELS=0 to use it, and it is used (with a warning) when no compiler is found.

Eager code calls the module's pybind11 functions. While torch.compile traces (the compiled
decode step, models/compiled.py), `cpu_kernels()` answers with the same kernels as registered
operators, torch.ops.falconet.* (ops.cpp), which a graph can hold.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "bindings.cpp",
        "paged_attention.cpp",
        "paged_attention_bf16.cpp",
        "prefill_attention.cpp",
        "linear_bf16.cpp",
        "fused_ops.cpp",
        "ops.cpp",
        "top_k.cpp",
    )
]
# One build per Python environment: torch keys its build folder by this name alone, and two
# environments sharing one folder rebuild it back and forth (their include paths differ),
# each waiting on the other's lock.
_NAME = "falconet_cpu_kernels_" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]


def kernels_enabled() -> bool:
    return os.environ.get("FALCONET_KERNELS", "1") != "0"


def cpu_kernels():
    """The compiled module, or None (disabled, or the build failed); its operators while
    torch.compile traces."""
    if torch.compiler.is_compiling():
        return _traced
    return _module()


@functools.cache
def _module():
    global _traced
    module = _build()
    if module is not None:
        _traced = _TracedKernels(module)
    return module


_traced = None


class _TracedKernels:
    """What traced code sees as the kernel module: the operators, and the build's answers to
    `has_*` as constants (a graph cannot call the pybind11 functions)."""

    def __init__(self, module):
        ops = torch.ops.falconet
        for name in ("linear_bf16", "linear_int8", "linear_q4", "silu_mul", "decode_attention"):
            setattr(self, name, getattr(ops, name))
        self._bf16_linear = module.has_bf16_linear()
        _register_fakes()

    def has_bf16_linear(self) -> bool:
        return self._bf16_linear

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is None:
            return torch.ops.falconet.rms_norm(x, weight, eps)
        return torch.ops.falconet.add_rms_norm(x, residual, weight, eps)


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k largest entries, largest first ([rows, n] -> [rows, k]): the C++
    kernel for float32 CPU rows (ties: lower index first), torch.topk otherwise."""
    module = cpu_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 else None
    if module is None or not 1 <= k <= x.shape[1]:
        return torch.topk(x, k, dim=-1).indices
    return module.top_k_rows(x, k)


def _register_fakes() -> None:
    """Shapes and dtypes of the operators' outputs, for tracing (no data is read)."""
    lib = "falconet::"

    def rows_out(x, out_features):
        return x.new_empty(x.shape[0], out_features)

    torch.library.register_fake(lib + "linear_bf16")(lambda x, packed, n, bias: rows_out(x, n))
    torch.library.register_fake(lib + "linear_int8")(lambda x, packed, scale, n, bias: rows_out(x, n))
    torch.library.register_fake(lib + "linear_q4")(lambda x, packed, d, m, n, bias, group: rows_out(x, n))
    torch.library.register_fake(lib + "rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake(lib + "add_rms_norm")(lambda x, residual, weight, eps: torch.empty_like(x))
    torch.library.register_fake(lib + "silu_mul")(lambda gu: gu.new_empty(gu.shape[0], gu.shape[1] // 2))

    @torch.library.register_fake(lib + "decode_attention")
    def _(
        qkv,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        slots,
        extra_rows,
        extra_slots,
        tables,
        lengths,
        heads,
        *rest,
    ):
        return qkv.new_empty(qkv.shape[0], heads * k_cache.shape[2])


def _build():
    if not kernels_enabled():
        return None
    try:
        from torch.utils import cpp_extension

        build_dir = Path(cpp_extension._get_build_directory(_NAME, verbose=False))
        if not any(build_dir.glob("*.so")):
            print("falconet: building the C++ kernels (once, about a minute)...", file=sys.stderr)
        return cpp_extension.load(
            name=_NAME,
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: fall back, loudly
        warnings.warn(f"falconet: C++ kernels unavailable, using the PyTorch path ({e})", stacklevel=2)
        return None
