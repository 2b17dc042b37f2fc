"""Helpers for tests against a live server: the tiny chat model, servers, metrics.

The tiny random Llama gets a word-level tokenizer over its 97 ids (<unk>, <s>, </s>, w3..w96),
so every generated token is one word, and a chat template that writes roles as words.
"""

from __future__ import annotations

import json
import shutil
import time

MODEL = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w3', 'user': 'w4', 'assistant': 'w5'}[m['role']] }} "
    "{{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=128)


def make_chat_model(weights_dir, vocab_size: int, path):
    """Copy a tiny HF folder into `path` and give it a tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    for f in weights_dir.iterdir():
        shutil.copy(f, path / f.name)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return path


def slow_engine_class(step_s: float):
    """LLMEngine with a pause in every step, so that a request stays in flight long enough to
    be caught there (disconnects, full queues, shutdown)."""
    from falconet.engine.engine import LLMEngine

    class SlowEngine(LLMEngine):
        def step(self):
            time.sleep(step_s)
            return super().step()

    return SlowEngine


def start_server(model_dir, api_key=None, max_queue=256, engine_cls=None, **options):
    """A started ServerThread on 127.0.0.1 (a free port) serving `model_dir` as MODEL."""
    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.models.loader import load_model
    from falconet.serve.async_engine import AsyncEngine
    from falconet.serve.server import ServerThread

    engine = (engine_cls or LLMEngine)(load_model(model_dir), EngineConfig(**{**ENGINE, **options}))
    return ServerThread(AsyncEngine(engine, max_queue=max_queue), MODEL, api_key=api_key).start()


def metric(server, name: str) -> float:
    """A sample's value in /metrics (0 if it has not been written yet)."""
    import httpx

    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
