"""Text <-> token ids and chat prompts, on top of the Hugging Face `tokenizers` library.

A Hugging Face folder ships a ready `tokenizer.json`. A GGUF only ships llama.cpp's description
(vocabulary, merges or scores, token types, a pre-tokenizer name), so we rebuild the equivalent
`tokenizers.Tokenizer` from it. BOS is added here, not by a post-processor, so that one flag
decides it for both sources.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from falconet.errors import FalconetError

# llama.cpp token types (tokenizer.ggml.token_type)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # 1 normal, 5 unused, 6 byte

# Besides the declared EOS, generation stops on these end-of-turn / end-of-text markers when the
# vocabulary has them: chat models often declare one and emit the other.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")

# Split regexes of byte-level BPE vocabularies, by `tokenizer.ggml.pre` (as llama.cpp has them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_FAMILIES = {
    "gpt2": ("default", "gpt2", "mpt", "olmo"),  # GPT-2's own regex
    "digits": ("smollm", "starcoder", "refact"),  # GPT-2's regex after isolating every digit
    "llama3": ("llama-bpe", "llama3", "llama-v3", "falcon3"),
    "qwen2": ("qwen2", "deepseek-r1-qwen"),
}
_PRE_FAMILY = {name: family for family, names in _PRE_FAMILIES.items() for name in names}


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    table, extra = [], 0
    for b in range(256):
        table.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return table


def _pre_family(meta: dict[str, Any], source: str) -> str:
    pre = meta.get("tokenizer.ggml.pre", "default")  # older files have no name: llama.cpp assumes default
    if pre not in _PRE_FAMILY:
        raise FalconetError(
            f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(sorted(_PRE_FAMILY))}"
        )
    return _PRE_FAMILY[pre]


def _byte_level_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family in ("gpt2", "digits"):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if family == "gpt2":
            return byte_level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = Regex(_LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose joined piece scores highest: rank every (left, right)
    split of every piece by that piece's score, best first (ties: longer left part first)."""
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], -cut, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _gguf_merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]


def _gguf_byte_level(meta: dict[str, Any], family: str) -> tokenizers.Tokenizer:
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    alphabet = _byte_alphabet()
    spelled = set(alphabet)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # Added tokens are stored as raw text and matched as such; an ordinary token that is not in
        # the byte alphabet gets respelled so that BPE can reach it.
        added = i < len(types) and types[i] in (CONTROL, USER_DEFINED)
        if not added and not set(tok) <= spelled:
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    # Llama 3 takes a word that is in the vocabulary whole, whatever the merges say (as llama.cpp).
    bpe = BPE(vocab=vocab, merges=_gguf_merges(meta), ignore_merges=family == "llama3")
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece(meta: dict[str, Any], source: str) -> tokenizers.Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if "tokenizer.ggml.merges" in meta:
        merges = _gguf_merges(meta)
    elif "tokenizer.ggml.scores" in meta:
        merges = _merges_from_scores(vocab, meta["tokenizer.ggml.scores"])
    else:
        raise FalconetError(f"{source}: SentencePiece tokenizer has neither merges nor scores")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    # Characters missing from the vocabulary become their UTF-8 bytes, spelled <0xNN>.
    bpe = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    # '▁' stands for a space; the prefix space goes before the start of the text only.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    scheme = "first" if prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # undo the prefix space
    backend.decoder = decoders.Sequence(steps)
    return backend


def _content(token: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FalconetError(f"{path}: cannot read JSON ({e})") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a chat engine needs: BOS policy, stop ids, chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str | None],
        add_bos: bool,
        chat_template: str | None,
        extra_eos_ids: tuple[int, ...] = (),
        source: str = "",
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}  # template variables
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = backend.token_to_id(self.bos_token) if self.bos_token else None
        if add_bos and self.bos_token_id is None:
            raise FalconetError(f"{source}: the tokenizer asks for a BOS token but has none")
        ends = [backend.token_to_id(t) for t in (self.eos_token, *END_TOKENS) if t is not None]
        ends = [i for i in ends if i is not None] + list(extra_eos_ids)
        self.eos_token_ids: list[int] = list(dict.fromkeys(ends))  # declared EOS first, no repeats
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # Byte-fallback vocabularies spell characters they lack as <0xNN> byte tokens.
        bytes_ = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        fallback = getattr(backend.model, "byte_fallback", False)
        self.byte_fallback_ids = frozenset(i for i in bytes_ if i is not None) if fallback else frozenset()

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "") -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes (`meta` from falconet.models.gguf.read_metadata)."""
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise FalconetError(
                f"{source}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
            )
        if not meta.get("tokenizer.ggml.tokens"):
            raise FalconetError(f"{source}: no vocabulary (tokenizer.ggml.tokens)")
        if model == "gpt2":
            family = _pre_family(meta, source)
            backend = _gguf_byte_level(meta, family)
            add_bos_default = family == "llama3"  # llama.cpp's default when the flag is missing
        else:
            backend = _gguf_sentencepiece(meta, source)
            add_bos_default = True
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
        typed = list(zip(tokens, types, strict=False))
        # Control and unknown tokens are special (decode can skip them); user-defined ones are plain.
        # Both kinds are matched whole in the text before BPE, so "<|im_start|>" is one id.
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in typed if ty in (UNKNOWN, CONTROL)]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in typed if ty == USER_DEFINED]
        )

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        named = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        return cls(
            backend,
            special_tokens=named,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            chat_template=meta.get("tokenizer.chat_template"),
            source=source,
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, the chat template and generation_config's EOS ids."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FalconetError(f"{path}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise FalconetError(f"{path / 'tokenizer.json'}: cannot load tokenizer ({e})") from None

        def optional_json(name: str) -> dict[str, Any]:
            return _read_json(path / name) if (path / name).is_file() else {}

        config = {**optional_json("special_tokens_map.json"), **optional_json("tokenizer_config.json")}
        special = {k: _content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}

        # Newer exports keep the template in a file of its own, which wins over the config's copy.
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")

        # An explicit add_bos_token wins; else BOS is added if tokenizer.json's post-processor adds it.
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
            ids = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and ids[:1] == [bos_id]

        eos = optional_json("generation_config.json").get("eos_token_id")
        extra_eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
        return cls(
            backend,
            special_tokens=special,
            add_bos=bool(add_bos),
            chat_template=template,
            extra_eos_ids=extra_eos,
            source=str(path),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry for id `i` as spelled there (byte-level 'Ġ' or SentencePiece '▁')."""
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special tokens written in it count as such. BOS only if the model wants it."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """Render a conversation with the model's Jinja chat template, as transformers does."""
        if self.chat_template is None:
            raise FalconetError(f"{self.source or 'tokenizer'}: the model has no chat template")
        template = _compile(self.chat_template)
        try:
            return template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **template_vars},
            )
        except jinja2.TemplateError as e:  # includes the template's own raise_exception(...)
            raise FalconetError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation. Templates that want BOS usually write it themselves: add
        one only if the model wants it and the text does not already start with it."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        has_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_special_tokens=not has_bos)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # Templates come with model files: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise FalconetError(f"chat template: syntax error ({e})") from None
