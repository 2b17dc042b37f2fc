"""The `falconet` command line: pull, models, generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import functools
import sys

from falconet.errors import FalconetError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", "-m", default=None, help="known model name, GGUF file or HF folder (default: smollm2-135m)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--quantization", "-q", default=None, help="weight quantization, e.g. int8 (see `falconet methods`)"
    )
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length to allocate (default: the model's)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile (CPU kernels; compiles ~1 min once, then starts in seconds)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    # Defaults follow llama.cpp's command line: mild sampling.
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40, help="0 disables")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", default=None, help="speculative method (see `falconet methods`)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="drafts per step")
    p.add_argument("--draft-model", default=None, help="draft model for --speculative draft-model")
    p.add_argument(
        "--draft-head",
        default=None,
        help="EAGLE head (falconet train-head) or PPD prompt tokens (falconet train-prompts)",
    )


def _sampling(args):
    from falconet.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        speculative=args.speculative,
        num_speculative_tokens=args.num_speculative_tokens,
    )


def _llm(args):
    from falconet.api import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=1,
        compile=args.compile,
        draft_model=args.draft_model,
        draft_head=args.draft_head,
    )


def cmd_pull(args) -> int:
    from falconet.models.catalog import pull

    print(pull(args.name))
    return 0


def cmd_models(args) -> int:
    from falconet.models.catalog import falconet_home, list_models

    print(f"cache: {falconet_home()}")
    for name, status, desc in list_models():
        print(f"{name:<20} {status:<15} {desc}")
    return 0


def cmd_methods(args) -> int:
    import json

    from falconet.methods.registry import catalogue

    methods = catalogue()
    if args.json:
        print(json.dumps([m.as_dict() for m in methods], indent=2))
        return 0
    print(f"{'kind':<12} {'name':<22} {'exact':<6} paper")
    for m in methods:
        print(f"{m.kind:<12} {m.name:<22} {'yes' if m.exact else 'no':<6} {m.paper}")
    return 0


def _train(args, default_output, train, method: str, flag: str, **options) -> int:
    """Run a `falconet train-*` recipe: threads, output folder (default: where `method` looks),
    the shared options, and how to use what it saved."""
    from pathlib import Path

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output) if args.output else default_output
    if getattr(args, "data", None):
        options["data"] = Path(args.data)
    train(
        args.model, output, num_prompts=args.num_prompts, max_tokens=args.max_tokens, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, log=functools.partial(print, flush=True), **options,
    )  # fmt: skip
    print(f"use it with: --speculative {method} {flag} {output}")
    return 0


def cmd_distill_draft(args) -> int:
    from falconet.models.catalog import resolve
    from falconet.train.distill_draft import default_draft_path, distill

    output = default_draft_path(resolve(args.model), args.layers)
    return _train(
        args,
        output,
        distill,
        "draft-model",
        "--draft-model",
        num_layers=args.layers,
        vocab_size=args.vocab_size,
    )


def cmd_train_head(args) -> int:
    from falconet.methods.speculative.eagle import default_head_path
    from falconet.models.catalog import resolve
    from falconet.train.train_head import train

    output = default_head_path(resolve(args.model))
    return _train(
        args, output, train, "eagle", "--draft-head",
        vocab_size=args.vocab_size, unroll=args.unroll, device=_training_device(args.device),
    )  # fmt: skip


def _training_device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise FalconetError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FalconetError(f"--device {name}: this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise FalconetError(f"--device {name}: only cpu and cuda are supported")
    return name


def cmd_train_prompts(args) -> int:
    from falconet.models.catalog import resolve
    from falconet.train.train_prompts import default_prompts_path, train

    output = default_prompts_path(resolve(args.model))
    return _train(
        args, output, train, "ppd", "--draft-head",
        num_prompt_tokens=args.num_prompt_tokens, num_anchors=args.num_anchors,
    )  # fmt: skip


def cmd_train_transfer(args) -> int:
    from falconet.methods.speculative.hidden_transfer import default_transfer_path
    from falconet.models.catalog import resolve
    from falconet.train.train_transfer import train

    output = default_transfer_path(resolve(args.model))
    return _train(
        args, output, train, "hidden-transfer", "--draft-head",
        num_tokens=args.num_tokens, layer=args.layer, num_anchors=args.num_anchors,
    )  # fmt: skip


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(
        "Chat with the model. /reset clears the conversation, /exit quits; Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = llm.tokenizer.encode_chat(messages)
            answer = []
            stream = llm.stream(ids, params)
            try:
                for delta in stream:
                    answer.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            finally:
                stream.close()  # aborts the request if it was interrupted
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(answer)})
        except FalconetError as e:
            messages.pop()
            print(f"error: {e} (use /reset to start over)", file=sys.stderr)


def cmd_serve(args) -> int:
    import os

    from falconet.models.catalog import DEFAULT_MODEL
    from falconet.serve.server import bind, build_engine, serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = dict(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        draft_model=args.draft_model,
        draft_head=args.draft_head,
        compile=args.compile,
    )
    with bind(args.host, args.port) as sock:  # before loading the model: a taken port fails fast
        engine = build_engine(
            args.model,
            dtype=args.dtype,
            max_queue=args.max_queue,
            quantization=args.quantization,
            **{k: v for k, v in options.items() if v},
        )
        serve(
            engine,
            model_name=args.served_model_name or args.model or DEFAULT_MODEL,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("FALCONET_API_KEY") or None,
            shutdown_timeout=args.shutdown_timeout,
            log_level=args.log_level,
            sock=sock,
        )
    return 0


def cmd_bench_latency(args) -> int:
    import torch

    from falconet.bench.latency import (
        bench_latency,
        format_table,
        read_bandwidth_gb_per_s,
        run_llama_bench,
        run_llama_cpp_python,
    )
    from falconet.models.catalog import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    baseline = None
    if args.baseline is not None:
        import importlib.util

        settings = (torch.get_num_threads(), args.prompt_tokens, args.decode_tokens, args.repeats)
        if args.llama_bench is None and importlib.util.find_spec("llama_cpp") is not None:
            baseline = run_llama_cpp_python(resolve(args.model), *settings)
        else:
            baseline = run_llama_bench(args.llama_bench, resolve(args.model), *settings)
    results = bench_latency(args.model, dtypes, args.prompt_tokens, args.decode_tokens, args.repeats)
    bandwidth = read_bandwidth_gb_per_s()
    print(format_table(results, args.prompt_tokens, args.decode_tokens, baseline, bandwidth))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falconet", description="Falconet LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a known model into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list known and cached models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("methods", help="list every method Falconet has (kind, name, paper, exact)")
    p.add_argument("--json", action="store_true", help="as a JSON list of objects")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("distill-draft", help="train a small draft model on the target's own outputs")
    p.add_argument("--model", "-m", default=None, help="the target (default: smollm2-135m)")
    p.add_argument("--output", "-o", default=None, help="folder to write (default: under $FALCONET_HOME)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the draft (2-4)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens the draft's head scores")
    p.add_argument("--num-prompts", type=int, default=4096, help="synthetic instructions the target answers")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_distill_draft)

    p = sub.add_parser("train-head", help="train an EAGLE draft head on the target's own features")
    p.add_argument("--model", "-m", default=None, help="the target (default: smollm2-135m)")
    p.add_argument("--output", "-o", default=None, help="folder to write (default: under $FALCONET_HOME)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens the head scores")
    p.add_argument("--num-prompts", type=int, default=4096, help="synthetic instructions the target answers")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default=None, help="file keeping the collected answers and features (reused)")
    p.add_argument(
        "--unroll", type=int, default=1, help="drafting steps simulated in training (training-time test)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where to collect and train: cpu (the engine) or cuda (a GPU, minutes)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("train-prompts", help="train Parallel Prompt Decoding's prompt tokens for a model")
    p.add_argument("--model", "-m", default=None, help="the target (default: smollm2-135m)")
    p.add_argument("--output", "-o", default=None, help="folder to write (default: under $FALCONET_HOME)")
    p.add_argument("--num-prompt-tokens", type=int, default=3, help="tokens guessed ahead (m)")
    p.add_argument("--num-prompts", type=int, default=1024, help="synthetic instructions the target answers")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-anchors", type=int, default=32, help="prompt groups per sequence and step")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--data", default=None, help="file keeping the collected answers (reused)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_train_prompts)

    p = sub.add_parser("train-transfer", help="train hidden transfer's linear maps for a model")
    p.add_argument("--model", "-m", default=None, help="the target (default: smollm2-135m)")
    p.add_argument("--output", "-o", default=None, help="folder to write (default: under $FALCONET_HOME)")
    p.add_argument("--num-tokens", type=int, default=3, help="tokens guessed ahead (m)")
    p.add_argument("--layer", type=int, default=None, help="where the transfer happens (default: mid-depth)")
    p.add_argument("--num-prompts", type=int, default=1024, help="synthetic instructions the target answers")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-anchors", type=int, default=32, help="pseudo-token groups per sequence and step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--data", default=None, help="file keeping the collected answers (reused)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_train_transfer)

    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat")
    p.add_argument("--system", default=None, help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer key (default: $FALCONET_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before requests get 429")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None, help="paged KV cache size (default 1.0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--draft-model", default=None, help="draft model for requests with speculative=draft-model"
    )
    p.add_argument(
        "--draft-head",
        default=None,
        help="EAGLE head or PPD prompt tokens, for requests with speculative=eagle or ppd",
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=5.0, help="seconds in-flight requests get on SIGINT/SIGTERM"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("latency", help="batch-1 prefill and decode tokens/s")
    p.add_argument("--model", "-m", default=None)
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated; DTYPE+QUANT quantizes, +compile compiles, e.g. bfloat16+int4+compile",
    )
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--baseline",
        choices=["llama.cpp"],
        default=None,
        help="run llama.cpp first, same GGUF and settings (llama-cpp-python, or --llama-bench)",
    )
    p.add_argument(
        "--llama-bench",
        default=None,
        help="llama.cpp's llama-bench (default: llama-cpp-python, else on PATH)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench_latency)
    from falconet.bench.throughput import add_throughput_parser

    add_throughput_parser(bench)
    from falconet.bench.scheduling import add_scheduling_parsers

    add_scheduling_parsers(bench)
    from falconet.bench.serve import add_serve_bench_parser

    add_serve_bench_parser(bench)
    from falconet.bench.quality import add_quality_parser
    from falconet.bench.spec import add_spec_bench_parser

    add_spec_bench_parser(bench)
    from falconet.bench.multi_draft import add_multi_draft_parser

    add_multi_draft_parser(bench)
    add_quality_parser(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FalconetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
