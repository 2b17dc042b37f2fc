"""`falconet bench serve` against a live tiny server: counts, timings, several servers, the table,
the JSON file, datasets, and failures reported instead of crashing."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest

from falconet.bench.serve import (
    add_serve_bench_parser,
    dataset_requests,
    format_table,
    random_requests,
    run_serve_bench,
)
from falconet.errors import FalconetError

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("transformers")

TEMPLATE = "{% for m in messages %}w4 {{ m['content'] }} w6 {% endfor %}w5"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_llama_kwargs, tmp_path_factory):
    """The tiny Llama with a word-level tokenizer (w3..w96) served on a free port."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.models.loader import load_model
    from falconet.serve.async_engine import AsyncEngine
    from falconet.serve.server import ServerThread

    path = tmp_path_factory.mktemp("tiny-serve")
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, path / f.name)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, tiny_llama_kwargs["vocab_size"])]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    engine = LLMEngine(load_model(path), EngineConfig(max_num_seqs=4, num_kv_blocks=64))
    s = ServerThread(AsyncEngine(engine), "tiny").start()
    yield s
    s.stop()


def check_run(run, n: int, output_len: int) -> dict:
    s = run.summary()
    assert s["completed"] == n and s["failed"] == 0
    assert s["output_tokens"] == n * output_len  # EOS ignored: every token is produced
    assert s["prompt_tokens"] > 0
    assert all(len(r.itl) == output_len - 1 for r in run.requests)  # one chunk per token
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_latency_s"):
        assert 0 < s[key]["p50"] <= s[key]["p90"] <= s[key]["p99"], key
    assert s["ttft_s"]["p99"] <= s["e2e_latency_s"]["p99"]
    assert s["output_throughput"] == pytest.approx(n * output_len / s["duration_s"])
    return s


def test_fixed_concurrency(server):
    (run,) = run_serve_bench([server.url], num_prompts=8, input_len=6, output_len=4, max_concurrency=3)
    assert run.model == "tiny" and run.label == server.url
    s = check_run(run, 8, 4)
    assert s["prompt_tokens"] == 8 * 6  # every random word is one (unknown) token here


def test_request_rate_chat_and_two_servers(server):
    runs = run_serve_bench(
        [server.url, server.url + "/v1"], labels=["a", "b"], endpoint="chat", num_prompts=6,
        input_len=4, range_ratio=0.5, output_len=3, request_rate=100.0,
    )  # fmt: skip
    assert [r.label for r in runs] == ["a", "b"]
    for run in runs:
        check_run(run, 6, 3)
    table = format_table(runs, 100.0, None)
    assert "| a | 6 | 0 |" in table and "| b | 6 | 0 |" in table
    assert "100 requests/s (Poisson)" in table and "chat/completions" in table


def test_cli(server, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="falconet")
    bench = parser.add_subparsers(dest="command").add_parser("bench").add_subparsers(dest="bench")
    add_serve_bench_parser(bench)
    out = tmp_path / "res.json"
    args = parser.parse_args(
        ["bench", "serve", "--base-url", server.url, "--num-prompts", "3", "--input-len", "5"]
        + ["--output-len", "2", "--label", "falconet", "--json", str(out)]
    )
    assert args.func(args) == 0
    assert "| falconet | 3 | 0 |" in capsys.readouterr().out
    (saved,) = json.loads(out.read_text())
    assert saved["completed"] == 3 and len(saved["requests"]) == 3 and saved["output_tokens"] == 6


def test_dataset(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "w5 w6 w7"}\n\n{"prompt": "w8", "output_len": 5}\n')
    (run,) = run_serve_bench([server.url], dataset=data, output_len=2)
    assert sorted(r.output_tokens for r in run.requests) == [2, 5]
    assert sorted(r.prompt_tokens for r in run.requests) == [1, 3]


def test_failures_are_reported(server, tmp_path):
    # A request the server refuses (prompt past the context) fails; the run goes on.
    (run,) = run_serve_bench([server.url], num_prompts=2, input_len=300, output_len=2)
    s = run.summary()
    assert s["failed"] == 2 and "HTTP 400" in s["errors"][0] and "maximum context length" in s["errors"][0]
    assert math.isnan(s["ttft_s"]["p50"])
    assert "error: HTTP 400" in format_table([run], math.inf, None)
    # Nobody listening: with no --model, listing the models fails cleanly; with one, requests fail.
    with pytest.raises(FalconetError, match="cannot list the models"):
        run_serve_bench(["http://127.0.0.1:9"], num_prompts=1)
    (run,) = run_serve_bench(["http://127.0.0.1:9"], model="x", num_prompts=2)
    assert run.summary()["failed"] == 2 and "ConnectError" in run.summary()["errors"][0]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(endpoint="embeddings"), "--endpoint"),
        (dict(request_rate=0), "--request-rate"),
        (dict(max_concurrency=0), "--max-concurrency"),
        (dict(output_len=0), "must be positive"),
        (dict(range_ratio=1.5), "--range-ratio"),
        (dict(dataset="/nonexistent.jsonl"), "no such dataset file"),
        (dict(labels=["a", "b"]), "more --label"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(FalconetError, match=needle):
        run_serve_bench(["http://127.0.0.1:9"], **kwargs)


def test_random_prompts_are_reproducible():
    a = random_requests(5, 10, 3, 0.5, seed=1)
    assert a == random_requests(5, 10, 3, 0.5, seed=1) != random_requests(5, 10, 3, 0.5, seed=2)
    assert all(5 <= len(r.prompt.split()) <= 15 and r.output_len == 3 for r in a)


def test_methods_and_concurrencies(server, capsys):
    """--speculative runs every method (Falconet's request field) at every --max-concurrency;
    the method table puts each beside plain decoding, with the drafts the server verified."""
    from falconet.bench.serve import format_method_table

    parser = argparse.ArgumentParser(prog="falconet")
    bench = parser.add_subparsers(dest="command").add_parser("bench").add_subparsers(dest="bench")
    add_serve_bench_parser(bench)
    args = parser.parse_args(
        [
            "bench",
            "serve",
            "--base-url",
            server.url,
            "--num-prompts",
            "4",
            "--input-len",
            "6",
            "--output-len",
            "5",
        ]
        + ["--label", "tiny", "--max-concurrency", "1,4", "--speculative", "none,ngram", "--warmup", "2"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "max concurrency: 1" in out and "max concurrency: 4" in out
    assert "| tiny none | 4 | 0 |" in out and "| tiny ngram | 4 | 0 |" in out
    runs = run_serve_bench(
        [server.url], num_prompts=3, input_len=6, output_len=6, speculative=["none", "ngram"]
    )
    plain, ngram = runs
    assert plain.speculative is None and ngram.speculative == "ngram"
    assert plain.drafted_per_output_token is None  # no speculative metrics without a method
    assert all(r.speculative_metrics["method"] == "ngram" for r in ngram.requests)
    table = format_method_table(runs)
    assert f"| {server.url} | none | " in table and f"| {server.url} | ngram | " in table
    assert "(1.00x)" in table and "drafts/token" in table
    with pytest.raises(FalconetError, match="--max-concurrency takes integers"):
        args = parser.parse_args(["bench", "serve", "--base-url", server.url, "--max-concurrency", "1,x"])
        args.func(args)


def test_each_method_run_starts_afresh(server):
    """Before each method's run the server's methods forget earlier requests (POST /forget):
    token recycling's matrix would otherwise draft the answers of the run before, to the same
    prompts. Greedy, one request at a time: the second run drafts and keeps exactly as the first."""
    runs = run_serve_bench(
        [server.url], num_prompts=3, input_len=6, output_len=12, max_concurrency=1,
        speculative=["token-recycling", "token-recycling"],
    )  # fmt: skip
    kept = [sum(r.speculative_metrics["num_accepted_tokens"] for r in run.requests) for run in runs]
    steps = [sum(r.speculative_metrics["num_steps"] for r in run.requests) for run in runs]
    assert kept[0] == kept[1] and steps[0] == steps[1], (kept, steps)


def test_repeated_methods_each_get_a_row_beside_the_plain_run_before_them():
    """none,a,none,a on a drifting machine: each run of `a` is compared with the plain run just
    before it, and each has its own row."""
    from falconet.bench.serve import RequestResult, ServeBenchResult, format_method_table

    def run(method, seconds):  # 10 requests of 100 tokens, one after another
        reqs = [RequestResult(True, output_tokens=100, ttft=0.1, latency=seconds / 10) for _ in range(10)]
        label = f"u {method or 'none'}"
        return ServeBenchResult(label, "u", "m", "chat", seconds, reqs, 1, method)

    table = format_method_table([run(None, 10.0), run("a", 5.0), run(None, 20.0), run("a", 8.0)])
    assert "| u | none (1) | 100.0 (1.00x)" in table and "| u | none (2) | 50.0 (1.00x)" in table
    assert "| u | a (1) | 200.0 (2.00x)" in table  # against the first plain run
    assert "| u | a (2) | 125.0 (2.50x)" in table  # against the second


def test_unknown_method_fails_each_request(server):
    (run,) = run_serve_bench([server.url], num_prompts=2, input_len=3, output_len=2, speculative=["nope"])
    assert run.summary()["failed"] == 2 and "HTTP 400" in run.summary()["errors"][0]


def test_spec_bench_prompts_cover_every_category():
    from falconet.bench.spec import load_prompts

    reqs = dataset_requests("spec-bench", 6, 32)
    first_turns = {i["turns"][0]: i["category"] for i in load_prompts()}
    assert len({first_turns[r.prompt] for r in reqs}) == 6  # one of each category first
    assert len(dataset_requests("spec-bench", None, 32)) == len(first_turns)
