"""Our tokenizers against transformers' on the same files: the default model's GGUF, the HF folder
transformers saves from it, and tiny byte-level / SentencePiece GGUFs written here."""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from falconet.errors import FalconetError
from falconet.models.gguf import open_gguf, read_metadata
from falconet.models.tokenizer import _PRE_FAMILIES, Tokenizer

SAMPLES = [
    "Hello, world! It's a test; we'll see what they've done.",
    "def f(x):\n    if x:\n\t\treturn [i * 2 for i in range(10)]  # comment\n\n\n    return None\n",
    "Emoji: 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ — family & flags",
    "日本語のテキスト、中文字符和한국어",
    "مرحبا بالعالم، كيف حالك؟",
    "a   b    c\n\n\n  \t  d  \r\n end   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> x",
    "12345 3.14159 x99 1,000,000 2024-01-31",
    "",
    " ",
    " leading space and trailing ",
    "Ünïcödé ñ ç ß ø å — “quotes” … «guillemets»",
]
CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "user-only": [{"role": "user", "content": "Hi! 👋"}],
    "multi-turn": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another <b>one</b>?"},
    ],
}


@pytest.fixture(scope="module")
def meta(default_gguf):
    return read_metadata(open_gguf(default_gguf))


@pytest.fixture(scope="module")
def ours(meta, default_gguf):
    return Tokenizer.from_gguf_metadata(meta, source=str(default_gguf))


@pytest.fixture(scope="module")
def ref(default_gguf):
    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


# ---- the default model's GGUF ---------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_encode_decode_matches_transformers(ours, ref, text):
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"]  # SmolLM2 adds no BOS, in both
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_and_ids(ours):
    assert ours.encode("<|im_start|>") == [1]
    assert ours.decode([1, 9690, 2]) == "system"  # specials skipped by default
    assert ours.bos_token_id == 1 and not ours.add_bos
    assert ours.eos_token_ids == [2, 0]  # <|im_end|> (declared), <|endoftext|>
    assert ours.vocab_size == 49152
    assert ours.id_to_token(1) == "<|im_start|>" and ours.id_to_token(284) == "Ġand"


def test_smollm_isolates_every_digit(ours, ref):
    # SmolLM2's own tokenizer.json (and llama.cpp's "smollm") split off every \p{N} character;
    # transformers' GGUF loader uses plain GPT-2 splitting. ASCII digits come out the same (the
    # vocabulary has no multi-digit tokens), other digits differ: we follow the model.
    space, digit = ours.encode(" "), ours.encode("٣")
    assert ours.encode(" ٣") == space + digit
    assert ref(" ٣")["input_ids"] != space + digit


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, ref, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert ours.encode_chat(messages, add_generation_prompt) == ref.encode(expected, add_special_tokens=False)


def test_user_only_gets_default_system_prompt(ours):
    text = ours.apply_chat_template(CONVERSATIONS["user-only"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


# ---- HF folder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tokenizer")
    ref.save_pretrained(path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return path


def test_hf_folder_matches_transformers(hf_folder, ours):
    tok = Tokenizer.from_hf_folder(hf_folder)
    ref = AutoTokenizer.from_pretrained(hf_folder)
    for text in SAMPLES:
        assert tok.encode(text) == ref(text)["input_ids"]
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (1, [2, 0], False)
    messages = CONVERSATIONS["system+user"]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tok.encode_chat(messages) == ours.encode_chat(messages)


def _copy_folder(src, dst, config_update: dict, post_processor=None) -> None:
    dst.mkdir()
    backend = HFTokenizer.from_file(str(src / "tokenizer.json"))
    if post_processor is not None:
        backend.post_processor = post_processor
    backend.save(str(dst / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_update)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_folder_bos_from_post_processor(hf_folder, tmp_path):
    # No add_bos_token in the config: BOS is added when tokenizer.json's post-processor adds it.
    bos_first = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    _copy_folder(hf_folder, tmp_path / "a", {}, post_processor=bos_first)
    (tmp_path / "a" / "chat_template.jinja").write_text((hf_folder / "chat_template.jinja").read_text())
    tok, ref = Tokenizer.from_hf_folder(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.add_bos
    assert tok.encode("hi") == ref("hi")["input_ids"] == [1, 6004]
    assert (
        tok.encode("hi", add_special_tokens=False)
        == ref("hi", add_special_tokens=False)["input_ids"]
        == [6004]
    )
    # The rendered prompt already starts with the BOS text: not added twice.
    messages = CONVERSATIONS["multi-turn"]
    assert (
        tok.encode_chat(messages)
        == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    )
    assert tok.encode_chat(messages)[:2] == [1, 9690]


def test_hf_folder_config_variants(hf_folder, tmp_path):
    template = (hf_folder / "chat_template.jinja").read_text()
    # Template inside tokenizer_config.json, a special token as an AddedToken dict, an explicit
    # add_bos_token (which wins over the post-processor; transformers 5 follows the post-processor).
    a = tmp_path / "a"
    bos = {"__type": "AddedToken", "content": "<|im_start|>", "special": True}
    _copy_folder(hf_folder, a, {"chat_template": template, "bos_token": bos, "add_bos_token": True})
    (a / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok, ref = Tokenizer.from_hf_folder(a), AutoTokenizer.from_pretrained(a)
    assert tok.encode("hi") == [1, 6004]
    assert tok.eos_token_ids == [2, 0, 5]
    messages = CONVERSATIONS["multi-turn"]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert tok.encode_chat(messages)[:2] == [1, 9690]  # one BOS: the template wrote it

    # A list of named templates in the config; chat_template.json beats it.
    b = tmp_path / "b"
    _copy_folder(hf_folder, b, {"chat_template": [{"name": "default", "template": "{{ bos_token }}x"}]})
    assert Tokenizer.from_hf_folder(b).apply_chat_template([]) == "<|im_start|>x"
    (b / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages | length }}"}))
    assert Tokenizer.from_hf_folder(b).apply_chat_template([{"role": "user", "content": "?"}]) == "json:1"


def test_hf_folder_errors(tmp_path):
    with pytest.raises(FalconetError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FalconetError, match="cannot load tokenizer"):
        Tokenizer.from_hf_folder(tmp_path)


# ---- chat template mechanics ----------------------------------------------------------------------


def _with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        tok.backend,
        special_tokens=tok.special_tokens,
        add_bos=tok.add_bos,
        chat_template=template,
        source="t",
    )


def test_template_environment(ours):
    t = _with_template(
        ours,
        "{{ messages | tojson }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.content }}{% endfor %}|{{ strftime_now('%Y') | length }}|{{ eos_token }}|{{ extra }}",
    )
    text = t.apply_chat_template(
        [{"role": "user", "content": "<a&b>"}, {"role": "x", "content": "no"}], extra=7
    )
    assert text == (
        '[{"role": "user", "content": "<a&b>"}, {"role": "x", "content": "no"}]|<a&b>|4|<|im_end|>|7'
    )


def test_template_errors(ours):
    with pytest.raises(FalconetError, match="no chat template"):
        _with_template(ours, None).apply_chat_template([])
    with pytest.raises(FalconetError, match="roles must alternate"):
        _with_template(ours, "{{ raise_exception('roles must alternate') }}").apply_chat_template([])
    with pytest.raises(FalconetError, match="syntax error"):
        _with_template(ours, "{% for %}").apply_chat_template([])
    with pytest.raises(FalconetError):  # the sandbox refuses attribute tricks
        _with_template(ours, "{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}").apply_chat_template(
            []
        )


# ---- tiny GGUFs: byte-level pre-tokenizers and SentencePiece ---------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 1234567 o'clock!",
    "def main():\n    print('hello world')\n\n\treturn 42\r\n",
    "Tokenizers split text into pieces; the pieces become ids. They're fast.",
    "it's the end of the world as we know it, and I feel fine... 3.14159",
] * 10
TEXTS = [
    "The QUICK brown fox's 12345678 jumps!!\n\n  over   the dog.\r\n\tdone",
    "I'LL SEE you're 3.14 x=42; y = [1,2,3]\n    return  y",
    "Emoji 🎉 and 日本語, ümlaut; trailing   ",
]


def _write_gguf(path, meta: dict) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def byte_level_meta():
    """A 400-token byte-level BPE vocabulary trained on CORPUS, as a GGUF would describe it."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|begin_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": False,
    }


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(byte_level_meta, tmp_path, pre):
    meta = {**byte_level_meta, "tokenizer.ggml.pre": pre}
    _write_gguf(tmp_path / "t.gguf", meta)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    tok = Tokenizer.from_gguf_metadata(meta, "tiny")
    for text in TEXTS + ["<|begin_of_text|>hi<|eot_id|>"]:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.eos_token_ids == [1]  # <|eot_id|>, the declared EOS


def test_pre_tokenizer_families(byte_level_meta):
    def split(pre: str) -> list[str]:
        tok = Tokenizer.from_gguf_metadata({**byte_level_meta, "tokenizer.ggml.pre": pre})
        return [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str("IT'S 1234567")]

    families = {family: split(names[0]) for family, names in _PRE_FAMILIES.items()}
    assert families == {
        "gpt2": ["IT", "'", "S", "Ġ1234567"],
        "digits": ["IT", "'", "S", "Ġ", *"1234567"],
        "llama3": ["IT", "'S", "Ġ", "123", "456", "7"],  # case-insensitive contractions
        "qwen2": ["IT", "'S", "Ġ", *"1234567"],
    }
    for family, names in _PRE_FAMILIES.items():
        assert all(split(name) == families[family] for name in names)


def test_llama3_takes_vocabulary_words_whole(byte_level_meta):
    # A word in the vocabulary that no merge builds: Llama 3 (ignore_merges, as llama.cpp) takes it whole.
    tokens = [*byte_level_meta["tokenizer.ggml.tokens"], "zzq"]
    types = [*byte_level_meta["tokenizer.ggml.token_type"], 1]
    meta = {**byte_level_meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    llama3 = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    gpt2 = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt2"})
    assert llama3.encode("zzq") == [len(tokens) - 1]
    assert len(gpt2.encode("zzq")) > 1


def test_llama3_wants_bos_by_default(byte_level_meta):
    meta = {k: v for k, v in byte_level_meta.items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama-bpe"}).encode("a")[0] == 0
    assert Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt2"}).encode("a")[0] != 0


@pytest.fixture(scope="module")
def spm_meta():
    """A SentencePiece-style vocabulary as llama.cpp stores it: byte tokens, scores, no merges."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300))
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|user|>"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
        # A piece learned earlier scores higher: SentencePiece merges the best-scoring pair first.
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_sentencepiece_matches_transformers(spm_meta, tmp_path):
    _write_gguf(tmp_path / "t.gguf", spm_meta)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    tok = Tokenizer.from_gguf_metadata(spm_meta, "tiny-spm")
    for text in TEXTS + ["", " leading", "x<|user|>y <s>hi</s>", "two  spaces\n\nnewlines"]:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ids[0] == 1  # BOS
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    ids = tok.encode("🎉", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]  # byte fallback
    assert tok.decode(ids) == "🎉"


def test_sentencepiece_without_space_prefix(spm_meta):
    tok = Tokenizer.from_gguf_metadata({**spm_meta, "tokenizer.ggml.add_space_prefix": False})
    with_prefix = Tokenizer.from_gguf_metadata(spm_meta)
    assert tok.id_to_token(tok.encode("the", add_special_tokens=False)[0]) != "▁the"
    assert with_prefix.id_to_token(with_prefix.encode("the", add_special_tokens=False)[0]) == "▁the"
    assert tok.decode(tok.encode(" the end")) == " the end"


def test_encode_chat_adds_missing_bos_once(spm_meta):
    tok = Tokenizer.from_gguf_metadata(spm_meta)
    messages = [{"role": "user", "content": "hi"}]
    for template in ("{{ bos_token }}{{ messages[0].content }}", "{{ messages[0].content }}"):
        ids = _with_template(tok, template).encode_chat(messages)
        assert ids.count(1) == 1 and ids[0] == 1


# ---- errors ---------------------------------------------------------------------------------------


def test_unknown_tokenizer_model(spm_meta):
    with pytest.raises(FalconetError, match=r"some\.gguf: unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**spm_meta, "tokenizer.ggml.model": "bert"}, source="some.gguf")
    with pytest.raises(FalconetError, match="some.gguf: unsupported tokenizer model None"):
        Tokenizer.from_gguf_metadata({}, source="some.gguf")


def test_gguf_without_vocabulary():
    with pytest.raises(FalconetError, match=r"x\.gguf: no vocabulary"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, source="x.gguf")


def test_unsupported_pre_tokenizer(byte_level_meta):
    with pytest.raises(FalconetError, match=r"x\.gguf: unsupported pre-tokenizer 'chatglm-bpe'"):
        Tokenizer.from_gguf_metadata(
            {**byte_level_meta, "tokenizer.ggml.pre": "chatglm-bpe"}, source="x.gguf"
        )


def test_sentencepiece_needs_scores_or_merges(spm_meta):
    meta = {k: v for k, v in spm_meta.items() if k != "tokenizer.ggml.scores"}
    with pytest.raises(FalconetError, match="neither merges nor scores"):
        Tokenizer.from_gguf_metadata(meta, source="x.gguf")
