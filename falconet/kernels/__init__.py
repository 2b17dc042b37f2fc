"""C++ CPU kernels, compiled on first use with torch.utils.cpp_extension.

torch caches the build (under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and
rebuilds only when the sources or flags change. Everything here has a pure-PyTorch fallback:
set FALCONET_KERNELS=0 to use it, and it is used (with a warning) when no compiler is found.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "bindings.cpp",
        "paged_attention.cpp",
        "paged_attention_bf16.cpp",
        "prefill_attention.cpp",
        "linear_bf16.cpp",
        "fused_ops.cpp",
    )
]
# One build per Python environment: torch keys its build folder by this name alone, and two
# environments sharing one folder rebuild it back and forth (their include paths differ),
# each waiting on the other's lock.
_NAME = "falconet_cpu_kernels_" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]


def kernels_enabled() -> bool:
    return os.environ.get("FALCONET_KERNELS", "1") != "0"


@functools.cache
def cpu_kernels():
    """The compiled module, or None (disabled, or the build failed)."""
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
