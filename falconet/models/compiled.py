"""The decode step compiled with torch.compile (inductor's CPU backend, C++ wrapper).

At batch 1 a decode step is ~300 kernel calls (10 a layer), each a few microseconds of Python
and dispatch around tens of microseconds of work. Compiled, the forward of a decode-only step is
one graph of our kernels (torch.ops.falconet.*, the fused ones included; kernels/ops.cpp) that
inductor's C++ wrapper calls back to back without returning to Python.

Only decode-only steps (every row a decode row: plain decoding, speculative chains and token
trees, see `PagedKVCache.decode_only`) take the compiled graph; prefill and chunks run eagerly.
The step's own tensors are dynamic along their row and block-table dimensions, so there are two
graphs (1 row, torch specialises size 1, and 2 or more rows) for every batch size and context
length, both compiled up front. They call the same kernels in the same order as the eager path:
the output is bitwise the same.

Inductor caches compiled code on disk (FALCONET_COMPILE_CACHE, default ~/.cache/falconet/inductor),
so a later run only traces again (seconds).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.linear import Linear


def compile_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "falconet" / "inductor"
    return Path(os.environ.get("FALCONET_COMPILE_CACHE", default))


def _use_cache_dir() -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default into the variable the first time it looks: an unset variable
    # or that default means nobody chose one.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())


class CompiledDecode:
    """Runs the model, through its compiled graph when the planned step is decode-only."""

    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache):
        _use_cache_dir()
        self.model = model
        for module in model.modules():  # traced code reads the packed weights as they are now
            if isinstance(module, Linear) and module.weight.dtype is torch.bfloat16:
                module._packed_weight()
        # Static shapes but for the step's own tensors (marked in __call__): dynamic weights would
        # make every weight dimension a symbol passed in on every call.
        self._compiled = torch.compile(
            model.forward, dynamic=False, fullgraph=True, options={"cpp_wrapper": True, "size_asserts": False}
        )
        self.compiled_steps = 0
        start = time.perf_counter()
        self.available = self._warm_up(kv_cache)
        self.compile_s = time.perf_counter() - start
        if not self.available:
            print("falconet: compiling needs the C++ kernels (CPU); running eagerly", file=sys.stderr)
        else:
            print(f"falconet: decode step compiled in {self.compile_s:.1f} s", file=sys.stderr)

    @torch.inference_mode()
    def _warm_up(self, kv_cache: PagedKVCache) -> bool:
        """Compile both graphs now rather than in the middle of serving. The dummy rows write
        into slot 1 of block 0, which no sequence owns yet (and any owner writes before reading)."""
        for rows in (1, 2):
            kv_cache.begin_step([Segment([0, 0], 1, 1)] * rows)
            if not kv_cache.decode_only:
                return False
            self(torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=torch.long), kv_cache)
        self.compiled_steps = 0
        return True

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache, edit_rows=None
    ) -> torch.Tensor:
        if not kv_cache.decode_only or edit_rows is not None:  # steps with rows edited run eagerly
            return self.model(ids, positions, kv_cache, edit_rows=edit_rows)
        slots, extra_rows, extra_slots, tables, lengths = kv_cache.decode_inputs
        for t in (ids, positions, slots, lengths, tables):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for t in (extra_rows, extra_slots):  # a tree's extra stores (never fewer than 2)
            torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(tables, 1)
        for cache in (kv_cache.k, kv_cache.v):  # any cache size: one graph per model, cached
            torch._dynamo.mark_dynamic(cache, 2)
        self.compiled_steps += 1
        return self._compiled(ids, positions, kv_cache)
