"""Streaming detokenization: deltas are valid text and add up to the full decode."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from falconet.engine.detokenizer import IncrementalDetokenizer
from falconet.models.gguf import open_gguf, read_metadata
from falconet.models.tokenizer import Tokenizer

SAMPLES = [
    "Hello, world! It's a test.",
    "def f(x):\n    return {'a': [1, 2]}\n\n\tpass  ",
    "Emoji: 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ done",
    "日本語のテキスト、中文字符和한국어 مرحبا بالعالم",
    "<|im_start|>assistant\nSure!<|im_end|>\n",
    "   spaces   and\n\nnewlines\r\n",
]


@pytest.fixture(scope="module")
def smollm(default_gguf) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(open_gguf(default_gguf)), str(default_gguf))


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A tiny SentencePiece vocabulary: its decoder drops the first token's leading space."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(["Hello world, hello there! The end of the world."] * 5, trainers.BpeTrainer())
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer.from_gguf_metadata(meta, "tiny-spm")


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.token_ids == ids
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("which", ["smollm", "spm"])
def test_deltas_add_up_to_decode(request, which, text, skip_special_tokens):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text)
    deltas, tail = stream(tok, ids, skip_special_tokens)
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) + tail == full
    assert not any("\ufffd" in d for d in [*deltas, tail])
    if which == "smollm":
        assert tail == ""  # byte-level BPE: valid text is never held back at the end


def test_split_characters_are_held_back(smollm):
    ids = smollm.encode("a🎉")
    assert len(ids) > 2 and "\ufffd" in smollm.decode(ids[:2])  # the emoji spans several tokens
    deltas, _ = stream(smollm, ids)
    assert deltas[0] == "a" and deltas[-1] == "🎉" and all(d == "" for d in deltas[1:-1])


def test_sentencepiece_spaces_survive_streaming(spm):
    ids = spm.encode("Hello world 🎉", add_special_tokens=False)
    assert spm.decode(ids[1:]) != spm.decode(ids)[len(spm.decode(ids[:1])) :]  # naive suffix decode is wrong
    deltas, tail = stream(spm, ids)
    assert deltas[0] == "Hello" and "".join(deltas) == "Hello world "
    # The emoji is four <0xNN> byte tokens: a byte run may still turn invalid, so it waits for
    # a following token or the end of the stream.
    assert tail == "🎉"
    deltas, tail = stream(spm, ids + spm.encode(" end", add_special_tokens=False))
    assert "".join(deltas) == "Hello world 🎉 end" and tail == ""


def test_flush_returns_an_unfinished_character(smollm):
    ids = smollm.encode("ok 🎉")[:-1]  # stream cut inside the emoji
    full = smollm.decode(ids)
    assert full.endswith("\ufffd")
    deltas, tail = stream(smollm, ids)
    assert "\ufffd" not in "".join(deltas)
    assert tail.endswith("\ufffd") and "".join(deltas) + tail == full
    detok = IncrementalDetokenizer(smollm)
    assert detok.flush() == ""  # nothing held: nothing returned


@pytest.mark.parametrize("which", ["smollm", "spm"])
def test_random_streams_add_up(request, which):
    # Byte tokens in random order make invalid UTF-8 mid-stream; the text must still add up.
    tok = request.getfixturevalue(which)
    # spm: its whole vocabulary; smollm: specials, single bytes and the samples' tokens
    pool = [i for text in SAMPLES for i in tok.encode(text)] + list(range(min(tok.vocab_size, 300)))
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            deltas, tail = stream(tok, ids, skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
