"""`falconet bench latency`'s extras: the weights a token reads, and llama.cpp as a baseline."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from falconet.bench.latency import (
    LatencyResult,
    bench_latency,
    format_table,
    run_llama_bench,
    run_llama_cpp_python,
    weight_bytes_per_token,
)
from falconet.errors import FalconetError
from falconet.models.loader import load_model


def test_weight_bytes_follow_the_precision(tiny_llama64_dir):
    sizes = {}
    for q in (None, "int8", "int4"):
        model = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False, quantization=q).model
        sizes[q] = weight_bytes_per_token(model)
    linear_params = sum(
        m.weight.numel()
        for m in load_model(tiny_llama64_dir, with_tokenizer=False).model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    assert sizes[None] == 2 * linear_params  # bf16: two bytes a weight, the tied head included
    assert linear_params < sizes["int8"] < 1.1 * linear_params  # plus one float32 scale a row
    assert sizes["int4"] < sizes["int8"]


def _fake_llama_bench(tmp_path, payload: str):
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!/usr/bin/env python3\nimport sys\nsys.stdout.write({payload!r})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_llama_bench_json_is_read_and_ratios_printed(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    entries = [
        {"n_prompt": 512, "n_gen": 0, "avg_ts": 400.0, "stddev_ts": 1.0},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 160.0, "stddev_ts": 1.0},
    ]
    base = run_llama_bench(_fake_llama_bench(tmp_path, json.dumps(entries)), gguf, 2, 512, 128, 3)
    assert (base.prefill_tokens_per_s, base.decode_tokens_per_s) == (400.0, 160.0)
    row = LatencyResult("bfloat16+int4+compile", 2000.0, 168.0, 250.0, 3.0, 95_000_000, compile_s=4.5)
    table = format_table([row], 512, 128, base, bandwidth=50.0)
    assert "| llama.cpp (llama-bench) | 400.0 | 160.0 |" in table
    assert "| 250 | 3.0 | 4.5 | 16.0 (32% of 50.0) | 5.00x | 1.05x |" in table


def test_a_row_takes_one_quantization(tiny_llama64_dir):
    with pytest.raises(FalconetError, match="one quantization per row"):
        bench_latency(str(tiny_llama64_dir), ["bfloat16+int8+int4"], 8, 4, 1)


def test_llama_bench_problems_are_clean_errors(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(FalconetError, match="needs llama.cpp's llama-bench"):
        run_llama_bench(str(tmp_path / "missing"), gguf, 2, 512, 128, 3)
    with pytest.raises(FalconetError, match="llama-bench failed"):
        run_llama_bench(_fake_llama_bench(tmp_path, "not json"), gguf, 2, 512, 128, 3)
    with pytest.raises(FalconetError, match="needs a GGUF"):
        run_llama_bench(_fake_llama_bench(tmp_path, "[]"), tmp_path, 2, 512, 128, 3)


def test_llama_cpp_python_baseline(default_gguf):
    pytest.importorskip("llama_cpp")
    base = run_llama_cpp_python(default_gguf, 2, 16, 8, 1)
    assert base.name == "llama.cpp (llama-cpp-python)"
    assert base.prefill_tokens_per_s > 0 and base.decode_tokens_per_s > 0


def test_llama_cpp_python_missing_or_no_gguf_is_a_clean_error(monkeypatch, tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("llama_cpp") is not None:
        with pytest.raises(FalconetError, match="needs a GGUF"):
            run_llama_cpp_python(tmp_path, 2, 16, 8, 1)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(FalconetError, match="pip install llama-cpp-python"):
        run_llama_cpp_python(tmp_path / "m.gguf", 2, 16, 8, 1)
