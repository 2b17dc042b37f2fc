"""`falconet bench throughput`: offline throughput over many requests, optionally against transformers.

N requests go to the engine at once (greedy, EOS ignored, so each one produces exactly its output
length); the clock covers only the generate call, after the model is loaded and after one warm-up
call on two short prompts. Prompts are random token ids of lengths drawn uniformly from
[--input-len-min, --input-len-max] with a fixed seed (like vLLM's random dataset), or come from a
JSONL file of {"prompt": str} / {"prompt_token_ids": [...]} lines, each with an optional "output_len".

`--baseline hf` also runs transformers' batched `generate` on the same token ids in the same
process: batches of --hf-batch-size prompts in their original order (no sorting by length),
left-padded to the longest prompt of the batch with an attention mask, min_new_tokens =
max_new_tokens so no row stops early. A batch runs for its longest requested output; only the
tokens each request asked for are counted, so both engines are credited with the same tokens.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from falconet.errors import FalconetError

DEFAULT_NUM_PROMPTS = 64
WARMUP_PROMPT_TOKENS = 16
WARMUP_OUTPUT_TOKENS = 4


@dataclass
class EngineRun:
    """One engine's timed pass over all the requests."""

    engine: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    load_s: float
    note: str = ""

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s


@dataclass
class ThroughputResult:
    model: str
    dtype: str
    threads: int
    input_lens: list[int]
    output_lens: list[int]
    ours: EngineRun
    baseline: EngineRun | None = None
    settings: dict = field(default_factory=dict)  # the engine options that were passed

    @property
    def output_tokens_ratio(self) -> float | None:
        """Ours / baseline output tokens per second (None without a baseline)."""
        if self.baseline is None:
            return None
        return self.ours.output_tokens_per_s / self.baseline.output_tokens_per_s

    @property
    def total_tokens_ratio(self) -> float | None:
        if self.baseline is None:
            return None
        return self.ours.total_tokens_per_s / self.baseline.total_tokens_per_s


@dataclass
class _Request:
    prompt: str | None
    prompt_ids: list[int] | None
    output_len: int


# ---------------------------------------------------------------- requests


def read_dataset(path: str | Path, default_output_len: int) -> list[_Request]:
    """Requests from a JSONL file; raises FalconetError on a missing file or a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise FalconetError(f"{path}: no such dataset file")
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise FalconetError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(item, dict):
                raise FalconetError(f"{path}:{n}: expected an object with 'prompt' or 'prompt_token_ids'")
            prompt, ids = item.get("prompt"), item.get("prompt_token_ids")
            if ids is not None:
                if not ids or not isinstance(ids, list) or not all(type(i) is int for i in ids):
                    raise FalconetError(f"{path}:{n}: 'prompt_token_ids' must be a non-empty list of ints")
                prompt = None
            elif not isinstance(prompt, str) or not prompt:
                raise FalconetError(f"{path}:{n}: needs a non-empty 'prompt' string or 'prompt_token_ids'")
            output_len = item.get("output_len", default_output_len)
            if type(output_len) is not int or output_len < 1:
                raise FalconetError(f"{path}:{n}: 'output_len' must be a positive integer")
            requests.append(_Request(prompt, ids, output_len))
    if not requests:
        raise FalconetError(f"{path}: the dataset has no requests")
    return requests


def random_requests(
    num_prompts: int,
    input_len_min: int,
    input_len_max: int,
    output_len: int,
    vocab_size: int,
    seed: int,
    special_ids: frozenset[int] = frozenset(),
) -> list[_Request]:
    """Prompts of uniformly drawn lengths made of random ids, clear of the vocabulary's edges
    (where special tokens usually sit) and of any id in `special_ids`."""
    margin = min(100, vocab_size // 4)
    pool = [i for i in range(margin, vocab_size - margin) if i not in special_ids]
    if not pool:
        raise FalconetError(f"the vocabulary ({vocab_size} ids) is too small for random prompts")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n = rng.randint(input_len_min, input_len_max)
        requests.append(_Request(None, [rng.choice(pool) for _ in range(n)], output_len))
    return requests


def _validate(
    num_prompts, input_len_min, input_len_max, output_len, max_num_seqs, hf_batch_size, threads, baseline
) -> None:
    if num_prompts is not None and num_prompts < 1:
        raise FalconetError(f"--num-prompts must be at least 1, got {num_prompts}")
    if input_len_min < 1:
        raise FalconetError(f"--input-len-min must be at least 1, got {input_len_min}")
    if input_len_min > input_len_max:
        raise FalconetError(
            f"--input-len-min ({input_len_min}) is larger than --input-len-max ({input_len_max})"
        )
    if output_len < 1:
        raise FalconetError(f"--output-len must be at least 1, got {output_len}")
    if max_num_seqs < 1:
        raise FalconetError(f"--max-num-seqs must be at least 1, got {max_num_seqs}")
    if hf_batch_size is not None and hf_batch_size < 1:
        raise FalconetError(f"--hf-batch-size must be at least 1, got {hf_batch_size}")
    if threads is not None and threads < 1:
        raise FalconetError(f"--threads must be at least 1, got {threads}")
    if baseline not in (None, "hf"):
        raise FalconetError(f"unknown baseline {baseline!r}; the only one is 'hf'")


# ---------------------------------------------------------------- our engine


def _make_llm(model, dtype, max_model_len, max_num_seqs, engine_kwargs: dict):
    from falconet.api import LLM

    params = inspect.signature(LLM).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in engine_kwargs if k not in params and not takes_any]
    if unknown:
        raise FalconetError(f"this version of the engine does not support: {', '.join(sorted(unknown))}")
    return LLM(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, **engine_kwargs)


def _run_ours(llm, prompts: list[list[int]], output_lens: list[int]) -> list[int]:
    """Generate for all requests at once; the number of output tokens of each."""
    from falconet.sampling_params import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    if len(set(output_lens)) == 1:
        outputs = llm.generate(prompts, params(output_lens[0]))
        return [len(o.outputs[0].token_ids) for o in outputs]
    # Mixed output lengths (a dataset with "output_len"): LLM.generate takes one SamplingParams,
    # so submit to the engine directly, all requests at once, as generate does.
    engine = llm.engine
    requests = [engine.add_request(list(p), params(n)) for p, n in zip(prompts, output_lens, strict=True)]
    while engine.has_unfinished():
        engine.step()
    return [len(r.output_ids) for r in requests]


# ---------------------------------------------------------------- transformers baseline


def _load_hf(path: Path, dtype: torch.dtype):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise FalconetError("--baseline hf needs transformers: pip install transformers accelerate") from None
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval()


def _hf_pad_id(model) -> int:
    for source in (model.generation_config, model.config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def _hf_generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """Left-padded batched greedy generate of exactly `new_tokens` per row; the tokens generated per row."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p)
        attention_mask[row, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out.shape[1] - width


def _run_hf(
    model, prompts: list[list[int]], output_lens: list[int], batch_size: int, pad_id: int
) -> list[int]:
    """Batches in the original order; each request is credited with at most the tokens it asked for."""
    counts = []
    for start in range(0, len(prompts), batch_size):
        batch_lens = output_lens[start : start + batch_size]
        made = _hf_generate_batch(model, prompts[start : start + batch_size], max(batch_lens), pad_id)
        counts += [min(made, n) for n in batch_lens]
    return counts


def _padding_tokens(input_lens: list[int], batch_size: int) -> int:
    pad = 0
    for start in range(0, len(input_lens), batch_size):
        batch = input_lens[start : start + batch_size]
        pad += max(batch) * len(batch) - sum(batch)
    return pad


# ---------------------------------------------------------------- the benchmark


def run_throughput(
    model: str | None = None,
    *,
    num_prompts: int | None = None,
    input_len_min: int = 32,
    input_len_max: int = 1024,
    output_len: int = 128,
    dataset: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    threads: int | None = None,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int | None = None,
    enable_chunked_prefill: bool | None = None,
    enable_prefix_caching: bool | None = None,
    max_model_len: int | None = None,
    baseline: str | None = None,
    hf_batch_size: int | None = None,
    hf_dtype: str | None = None,
) -> ThroughputResult:
    """Time our engine (and with baseline="hf", transformers' batched generate) on the same requests.

    `num_prompts`: default 64 random prompts; with a `dataset`, its first N entries (default: all).
    The engine options max_num_batched_tokens / enable_chunked_prefill / enable_prefix_caching are
    passed to LLM only when not None. `max_model_len` defaults to the longest prompt + output.
    `hf_dtype`: the baseline's dtype (default: `dtype`).
    """
    from falconet.models.catalog import resolve
    from falconet.models.loader import parse_dtype

    _validate(
        num_prompts, input_len_min, input_len_max, output_len, max_num_seqs, hf_batch_size, threads, baseline
    )
    if threads:
        torch.set_num_threads(threads)
    requests = read_dataset(dataset, output_len) if dataset is not None else None
    if requests is not None and num_prompts is not None:
        requests = requests[:num_prompts]
    path = resolve(model)

    engine_kwargs = {
        k: v
        for k, v in dict(
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            enable_prefix_caching=enable_prefix_caching,
        ).items()
        if v is not None
    }
    if requests is None:
        # The context we need is known before loading: allocate no more than that.
        max_model_len = max_model_len or input_len_max + output_len
    t = time.perf_counter()
    llm = _make_llm(str(path), dtype, max_model_len, max_num_seqs, engine_kwargs)
    load_s = time.perf_counter() - t

    vocab_size = llm.config.vocab_size
    tokenizer = llm.tokenizer
    if requests is None:
        special = getattr(tokenizer, "special_ids", frozenset()) if tokenizer is not None else frozenset()
        requests = random_requests(
            num_prompts or DEFAULT_NUM_PROMPTS,
            input_len_min,
            input_len_max,
            output_len,
            vocab_size,
            seed,
            special,
        )
    prompts = []
    for r in requests:
        if r.prompt_ids is None:
            if tokenizer is None:
                raise FalconetError("the model has no tokenizer: the dataset needs 'prompt_token_ids'")
            r.prompt_ids = tokenizer.encode(r.prompt)
        if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= vocab_size:
            raise FalconetError(f"prompt token ids must be in [0, {vocab_size})")
        prompts.append(r.prompt_ids)
    input_lens = [len(p) for p in prompts]
    output_lens = [r.output_len for r in requests]
    needed = max(i + o for i, o in zip(input_lens, output_lens, strict=True))
    context = min(max_model_len or llm.config.max_position_embeddings, llm.config.max_position_embeddings)
    if needed > context:
        raise FalconetError(
            f"the longest request needs {needed} positions (prompt + output) but the context holds {context}"
        )

    # Warm-up prompts of their own, so that no prefix of a timed prompt is cached beforehand;
    # no longer than the shortest request, so they fit wherever the timed ones do.
    warmup_len = min(WARMUP_PROMPT_TOKENS, *input_lens)
    warmup = [r.prompt_ids for r in random_requests(2, warmup_len, warmup_len, 1, vocab_size, seed + 1)]
    warmup_out = [min(WARMUP_OUTPUT_TOKENS, *output_lens)] * 2
    _run_ours(llm, warmup, warmup_out)
    t = time.perf_counter()
    counts = _run_ours(llm, prompts, output_lens)
    elapsed = time.perf_counter() - t
    settings = {"max_num_seqs": max_num_seqs, **engine_kwargs}
    note = ", ".join(f"{k}={v}" for k, v in settings.items())
    ours = EngineRun("falconet", len(prompts), sum(input_lens), sum(counts), elapsed, load_s, note)
    del llm
    gc.collect()

    hf = None
    if baseline == "hf":
        batch_size = hf_batch_size or max_num_seqs
        t = time.perf_counter()
        hf_dtype = hf_dtype or dtype
        hf_model = _load_hf(path, parse_dtype(hf_dtype))
        load_s = time.perf_counter() - t
        pad_id = _hf_pad_id(hf_model)
        _run_hf(hf_model, warmup, warmup_out, 2, pad_id)
        t = time.perf_counter()
        counts = _run_hf(hf_model, prompts, output_lens, batch_size, pad_id)
        elapsed = time.perf_counter() - t
        pad = _padding_tokens(input_lens, batch_size)
        note = (
            f"{hf_dtype}, batch {batch_size}, original order, left-padded: {pad} pad tokens "
            f"({100 * pad / (pad + sum(input_lens)):.0f}% of prompt positions)"
        )
        hf = EngineRun("hf generate", len(prompts), sum(input_lens), sum(counts), elapsed, load_s, note)
        del hf_model
        gc.collect()

    return ThroughputResult(
        model=str(path),
        dtype=dtype,
        threads=torch.get_num_threads(),
        input_lens=input_lens,
        output_lens=output_lens,
        ours=ours,
        baseline=hf,
        settings=settings,
    )


def format_table(result: ThroughputResult) -> str:
    r = result
    ins, outs = r.input_lens, r.output_lens
    out_desc = str(outs[0]) if len(set(outs)) == 1 else f"{min(outs)}-{max(outs)}"
    lines = [
        f"model: {r.model}  dtype: {r.dtype}  threads: {r.threads}",
        f"{len(ins)} requests, prompt tokens {min(ins)}-{max(ins)} (mean {sum(ins) / len(ins):.0f}), "
        f"output tokens {out_desc} each (greedy, EOS ignored)",
        "",
        "| engine | requests | prompt tokens | output tokens | elapsed s | requests/s | output tok/s "
        "| total tok/s | load s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in (r.ours, r.baseline):
        if run is None:
            continue
        lines.append(
            f"| {run.engine} | {run.num_requests} | {run.prompt_tokens} | {run.output_tokens} "
            f"| {run.elapsed_s:.2f} | {run.requests_per_s:.2f} | {run.output_tokens_per_s:.1f} "
            f"| {run.total_tokens_per_s:.1f} | {run.load_s:.1f} | {run.note} |"
        )
    if r.baseline is not None:
        lines += [
            "",
            f"ratio falconet / hf: output tok/s {r.output_tokens_ratio:.2f}x, "
            f"total tok/s {r.total_tokens_ratio:.2f}x",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def cmd_bench_throughput(args) -> int:
    result = run_throughput(
        args.model,
        num_prompts=args.num_prompts,
        input_len_min=args.input_len_min,
        input_len_max=args.input_len_max,
        output_len=args.output_len,
        dataset=args.dataset,
        seed=args.seed,
        dtype=args.dtype,
        threads=args.threads,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching,
        max_model_len=args.max_model_len,
        baseline=args.baseline,
        hf_batch_size=args.hf_batch_size,
        hf_dtype=args.hf_dtype,
    )
    print(format_table(result))
    return 0


def add_throughput_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add `throughput` to the `falconet bench` sub-commands."""
    p = bench_subparsers.add_parser("throughput", help="offline requests/s and tokens/s over many requests")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--num-prompts", type=int, default=None, help="default 64; with --dataset, its first N entries (all)"
    )
    p.add_argument("--input-len-min", type=int, default=32, help="random prompts: shortest length")
    p.add_argument("--input-len-max", type=int, default=1024, help="random prompts: longest length")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument(
        "--dataset",
        default=None,
        help='JSONL, a request a line: {"prompt": str} or {"prompt_token_ids": [...]}, optional "output_len"',
    )
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests running at once in our engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per engine step")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context to allocate (default: longest request)"
    )
    p.add_argument("--baseline", choices=["hf"], default=None, help="also time transformers' generate")
    p.add_argument(
        "--hf-batch-size", type=int, default=None, help="baseline batch size (default: --max-num-seqs)"
    )
    p.add_argument(
        "--hf-dtype", default=None, choices=["float32", "bfloat16"], help="baseline dtype (default: --dtype)"
    )
    p.set_defaults(func=cmd_bench_throughput)
    return p
