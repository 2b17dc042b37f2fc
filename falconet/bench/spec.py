"""`falconet bench spec`: speculative decoding methods side by side, modelled on Spec-Bench.

Spec-Bench (Xia et al., 2024, "Unlocking Efficiency in Large Language Model Inference: A
Comprehensive Survey of Speculative Decoding") times each method at batch 1 on six task
categories: multi-turn conversation, translation, summarization, question answering,
mathematical reasoning and retrieval-augmented generation. Our prompts are our own
(falconet/bench/data/spec_bench.jsonl, 8 per category, see its README), each wrapped in the
model's chat template; a multi-turn item's second turn follows the answer to its first.

Every prompt runs at batch 1 once per method, plain decoding first, in the same process, so
each method's speedup is a ratio against plain decoding measured in the same run; prefix caching
is off, so every method pays every prompt's prefill as plain decoding does. Per method
and category: tokens/s, mean accepted length (tokens per target forward) and speedup; the
overall row sums all categories' tokens and times. Repeated for --runs runs and each of
--temperatures (0 = greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from falconet.errors import FalconetError

DATA = Path(__file__).parent / "data" / "spec_bench.jsonl"
CATEGORIES = ("multi_turn", "translation", "summarization", "qa", "math_reasoning", "rag")
PLAIN = "plain"


def load_prompts(path: Path = DATA, per_category: int | None = None) -> list[dict]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if per_category is not None:
        kept, seen = [], {}
        for item in items:
            seen[item["category"]] = seen.get(item["category"], 0) + 1
            if seen[item["category"]] <= per_category:
                kept.append(item)
        items = kept
    return items


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0  # verifying target forwards
    accepted: int = 0

    def add(self, tokens: int, seconds: float, stats: dict | None) -> None:
        self.tokens += tokens
        self.seconds += seconds
        if stats:
            self.steps += stats["num_steps"]
            self.accepted += stats["num_accepted_tokens"]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens per target forward: 1 for plain decoding."""
        return (self.accepted + self.steps) / self.steps if self.steps else 1.0


@dataclass
class RunResult:
    temperature: float
    run: int
    tallies: dict[str, dict[str, Tally]] = field(default_factory=dict)  # method -> category -> Tally

    def tally(self, method: str, category: str) -> Tally:
        return self.tallies.setdefault(method, {}).setdefault(category, Tally())

    def overall(self, method: str) -> Tally:
        total = Tally()
        for t in self.tallies.get(method, {}).values():
            total.tokens += t.tokens
            total.seconds += t.seconds
            total.steps += t.steps
            total.accepted += t.accepted
        return total


def _generate(llm, prompt_ids, params):
    start = time.perf_counter()
    out = llm.generate([prompt_ids], params)[0]
    return out, time.perf_counter() - start


def run_spec_bench(llm, methods, items, temperature, max_tokens, run, num_tokens=None, seed=0) -> RunResult:
    from falconet.sampling_params import SamplingParams

    result = RunResult(temperature, run)
    # Methods that learn from earlier requests (a pool of their tokens) start each run afresh:
    # the earlier runs' answers to these same prompts would be drafted whole.
    llm.engine.speculator.forget()
    for i, item in enumerate(items):
        for method in [PLAIN, *methods]:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=seed + 1000 * run + i,
                speculative=None if method == PLAIN else method, num_speculative_tokens=num_tokens,
            )  # fmt: skip
            messages = []
            for turn in item["turns"]:
                messages.append({"role": "user", "content": turn})
                prompt_ids = llm.tokenizer.encode_chat(messages)
                out, seconds = _generate(llm, prompt_ids, params)
                completion = out.outputs[0]
                result.tally(method, item["category"]).add(
                    len(completion.token_ids), seconds, completion.speculative_metrics
                )
                messages.append({"role": "assistant", "content": completion.text})
    return result


def format_results(results: list[RunResult], methods: list[str]) -> str:
    lines = []
    for temperature in sorted({r.temperature for r in results}):
        runs = [r for r in results if r.temperature == temperature]
        label = "greedy" if temperature == 0 else f"temperature {temperature:g}"
        lines.append(
            f"\n{label}, {len(runs)} run(s): tokens/s, mean accepted length (tokens per target forward), "
            "speedup over plain decoding in the same run (mean over runs; min-max)"
        )
        header = ["method", *CATEGORIES, "overall"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for method in [PLAIN, *methods]:
            cells = [method]
            for category in [*CATEGORIES, None]:
                tallies = [r.overall(method) if category is None else r.tally(method, category) for r in runs]
                plains = [r.overall(PLAIN) if category is None else r.tally(PLAIN, category) for r in runs]
                if not any(t.tokens for t in tallies):
                    cells.append("-")
                    continue
                tps = statistics.mean(t.tokens_per_s for t in tallies)
                speed = [
                    t.tokens_per_s / p.tokens_per_s for t, p in zip(tallies, plains, strict=True) if p.tokens
                ]
                accepted = statistics.mean(t.mean_accepted for t in tallies)
                spread = f" ({min(speed):.2f}-{max(speed):.2f})" if len(speed) > 1 else ""
                cells.append(f"{tps:.1f} tok/s, {accepted:.2f}, {statistics.mean(speed):.2f}x{spread}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: list[RunResult]) -> list[dict]:
    rows = []
    for r in results:
        for method, cats in r.tallies.items():
            for category, t in [*cats.items(), ("overall", r.overall(method))]:
                plain = r.overall(PLAIN) if category == "overall" else r.tally(PLAIN, category)
                rows.append({
                    "temperature": r.temperature, "run": r.run, "method": method, "category": category,
                    "tokens": t.tokens, "seconds": round(t.seconds, 4),
                    "tokens_per_s": round(t.tokens_per_s, 2),
                    "mean_accepted_length": round(t.mean_accepted, 4),
                    "speedup": round(t.tokens_per_s / plain.tokens_per_s, 4) if plain.tokens else None,
                })  # fmt: skip
    return rows


def plot(rows: list[dict], methods: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FalconetError("--plot needs matplotlib (pip install matplotlib)") from None
    temps = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    cats = [*CATEGORIES, "overall"]
    width = 0.8 / max(1, len(methods))
    for ax, temp in zip(axes[0], temps, strict=True):
        for m, method in enumerate(methods):
            means = []
            for c in cats:
                vals = [r["speedup"] for r in rows if r["temperature"] == temp and r["method"] == method
                        and r["category"] == c and r["speedup"] is not None]  # fmt: skip
                means.append(statistics.mean(vals) if vals else 0.0)
            ax.bar([i + m * width for i in range(len(cats))], means, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cats))])
        ax.set_xticklabels(cats, rotation=30, ha="right")
        ax.set_ylabel("speedup over plain decoding")
        ax.set_title("greedy" if temp == 0 else f"temperature {temp:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_bench_spec(args) -> int:
    from falconet.api import LLM
    from falconet.methods.registry import SPECULATIVE_METHODS

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        SPECULATIVE_METHODS.lookup(m)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    items = load_prompts(Path(args.dataset) if args.dataset else DATA, args.per_category)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_num_seqs=1,
        # Every method computes every prompt itself: with prefix caching, plain decoding (run
        # first) would pay each prompt's prefill and the methods after it would find it cached.
        enable_prefix_caching=False,
        draft_model=args.draft_model,
        draft_head=args.draft_head,
        compile=args.compile,
    )
    # warm-up: every method once (a draft model loads, kernels settle)
    from falconet.sampling_params import SamplingParams

    warm = llm.tokenizer.encode_chat([{"role": "user", "content": "Say hello."}])
    for m in [None, *methods]:
        llm.generate([warm], SamplingParams(max_tokens=8, temperature=0, speculative=m))
    results = []
    for temperature in temperatures:
        for run in range(args.runs):
            results.append(
                run_spec_bench(
                    llm, methods, items, temperature, args.max_tokens, run, args.num_speculative_tokens
                )
            )
    weights = (
        args.dtype
        + (f"+{args.quantization}" if args.quantization else "")
        + ("+compile" if args.compile else "")
    )
    print(f"{len(items)} prompts ({args.per_category or 'all'} per category), max {args.max_tokens} tokens, "
          f"batch 1, {weights}, threads {torch.get_num_threads()}")  # fmt: skip
    print(format_results(results, methods))
    rows = to_json(results)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, methods, args.plot)
    return 0


def add_spec_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("spec", help="speculative methods side by side (Spec-Bench categories)")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--quantization", "-q", default=None, help="weight quantization (plain decoding too)")
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile (both too)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", default="ngram,layer-skip", help="comma-separated speculative methods")
    p.add_argument("--draft-model", default=None, help="draft model for the draft-model method")
    p.add_argument(
        "--draft-head",
        default=None,
        help="EAGLE head (falconet train-head) or PPD prompt tokens (train-prompts)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="default: each method's own")
    p.add_argument("--temperatures", default="0,1", help="comma-separated; 0 is greedy")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--per-category", type=int, default=None, help="prompts per category (default: all 8)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dataset", default=None, help="JSONL of {id, category, turns} (default: ours)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--plot", default=None, help="write a speedup chart (PNG) here; needs matplotlib")
    p.set_defaults(func=cmd_bench_spec)
    return p
