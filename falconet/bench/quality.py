"""`falconet bench quality`: what a lossy method (weight quantization) costs against the exact model.

Two measures, each against the unquantized model in the same run:
- perplexity on a fixed text: the user turns of our benchmark prompts (falconet/bench/data,
  written for Falconet, so no model saw them in training), in windows of --window tokens;
- greedy agreement: each prompt answered greedily by both models; the share of answers that
  are identical and the mean share of each answer before its first differing token.
"""

from __future__ import annotations

import argparse
import math

import torch

from falconet.bench.spec import load_prompts
from falconet.models.kv_cache import PagedKVCache, Segment


def held_out_text() -> str:
    return "\n\n".join(turn for item in load_prompts() for turn in item["turns"])


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512) -> float:
    """exp(mean negative log-likelihood) of ids[1:], in non-overlapping windows of `window`."""
    dtype = model.embed_tokens.weight.dtype
    blocks = -(-window // 16)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window])
        if len(chunk) < 2:
            break
        cache = PagedKVCache(model.config, blocks, 16, dtype)
        cache.begin_step([Segment(list(range(blocks)), 0, len(chunk))])
        logits = model.compute_logits(model(chunk, torch.arange(len(chunk)), cache))
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        nll -= logprobs.gather(1, chunk[1:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def greedy_answers(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from falconet.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(share of identical answers, mean share of an answer before its first difference)."""
    same, prefix = 0, 0.0
    for a, b in zip(reference, other, strict=True):
        same += a == b
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix += n / max(len(a), 1) if a != b else 1.0
    return same / len(reference), prefix / len(reference)


def cmd_bench_quality(args) -> int:
    from falconet.api import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.quantizations.split(",") if m.strip()]
    items = load_prompts()[: args.num_prompts]
    rows = []
    reference = None
    for method in [None, *methods]:
        llm = LLM(args.model, dtype=args.dtype, quantization=method, max_num_seqs=16)
        ids = llm.tokenizer.encode(held_out_text())
        prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": it["turns"][0]}]) for it in items]
        ppl = perplexity(llm.engine.model, ids, args.window)
        answers = greedy_answers(llm, prompts, args.max_tokens)
        if reference is None:
            reference = (ppl, answers)
            rows.append((args.dtype, ppl, None, 1.0, 1.0))
        else:
            same, prefix = agreement(reference[1], answers)
            rows.append((f"{args.dtype}+{method}", ppl, ppl / reference[0] - 1, same, prefix))
    print(f"perplexity: {len(ids)} tokens in windows of {args.window}; greedy: {len(items)} prompts, "
          f"{args.max_tokens} tokens; threads {torch.get_num_threads()}")  # fmt: skip
    print("| weights | perplexity | vs unquantized | identical answers | answer before first difference |")
    print("|---|---|---|---|---|")
    for name, ppl, change, same, prefix in rows:
        delta = "-" if change is None else f"{100 * change:+.2f}%"
        print(f"| {name} | {ppl:.3f} | {delta} | {100 * same:.0f}% | {100 * prefix:.1f}% |")
    return 0


def add_quality_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("quality", help="perplexity and greedy agreement of quantized weights")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--quantizations", default="int8", help="comma-separated quantization methods")
    p.add_argument("--window", type=int, default=512, help="perplexity window (tokens)")
    p.add_argument("--num-prompts", type=int, default=48, help="prompts answered greedily by both")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench_quality)
    return p
