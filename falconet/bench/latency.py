"""`falconet bench latency`: batch-1 prefill and decode speed, one row per dtype.

Prefill: one forward over a P-token prompt (the time to the first token).
Decode: the time per token after the first, over D greedily decoded tokens with EOS ignored.
Each figure is the median over --repeats runs after one warm-up run.

As gpt-fast does, each row also gives the weight bandwidth decode achieves (the bytes of the
weights a token reads, times tokens/s) against the machine's read bandwidth, measured here by
summing a 1 GiB tensor. `--baseline llama.cpp` first runs llama.cpp on the same GGUF, threads,
prompt and decode lengths, and gives each row's ratio to it: through llama-cpp-python in this
process when it is installed, or llama.cpp's own llama-bench (`--llama-bench PATH`, which is
used when given: no Python between its tokens, so the stronger baseline).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.models.loader import load_model, parse_dtype
from falconet.sampling_params import SamplingParams

FILLER = (
    "The falcon is a bird of prey known for its speed. It hunts other birds in flight, "
    "diving from a great height. Falconry, the sport of hunting with trained raptors, is "
    "thousands of years old and is practised on every continent but Antarctica. "
)


@dataclass
class LatencyResult:
    dtype: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    time_to_first_token_ms: float
    load_s: float
    weight_bytes: int = 0  # read per decoded token
    compile_s: float = 0.0  # start-up spent compiling (rows with +compile)

    @property
    def weight_gb_per_s(self) -> float:
        return self.weight_bytes * self.decode_tokens_per_s / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights (and scales) one decode step reads: all of them."""
    from falconet.methods.quant.base import QuantizedLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_bytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def read_bandwidth_gb_per_s(size_bytes: int = 2**30) -> float:
    """The memory's read speed as torch sees it: the best of 3 sums over a tensor of size_bytes."""
    x = torch.ones(size_bytes // 8, dtype=torch.int64)
    x.sum()
    best = min(_timed(x.sum) for _ in range(3))
    return size_bytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class BaselineResult:
    name: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def run_llama_bench(
    binary: str | None, gguf: Path, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int
) -> BaselineResult:
    """llama.cpp's llama-bench on the same file and settings (its JSON output)."""
    exe = binary or shutil.which("llama-bench")
    if exe is None or not Path(exe).exists():
        raise FalconetError(
            "--baseline llama.cpp needs llama.cpp's llama-bench: build it and pass --llama-bench PATH "
            "(or put it on PATH)"
        )
    if gguf.suffix != ".gguf":
        raise FalconetError(f"--baseline llama.cpp needs a GGUF model, not {gguf}")
    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(decode_tokens)]
    cmd += ["-r", str(repeats), "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        entries = json.loads(done.stdout)
        prefill = next(e["avg_ts"] for e in entries if e["n_prompt"] > 0 and e["n_gen"] == 0)
        decode = next(e["avg_ts"] for e in entries if e["n_gen"] > 0 and e["n_prompt"] == 0)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, StopIteration) as e:
        raise FalconetError(
            f"llama-bench failed ({type(e).__name__}: {e}); command: {' '.join(cmd)}"
        ) from None
    return BaselineResult("llama.cpp (llama-bench)", float(prefill), float(decode))


def run_llama_cpp_python(
    gguf: Path, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int
) -> BaselineResult:
    """llama.cpp through llama-cpp-python, in this process: our filler prompt in its tokens, then
    greedy decoding (the argmax of each step's logits), medians of `repeats` runs after a warm-up."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        raise FalconetError(
            "--baseline llama.cpp needs llama-cpp-python (pip install llama-cpp-python) "
            "or llama.cpp's llama-bench (--llama-bench PATH)"
        ) from None
    if gguf.suffix != ".gguf":
        raise FalconetError(f"--baseline llama.cpp needs a GGUF model, not {gguf}")
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=prompt_tokens + decode_tokens + 8, n_threads=threads,
        n_threads_batch=threads, n_batch=max(prompt_tokens, 1), verbose=False,
    )  # fmt: skip
    ids: list[int] = []
    while len(ids) < prompt_tokens:
        ids += llm.tokenize(FILLER.encode(), add_bos=False)
    ids, vocab = ids[:prompt_tokens], llm.n_vocab()

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,)).argmax())

    def once(decode: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        t1 = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = next_token()
        return t1 - t0, (time.perf_counter() - t1) / max(decode, 1)

    once(min(decode_tokens, 8))
    runs = [once(decode_tokens) for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return BaselineResult("llama.cpp (llama-cpp-python)", prompt_tokens / prefill, 1 / decode)


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(FILLER, add_special_tokens=False)
    return ids[:n]


def run_once(engine: LLMEngine, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one request alone in the engine."""
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    req = engine.add_request(ids, params)
    t0 = time.perf_counter()
    engine.step()
    t1 = time.perf_counter()
    while not req.finished:
        engine.step()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / decode_tokens


def bench_latency(
    model: str | None, dtypes: list[str], prompt_tokens: int, decode_tokens: int, repeats: int
) -> list[LatencyResult]:
    results = []
    for name in dtypes:
        t = time.perf_counter()
        # e.g. "bfloat16+int8": int8 weights; "bfloat16+int4+compile": and torch.compile
        dtype, *extras = name.split("+")
        compile_ = "compile" in extras
        quantization = [e for e in extras if e != "compile"]
        if len(quantization) > 1:
            raise FalconetError(f"{name!r}: one quantization per row")
        loaded = load_model(
            model, dtype=parse_dtype(dtype), quantization=quantization[0] if quantization else None
        )
        load_s = time.perf_counter() - t
        # No prefix caching: every repeat must compute its whole prompt.
        config = EngineConfig(
            max_num_seqs=1,
            max_model_len=prompt_tokens + decode_tokens + 8,
            enable_prefix_caching=False,
            compile=compile_,
        )
        engine = LLMEngine(loaded, config)
        compile_s = engine.forward.compile_s if compile_ else 0.0
        ids = prompt_ids(loaded.tokenizer, prompt_tokens)
        run_once(engine, ids, min(decode_tokens, 8))  # warm-up
        runs = [run_once(engine, ids, decode_tokens) for _ in range(repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        weights = weight_bytes_per_token(loaded.model)
        results.append(
            LatencyResult(
                name, prompt_tokens / prefill, 1 / decode, prefill * 1e3, load_s, weights, compile_s
            )
        )
    return results


def format_table(
    results: list[LatencyResult],
    prompt_tokens: int,
    decode_tokens: int,
    baseline: BaselineResult | None = None,
    bandwidth: float | None = None,
) -> str:
    ratio = f" | prefill vs {baseline.name} | decode vs {baseline.name}" if baseline else ""
    lines = [
        f"| dtype | prefill tok/s ({prompt_tokens}-token prompt) | decode tok/s ({decode_tokens} tokens) "
        f"| TTFT ms | load s | compile s | weights GB/s{ratio} |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if baseline else ""),
    ]
    if baseline:
        cells = "| - | - |" + " - | - |"
        lines.append(
            f"| {baseline.name} | {baseline.prefill_tokens_per_s:.1f} | {baseline.decode_tokens_per_s:.1f} "
            f"| - | - {cells}"
        )
    for r in results:
        cells = ""
        if baseline:
            cells = (
                f" {r.prefill_tokens_per_s / baseline.prefill_tokens_per_s:.2f}x"
                f" | {r.decode_tokens_per_s / baseline.decode_tokens_per_s:.2f}x |"
            )
        share = f" ({100 * r.weight_gb_per_s / bandwidth:.0f}% of {bandwidth:.1f})" if bandwidth else ""
        lines.append(
            f"| {r.dtype} | {r.prefill_tokens_per_s:.1f} | {r.decode_tokens_per_s:.1f} "
            f"| {r.time_to_first_token_ms:.0f} | {r.load_s:.1f} | {r.compile_s:.1f} "
            f"| {r.weight_gb_per_s:.1f}{share} |{cells}"
        )
    lines.append(f"threads: {torch.get_num_threads()}")
    if bandwidth:
        lines.append(f"memory read bandwidth (sum of a 1 GiB tensor): {bandwidth:.1f} GB/s")
    return "\n".join(lines)
