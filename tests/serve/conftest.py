"""Fixtures: the tiny chat model and a live server over it (helpers in live.py)."""

from __future__ import annotations

import pytest
from live import make_chat_model, start_server

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("transformers")  # the tiny model's weights come from a transformers Llama


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tiny_llama_kwargs, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    return make_chat_model(tiny_llama_dir, tiny_llama_kwargs["vocab_size"], path)


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    """A server without an API key, shared by a test module."""
    s = start_server(tiny_chat_dir)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c
