"""`falconet bench serve`: a load generator for any OpenAI-compatible server, like vLLM's
benchmark_serving.

It streams every request (the completions or the chat endpoint) and times it on the client:
time to first token (TTFT: request sent -> first chunk with text), inter-token latency (ITL: the
gap between consecutive chunks with text), time per output token (TPOT: (latency - TTFT) /
(output tokens - 1), per request) and end-to-end latency, reported as mean, p50, p90 and p99;
plus request, output-token and total-token throughput over the run's wall time.

Requests arrive as a Poisson process at --request-rate (default: all at once), optionally
capped at --max-concurrency in flight. Prompts come from a JSONL file ({"prompt": str, optional
"output_len"}) or are random English words (--input-len of them, +-range-ratio), the same text
for every server; token counts are the server's own (usage), so the same prompts and model give
the same counts on any server. EOS is ignored by default (the vLLM and llama.cpp `ignore_eos`
extra), so every request produces exactly its output length.

Several --base-url in one run are measured one after the other on the same prompts, e.g.
Falconet and llama.cpp's `llama-server` on the same GGUF.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from falconet.errors import FalconetError

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one "
    "you were all we her she there would their will when who him been has more if no out do so can what up "
    "said about other into than its time only could new them man some these then two first may any like now "
    "my such make over our even most me state after also made many did must before back see through way "
    "where get much go well your know should down work year because come people just say each those take day "
    "good how long very life little world between own house under last might while great old same country "
    "school mountain river falcon engine window garden music history science ocean"
).split()
PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt: str
    output_len: int


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    speculative_metrics: dict | None = None  # Falconet's extension field, from the last chunk

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class ServeBenchResult:
    """One server's run over all the requests."""

    label: str
    base_url: str
    model: str
    endpoint: str
    duration_s: float
    requests: list[RequestResult]
    max_concurrency: int | None = None
    speculative: str | None = None  # the method every request named (Falconet's extension field)

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.requests if r.ok]

    @property
    def num_failed(self) -> int:
        return len(self.requests) - len(self.completed)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.completed)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.completed)

    def summary(self) -> dict:
        done, d = self.completed, self.duration_s
        return {
            "label": self.label,
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": self.endpoint,
            "max_concurrency": self.max_concurrency,
            "speculative": self.speculative,
            "completed": len(done),
            "failed": self.num_failed,
            "duration_s": d,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "request_throughput": len(done) / d,
            "output_throughput": self.output_tokens / d,
            "total_token_throughput": (self.prompt_tokens + self.output_tokens) / d,
            "ttft_s": stats([r.ttft for r in done]),
            "tpot_s": stats([r.tpot for r in done if r.tpot is not None]),
            "itl_s": stats([x for r in done for x in r.itl]),
            "e2e_latency_s": stats([r.latency for r in done]),
            "errors": sorted({r.error for r in self.requests if not r.ok})[:5],
            "drafted_per_output_token": self.drafted_per_output_token,
        }

    @property
    def drafted_per_output_token(self) -> float | None:
        """Draft tokens the server verified per output token (None: no speculative metrics)."""
        metrics = [r.speculative_metrics for r in self.completed if r.speculative_metrics]
        if not metrics or not self.output_tokens:
            return None
        return sum(m.get("num_drafted_tokens", 0) for m in metrics) / self.output_tokens


def stats(values: list[float]) -> dict:
    """Mean and percentiles (nearest rank over the sorted values, as numpy's 'lower' method)."""
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    s = sorted(values)
    percentiles = {f"p{p}": s[min(len(s) - 1, len(s) * p // 100)] for p in PERCENTILES}
    return {"mean": statistics.fmean(s), **percentiles}


# ---------------------------------------------------------------- prompts


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, seed: int):
    if input_len < 1 or output_len < 1 or num < 1:
        raise FalconetError("--num-prompts, --input-len and --output-len must be positive")
    if not 0 <= range_ratio < 1:
        raise FalconetError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    lo, hi = max(1, round(input_len * (1 - range_ratio))), round(input_len * (1 + range_ratio))
    return [BenchRequest(" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))), output_len) for _ in range(num)]


def dataset_requests(path: str | Path, num: int | None, output_len: int) -> list[BenchRequest]:
    """Requests from a JSONL file: {"prompt": str, optional "output_len"}, or Spec-Bench style
    {"category", "turns"} (the first turn); "spec-bench" is the prompt set we ship for `bench spec`.
    Entries with categories are taken in turn from each category, so a prefix covers them all."""
    if str(path) == "spec-bench":
        from falconet.bench.spec import DATA

        path = DATA
    path = Path(path)
    if not path.is_file():
        raise FalconetError(f"no such dataset file: {path}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise FalconetError(f"{path}:{i}: invalid JSON ({e})") from None
        prompt, n = entry.get("prompt"), entry.get("output_len", output_len)
        if prompt is None and isinstance(entry.get("turns"), list) and entry["turns"]:
            prompt = entry["turns"][0]
        if not isinstance(prompt, str) or not prompt:
            raise FalconetError(f"{path}:{i}: each line needs a non-empty 'prompt' string (or 'turns')")
        if not isinstance(n, int) or n < 1:
            raise FalconetError(f"{path}:{i}: output_len must be a positive integer")
        out.append((str(entry.get("category", "")), BenchRequest(prompt, n)))
    if not out:
        raise FalconetError(f"{path}: no requests")
    by_category: dict[str, list[BenchRequest]] = {}
    for category, req in out:
        by_category.setdefault(category, []).append(req)
    queues = list(by_category.values())
    ordered = [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]
    return ordered[:num] if num else ordered


# ---------------------------------------------------------------- one request


async def send(client, url: str, body: dict, chat: bool) -> RequestResult:
    """Stream one request and time its chunks."""
    start = time.perf_counter()
    result, last, usage = RequestResult(ok=False), None, None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as res:
            if res.status_code != 200:
                text = (await res.aread()).decode(errors="replace")
                result.error = f"HTTP {res.status_code}: {text[:200]}"
                return result
            async for line in res.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error']}"[:200]
                    return result
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    result.speculative_metrics = (
                        choice.get("speculative_metrics") or result.speculative_metrics
                    )
                if _has_text(chunk, chat):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as e:  # a refused or dropped connection is a failed request, not a crash
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    result.latency = time.perf_counter() - start
    if last is None:
        result.error = "no text in the response"
        return result
    result.ok = True
    result.output_tokens = usage.get("completion_tokens", chunks) if usage else chunks
    result.prompt_tokens = usage.get("prompt_tokens", 0) if usage else 0
    return result


def _has_text(chunk: dict, chat: bool) -> bool:
    for choice in chunk.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:
            return True
    return False


# ---------------------------------------------------------------- a run


async def _run(
    base_url: str,
    requests: list[BenchRequest],
    model: str | None,
    endpoint: str,
    request_rate: float,
    max_concurrency: int | None,
    ignore_eos: bool,
    api_key: str | None,
    seed: int,
    timeout_s: float,
    label: str,
    extra: dict,
) -> ServeBenchResult:
    import httpx

    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = model or await _first_model(client, base_url)
        if extra.get("speculative"):
            await _forget(client, base_url)
        chat = endpoint == "chat"
        url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)

        async def one(req: BenchRequest) -> RequestResult:
            body = {"model": model, "max_tokens": req.output_len, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            body.update(extra)
            if ignore_eos:
                body["ignore_eos"] = True
            if chat:
                body["messages"] = [{"role": "user", "content": req.prompt}]
            else:
                body["prompt"] = req.prompt
            if gate is None:
                return await send(client, url, body, chat)
            async with gate:
                return await send(client, url, body, chat)

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return ServeBenchResult(
        label or base_url,
        base_url,
        model,
        endpoint,
        duration,
        list(results),
        max_concurrency,
        extra.get("speculative"),
    )


async def _forget(client, base_url: str) -> None:
    """A Falconet server's speculative methods forget earlier requests, so that a method that
    learns from them (token recycling's matrix, Lookahead's pool) does not draft this run's
    answers from an earlier run of the same prompts. Other servers lack the route: nothing to do."""
    try:
        await client.post(f"{base_url}/forget")
    except Exception:  # noqa: BLE001 - unreachable here means unreachable for the run, reported there
        pass


async def _first_model(client, base_url: str) -> str:
    try:
        res = await client.get(f"{base_url}/v1/models")
        res.raise_for_status()
        return res.json()["data"][0]["id"]
    except Exception as e:
        raise FalconetError(f"{base_url}/v1/models: cannot list the models ({e}); pass --model") from None


def run_serve_bench(
    base_urls: list[str],
    *,
    labels: list[str] | None = None,
    model: str | None = None,
    endpoint: str = "completions",
    num_prompts: int = 64,
    input_len: int = 128,
    output_len: int = 128,
    range_ratio: float = 0.0,
    dataset: str | Path | None = None,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    ignore_eos: bool = True,
    api_key: str | None = None,
    seed: int = 0,
    timeout_s: float = 600.0,
    temperature: float = 0.0,
    speculative: list[str] | None = None,
    warmup: int = 0,
) -> list[ServeBenchResult]:
    """Run the same requests against each server in turn; with `speculative`, once per method
    named (Falconet's `speculative` request field; "none": plain decoding), labelled by it."""
    if endpoint not in ("completions", "chat"):
        raise FalconetError(f"--endpoint must be completions or chat, got {endpoint!r}")
    if not request_rate > 0:
        raise FalconetError(f"--request-rate must be positive, got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise FalconetError(f"--max-concurrency must be positive, got {max_concurrency}")
    if not temperature >= 0:
        raise FalconetError(f"--temperature must be >= 0, got {temperature}")
    labels = list(labels or [])
    if len(labels) > len(base_urls):
        raise FalconetError("more --label than --base-url")
    if dataset is not None:
        requests = dataset_requests(dataset, num_prompts, output_len)
    else:
        requests = random_requests(num_prompts, input_len, output_len, range_ratio, seed)
    labels += [""] * (len(base_urls) - len(labels))
    runs = []
    for url, label in zip(base_urls, labels, strict=True):
        if warmup > 0:  # a fresh server's first requests are slow (allocation, first calls): unmeasured
            args = (endpoint, request_rate, max_concurrency, ignore_eos, api_key, seed, timeout_s, "", {})
            asyncio.run(_run(url, requests[:warmup], model, *args))
        for method in speculative or [None]:
            extra: dict = {"temperature": temperature}
            name = label
            if method is not None:
                name = f"{label or url} {method}"
                if method != "none":
                    extra["speculative"] = method
            args = (
                endpoint,
                request_rate,
                max_concurrency,
                ignore_eos,
                api_key,
                seed,
                timeout_s,
                name,
                extra,
            )
            runs.append(asyncio.run(_run(url, requests, model, *args)))
    return runs


# ---------------------------------------------------------------- report


def format_table(results: list[ServeBenchResult], request_rate: float, max_concurrency: int | None) -> str:
    first = results[0]
    n = len(first.requests)
    rate = "all at once" if math.isinf(request_rate) else f"{request_rate:g} requests/s (Poisson)"
    lines = [
        f"{n} requests to /v1/{'chat/completions' if first.endpoint == 'chat' else 'completions'}, "
        f"arrival: {rate}, max concurrency: {max_concurrency or 'unlimited'}",
        "",
        "| server | done | failed | s | req/s | output tok/s | total tok/s | TTFT ms mean/p50/p90/p99 "
        "| TPOT ms mean/p50/p90/p99 | ITL ms mean/p50/p90/p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary()
        lines.append(
            f"| {r.label} | {s['completed']} | {s['failed']} | {s['duration_s']:.2f} "
            f"| {s['request_throughput']:.2f} | {s['output_throughput']:.1f} "
            f"| {s['total_token_throughput']:.1f} "
            f"| {_ms(s['ttft_s'])} | {_ms(s['tpot_s'])} | {_ms(s['itl_s'])} |"
        )
    for r in results:
        for error in r.summary()["errors"]:
            lines.append(f"\n{r.label}: error: {error}")
    return "\n".join(lines)


def _ms(s: dict) -> str:
    return " / ".join(f"{s[k] * 1000:.1f}" for k in ("mean", "p50", "p90", "p99"))


# ---------------------------------------------------------------- command line


def cmd_bench_serve(args) -> int:
    methods = [m.strip() for m in args.speculative.split(",")] if args.speculative else None
    results = []
    for concurrency in _concurrencies(args.max_concurrency):
        runs = run_serve_bench(
            args.base_url,
            labels=args.label,
            model=args.model,
            endpoint=args.endpoint,
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            range_ratio=args.range_ratio,
            dataset=args.dataset,
            request_rate=args.request_rate,
            max_concurrency=concurrency,
            ignore_eos=args.ignore_eos,
            api_key=args.api_key,
            seed=args.seed,
            timeout_s=args.timeout,
            temperature=args.temperature,
            speculative=methods,
            warmup=args.warmup,
        )
        print(format_table(runs, args.request_rate, concurrency), end="\n\n", flush=True)
        results.extend(runs)
    if methods and "none" in methods:
        print(format_method_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict_summary(r) for r in results], indent=2) + "\n")
    return 0 if all(r.completed for r in results) else 1


def _concurrencies(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise FalconetError(f"--max-concurrency takes integers separated by commas, got {text!r}") from None


def format_method_table(results: list[ServeBenchResult]) -> str:
    """Output tokens/s of each method at each concurrency, and its ratio to plain decoding
    ("none") at the same concurrency on the same server: the plain run last before it, so that a
    list repeating methods (none,a,none,a) compares each run with its neighbour on a drifting
    machine. A method's repeated runs get rows of their own, numbered."""
    levels = sorted({r.max_concurrency or 0 for r in results})
    names = {r.label[: -len(r.speculative or "none")].strip(): r.base_url for r in results}

    def method(r: ServeBenchResult) -> str:
        return r.speculative or "none"

    def baseline(i: int) -> ServeBenchResult | None:
        run = results[i]
        key = (run.base_url, run.max_concurrency)
        same = [
            j
            for j, r in enumerate(results)
            if (r.base_url, r.max_concurrency) == key and r.speculative is None
        ]
        before = [j for j in same if j <= i]
        return results[before[-1]] if before else (results[same[0]] if same else None)

    lines = [
        "by concurrency: output tokens/s, mean request latency (each as a speedup over plain decoding "
        "at the same concurrency), draft tokens verified per output token",
        "",
        "| server | method | " + " | ".join(f"{c or 'unlimited'}" for c in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for name, url in names.items():
        mine = [i for i, r in enumerate(results) if r.base_url == url]
        for m in dict.fromkeys(method(results[i]) for i in mine):
            # the k-th run of this method at each concurrency
            runs = [i for i in mine if method(results[i]) == m]
            by_level = {c: [i for i in runs if (results[i].max_concurrency or 0) == c] for c in levels}
            repeats = max(len(v) for v in by_level.values())
            for k in range(repeats):
                cells = []
                for c in levels:
                    i = by_level[c][k] if k < len(by_level[c]) else None
                    run = results[i] if i is not None else None
                    if run is None or not run.completed:
                        cells.append("-")
                        continue
                    base = baseline(i)
                    s = run.summary()
                    tps, latency = s["output_throughput"], s["e2e_latency_s"]["mean"]
                    cell = f"{tps:.1f}"
                    if base is not None and base.completed:
                        b = base.summary()
                        cell += f" ({tps / b['output_throughput']:.2f}x)"
                        cell += f", {latency * 1000:.0f} ms ({b['e2e_latency_s']['mean'] / latency:.2f}x)"
                    else:
                        cell += f", {latency * 1000:.0f} ms"
                    if run.drafted_per_output_token is not None:
                        cell += f", {run.drafted_per_output_token:.2f} drafts/token"
                    cells.append(cell)
                label = m if repeats == 1 else f"{m} ({k + 1})"
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def asdict_summary(result: ServeBenchResult) -> dict:
    """The summary plus every request's timings, for a JSON file."""
    return {**result.summary(), "requests": [asdict(r) for r in result.requests]}


def add_serve_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the `falconet bench` sub-commands."""
    p = bench_subparsers.add_parser("serve", help="load-test OpenAI-compatible servers (TTFT, TPOT, ITL)")
    p.add_argument(
        "--base-url", action="append", required=True, help="e.g. http://127.0.0.1:8000; repeat to compare"
    )
    p.add_argument("--label", action="append", default=None, help="a name for each --base-url, in order")
    p.add_argument("--model", default=None, help="model name to send (default: each server's first model)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument(
        "--dataset",
        default=None,
        help='JSONL of {"prompt": str, optional "output_len": int}; "spec-bench": the prompts of bench spec',
    )
    p.add_argument("--input-len", type=int, default=128, help="random prompts: words per prompt")
    p.add_argument("--range-ratio", type=float, default=0.0, help="random prompts: lengths vary by +-this")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default: at once)"
    )
    p.add_argument(
        "--max-concurrency", default=None, help="requests in flight at most; several (1,4,16): one run each"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="requests sent to each server first, not measured")
    p.add_argument(
        "--speculative",
        default=None,
        help="Falconet: speculative methods, comma-separated, one run each ('none': plain decoding)",
    )
    p.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="produce every output token"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", default=None, help="also write the results (and every request's timings) here")
    p.set_defaults(func=cmd_bench_serve)
    return p
