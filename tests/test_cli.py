"""The command line through subprocess: generate, chat over stdin, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from falconet import LLM, SamplingParams


def run_cli(*args: str, stdin: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "falconet.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: "), res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


def test_generate_greedy_equals_library(default_gguf):
    res = run_cli("generate", "The capital of France is", "--model", str(default_gguf), "-n", "12", "-t", "0")
    assert res.returncode == 0, res.stderr
    expected = (
        LLM(str(default_gguf), max_model_len=256)
        .generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0]
        .text
    )
    assert res.stdout == expected + "\n"


def test_chat_over_stdin(default_gguf):
    script = "Say hi.\n/reset\nWhat is two plus two?\n/exit\n"
    res = run_cli("chat", "--model", str(default_gguf), "-n", "16", "-t", "0", stdin=script)
    assert res.returncode == 0, res.stderr
    answers = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2, res.stdout
    assert "conversation cleared" in res.stderr


def test_models_lists_default(default_gguf):
    res = run_cli("models")
    assert res.returncode == 0
    assert "smollm2-135m" in res.stdout and "cached" in res.stdout


def test_unknown_model_name():
    assert_clean_error(run_cli("generate", "hi", "--model", "no-such-model"), "unknown model")


def test_missing_file():
    assert_clean_error(
        run_cli("generate", "hi", "--model", "/nonexistent/model.gguf"), "/nonexistent/model.gguf"
    )


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    assert_clean_error(run_cli("generate", "hi", "--model", str(bad)), "broken.gguf")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    assert_clean_error(run_cli("generate", "hi", "--model", str(tmp_path)), "GPT2LMHeadModel")


@pytest.mark.parametrize("flag", [["--max-tokens", "0"], ["--top-p", "2"]])
def test_bad_sampling_args(flag):
    assert_clean_error(run_cli("generate", "hi", *flag))


def test_prompt_longer_than_context(default_gguf):
    res = run_cli("generate", "word " * 100, "--model", str(default_gguf), "--max-model-len", "32")
    assert_clean_error(res, "context")


def test_chat_ctrl_c_stops_answer_not_chat(default_gguf):
    """SIGINT during an answer ends that answer; the chat goes on to the next question."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "falconet.cli", "chat", "--model", str(default_gguf), "-n", "2000", "-t", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
        # ignored: give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdin.write("Write a very long essay about the history of falconry.\n")
        proc.stdin.flush()
        assert proc.stdout.read(20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate("Say hi.\n/exit\n", timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in out
    assert "Traceback" not in err
    after = out.split("[stopped]", 1)[1]
    assert after.strip(), "no answer to the second question"


def test_methods_lists_the_catalogue_as_json():
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    methods = json.loads(result.stdout)
    assert all(set(m) >= {"kind", "name", "paper", "exact"} for m in methods)
    speculative = {m["name"]: m for m in methods if m["kind"] == "speculative"}
    assert {"ngram", "draft-model", "layer-skip"} <= set(speculative)
    assert all(m["exact"] is True for m in speculative.values())
    table = run_cli("methods")
    assert table.returncode == 0 and "ngram" in table.stdout and "SARATHI" in table.stdout


def test_generate_with_int8_weights(default_gguf):
    """--quantization int8 runs the default model on int8 weights: the library gives the same
    text, and an unknown method is a clean error."""
    args = ("generate", "The capital of France is", "--model", str(default_gguf), "-n", "12", "-t", "0")
    res = run_cli(*args, "--dtype", "bfloat16", "--quantization", "int8")
    assert res.returncode == 0, res.stderr
    llm = LLM(str(default_gguf), dtype="bfloat16", quantization="int8", max_model_len=256)
    expected = llm.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0].text
    assert res.stdout == expected + "\n" and expected.strip()
    assert_clean_error(run_cli(*args, "--quantization", "int3"), "unknown quantization method", "int8")


def test_generate_compiled_equals_eager_on_the_default_model(default_gguf):
    """--compile (the decode step through torch.compile) gives the eager engine's text."""
    args = ("generate", "Name three rivers.", "--model", str(default_gguf), "-n", "24", "-t", "0")
    res = run_cli(*args, "--dtype", "bfloat16", "-q", "int4", "--compile")
    assert res.returncode == 0, res.stderr
    assert "decode step compiled in" in res.stderr
    llm = LLM(str(default_gguf), dtype="bfloat16", quantization="int4", max_model_len=256)
    expected = llm.generate("Name three rivers.", SamplingParams(max_tokens=24, temperature=0))[0].text
    assert res.stdout == expected + "\n" and expected.strip()


@pytest.mark.parametrize("command, method", [("train-prompts", "ppd"), ("train-transfer", "hidden-transfer")])
def test_train_commands_save_what_their_method_loads(tiny_llama_dir, tmp_path, command, method):
    """`falconet train-prompts` / `train-transfer` on the tiny model (answers from a --data
    file): what they save is what ppd / hidden-transfer load, and they say how to use it."""
    import random

    import torch

    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.models.loader import load_model

    rng = random.Random(0)
    data = tmp_path / "answers.pt"
    torch.save([{"ids": [rng.randrange(97) for _ in range(24)], "answer_start": 8} for _ in range(40)], data)
    out = tmp_path / "trained"
    args = ["--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out), "--steps", "3"]
    res = run_cli(command, *args, "--batch-size", "4", "--num-anchors", "4", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert f"--speculative {method} --draft-head {out}" in res.stdout
    engine = LLMEngine(load_model(tiny_llama_dir, with_tokenizer=False), EngineConfig(draft_head=str(out)))
    assert engine.speculator.proposer(method).num_prompt_tokens == 3


def test_train_head_device_must_exist(tiny_llama_dir, tmp_path):
    """`falconet train-head --device`: an unknown device, or CUDA on a machine without one, is a
    clean error before anything is loaded."""
    import torch

    args = ("train-head", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "head"))
    assert_clean_error(run_cli(*args, "--device", "gpu0"), "not a device")
    assert_clean_error(run_cli(*args, "--device", "meta"), "only cpu and cuda")
    if not torch.cuda.is_available():
        assert_clean_error(run_cli(*args, "--device", "cuda"), "no CUDA device")
    assert not (tmp_path / "head").exists()
