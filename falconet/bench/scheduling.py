"""Benchmarks of the scheduling methods, each against its baseline in the same run.

`falconet bench chunked-prefill`: time between tokens (TBT) of running decodes when a long
prompt arrives, with chunked prefill (SARATHI / Sarathi-Serve: the prompt is split under the
token budget and decodes keep going) and without (the whole prompt in one step: decodes stall).

`falconet bench packing`: prefill of mixed-length prompts packed into one flattened sequence
(Prepacking) versus padded to the longest prompt, as a padded batch computes them.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.loader import LoadedModel, load_model, parse_dtype
from falconet.sampling_params import SamplingParams


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    margin = min(100, vocab // 4)  # keep clear of special tokens at either end of the vocabulary
    return [rng.randrange(margin, vocab - margin) for _ in range(n)]


@dataclass
class StallResult:
    label: str
    tbt_p50_ms: float
    tbt_p99_ms: float
    tbt_max_ms: float
    long_ttft_s: float


def measure_stall(
    loaded: LoadedModel, chunked: bool, budget: int, num_decodes: int, decode_prompt: int, long_prompt: int
) -> StallResult:
    """TBT of `num_decodes` running requests from the long prompt's arrival until 8 steps after
    its first token."""
    rng = random.Random(0)
    vocab = loaded.config.vocab_size
    config = EngineConfig(
        max_num_seqs=num_decodes + 1,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=False,
        max_model_len=long_prompt + 512,
    )
    engine = LLMEngine(loaded, config)
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    decoders = [engine.add_request(random_ids(rng, decode_prompt, vocab), params) for _ in range(num_decodes)]
    while any(len(r.output_ids) < 2 for r in decoders):
        engine.step()
    last = {id(r): time.perf_counter() for r in decoders}
    gaps: list[float] = []
    arrival = time.perf_counter()
    long = engine.add_request(
        random_ids(rng, long_prompt, vocab), SamplingParams(max_tokens=1, temperature=0)
    )
    ttft, after = None, 0
    while after < 8:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request is long:
                ttft = now - arrival
            elif id(out.request) in last:
                gaps.append(now - last[id(out.request)])
                last[id(out.request)] = now
        after += ttft is not None
    gaps.sort()
    label = f"chunked, budget {budget}" if chunked else "not chunked"
    return StallResult(
        label,
        statistics.median(gaps) * 1e3,
        gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1e3,
        gaps[-1] * 1e3,
        ttft,
    )


@dataclass
class PackingResult:
    label: str
    tokens_computed: int
    seconds: float


def measure_packing(loaded: LoadedModel, lengths: list[int], repeats: int) -> list[PackingResult]:
    """One prefill forward over prompts of `lengths`: packed, and padded to the longest."""
    model, rng = loaded.model, random.Random(0)
    prompts = [random_ids(rng, n, loaded.config.vocab_size) for n in lengths]
    longest = max(lengths)
    # Padding goes after each prompt: causal attention keeps the real tokens' results exact.
    padded = [p + [0] * (longest - len(p)) for p in prompts]
    results = []
    for label, batch in (("packed (Prepacking)", prompts), ("padded to longest", padded)):
        blocks_per = -(-longest // 16)
        cache = PagedKVCache(loaded.config, blocks_per * len(batch), 16, model.embed_tokens.weight.dtype)
        segments = [
            Segment(list(range(i * blocks_per, (i + 1) * blocks_per)), 0, len(p)) for i, p in enumerate(batch)
        ]
        ids = torch.tensor([t for p in batch for t in p])
        positions = torch.cat([torch.arange(len(p)) for p in batch])
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first is a warm-up
                t = time.perf_counter()
                cache.begin_step(segments)
                model(ids, positions, cache)
                times.append(time.perf_counter() - t)
        results.append(PackingResult(label, len(ids), statistics.median(times[1:])))
    return results


def cmd_chunked_prefill(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=parse_dtype(args.dtype))
    rows = [
        measure_stall(
            loaded, False, args.long_prompt, args.num_decodes, args.decode_prompt, args.long_prompt
        ),
        measure_stall(loaded, True, args.budget, args.num_decodes, args.decode_prompt, args.long_prompt),
    ]
    print(
        f"{args.num_decodes} running decodes ({args.decode_prompt}-token prompts); "
        f"a {args.long_prompt}-token prompt arrives. dtype {args.dtype}, threads {torch.get_num_threads()}"
    )
    print("| scheduling | TBT p50 ms | TBT p99 ms | TBT max ms | long prompt TTFT s |")
    print("|---|---|---|---|---|")
    for r in rows:
        tbt = f"{r.tbt_p50_ms:.0f} | {r.tbt_p99_ms:.0f} | {r.tbt_max_ms:.0f}"
        print(f"| {r.label} | {tbt} | {r.long_ttft_s:.2f} |")
    return 0


def cmd_packing(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=parse_dtype(args.dtype))
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.input_len_min, args.input_len_max) for _ in range(args.num_prompts)]
    rows = measure_packing(loaded, lengths, args.repeats)
    print(
        f"{len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), one prefill forward, "
        f"dtype {args.dtype}, threads {torch.get_num_threads()}"
    )
    print("| prefill | tokens computed | seconds | prompt tokens/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.label} | {r.tokens_computed} | {r.seconds:.2f} | {sum(lengths) / r.seconds:.0f} |")
    print(f"speed-up packed / padded: {rows[1].seconds / rows[0].seconds:.2f}x")
    return 0


def add_scheduling_parsers(bench) -> None:
    p = bench.add_parser("chunked-prefill", help="decode stalls when a long prompt arrives, chunked vs not")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-decodes", type=int, default=8)
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=2048)
    p.add_argument("--budget", type=int, default=256, help="token budget per step with chunking")
    p.set_defaults(func=cmd_chunked_prefill)

    p = bench.add_parser("packing", help="prefill of mixed-length prompts, packed vs padded")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len-min", type=int, default=32)
    p.add_argument("--input-len-max", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_packing)
