"""`falconet bench latency`: batch-1 prefill and decode speed, one row per dtype.

Prefill: one forward over a P-token prompt (the time to the first token).
Decode: the time per token after the first, over D greedily decoded tokens with EOS ignored.
Each figure is the median over --repeats runs after one warm-up run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from falconet.engine.engine import EngineConfig, LLMEngine
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
        dtype, _, quantization = name.partition("+")  # e.g. "bfloat16+int8": int8 weights
        loaded = load_model(model, dtype=parse_dtype(dtype), quantization=quantization or None)
        load_s = time.perf_counter() - t
        # No prefix caching: every repeat must compute its whole prompt.
        config = EngineConfig(
            max_num_seqs=1, max_model_len=prompt_tokens + decode_tokens + 8, enable_prefix_caching=False
        )
        engine = LLMEngine(loaded, config)
        ids = prompt_ids(loaded.tokenizer, prompt_tokens)
        run_once(engine, ids, min(decode_tokens, 8))  # warm-up
        runs = [run_once(engine, ids, decode_tokens) for _ in range(repeats)]
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        results.append(LatencyResult(name, prompt_tokens / prefill, 1 / decode, prefill * 1e3, load_s))
    return results


def format_table(results: list[LatencyResult], prompt_tokens: int, decode_tokens: int) -> str:
    lines = [
        f"| dtype | prefill tok/s ({prompt_tokens}-token prompt) | decode tok/s ({decode_tokens} tokens) "
        "| TTFT ms | load s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.dtype} | {r.prefill_tokens_per_s:.1f} | {r.decode_tokens_per_s:.1f} "
            f"| {r.time_to_first_token_ms:.0f} | {r.load_s:.1f} |"
        )
    lines.append(f"threads: {torch.get_num_threads()}")
    return "\n".join(lines)
