"""GGUF files: open them safely, read their metadata, build a ModelConfig and a state dict.

Parsing and dequantization are the `gguf` package's; this module maps llama.cpp's names and
layouts onto the Hugging Face ones our model uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from falconet.config import ModelConfig
from falconet.errors import FalconetError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file; a missing, truncated or corrupt file gives a FalconetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FalconetError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on bad input
        raise FalconetError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value fields as plain Python values (str, int, float, bool, lists of them)."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise FalconetError(f"{_file(reader)}: unreadable metadata field {key!r} ({e})") from None
    return meta


# The tensor types we dequantize (via gguf.quants). Anything else is refused up front rather
# than trusted to a code path we have never checked.
SUPPORTED_TENSOR_TYPES = frozenset(
    getattr(gguf.GGMLQuantizationType, n)
    for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
)
# general.architecture -> ModelConfig.model_type. llama.cpp files Mistral and SmolLM as 'llama'.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# llama.cpp tensor names -> Hugging Face names ("{i}" is the layer index).
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FREQS = "rope_freqs.weight"


def _file(reader: gguf.GGUFReader) -> str:
    # GGUFReader keeps no path of its own; its memmap does.
    return str(getattr(reader.data, "filename", None) or "<gguf>")


def check_tensor_type(name: str, qtype: gguf.GGMLQuantizationType, source: str) -> None:
    if qtype not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
        raise FalconetError(
            f"{source}: tensor {name!r} has unsupported type {qtype.name}; supported: {supported}"
        )


def _dequantize(t: gguf.ReaderTensor, source: str) -> np.ndarray:
    """A tensor as a writable float32 array in numpy (= PyTorch) order, i.e. [out, in] for weights."""
    check_tensor_type(t.name, t.tensor_type, source)
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise FalconetError(f"{source}: cannot read tensor {t.name!r} ({type(e).__name__}: {e})") from None
    # F32 comes back as a (read-only) view of the memmap: copy so nothing keeps the file mapped.
    return arr.copy() if t.tensor_type == gguf.GGMLQuantizationType.F32 else arr


def _f32(x: float) -> float:
    # GGUF stores float32: 9.999999747e-06 -> 1e-05, the value the model's config.json had.
    return float(str(np.float32(x)))


def _rope_scaling(
    meta: dict[str, Any], arch: str, freq_factors: list[float] | None, source: str
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor") or meta.get(f"{arch}.rope.scale_linear") or 1.0
    if kind == "linear" or (kind == "none" and factor != 1.0):
        linear = _f32(factor)
    elif kind == "none":
        linear = 1.0
    else:
        raise FalconetError(f"{source}: unsupported rope scaling type {kind!r} (supported: linear, llama3)")
    if freq_factors is None:
        return {"rope_type": "linear", "factor": linear} if linear != 1.0 else None
    # llama.cpp divides each rotary frequency by its factor; linear scaling divides them all by
    # `linear` as well, so the two fold into one list.
    return {"rope_type": "freq_factors", "factors": [_f32(f * linear) for f in freq_factors]}


def config_from_gguf(meta: dict[str, Any], reader: gguf.GGUFReader) -> ModelConfig:
    """A ModelConfig from the metadata of `reader`'s file (see read_metadata).

    The reader is needed beside the metadata because some settings live in tensors: a missing
    output.weight means tied embeddings, attn_q.bias means qkv_bias, and llama3-style rope
    scaling is stored as the per-frequency factors of rope_freqs.weight.
    """
    source = _file(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FalconetError(
            f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if meta.get(f"{arch}.expert_count"):
        raise FalconetError(f"{source}: mixture-of-experts models are not supported")
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise FalconetError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    head_dim = head_dim or hidden // heads
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim or meta.get(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise FalconetError(f"{source}: partial rotary or value_length != key_length is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise FalconetError(f"{source}: GGUF metadata has neither {arch}.vocab_size nor tokenizer tokens")

    freq_factors = None
    if _ROPE_FREQS in tensors:
        freq_factors = _dequantize(tensors[_ROPE_FREQS], source).reshape(-1).tolist()
        if len(freq_factors) != head_dim // 2:
            n = len(freq_factors)
            raise FalconetError(f"{source}: {_ROPE_FREQS} has {n} factors, expected {head_dim // 2}")

    # End of generation: eos, plus llama.cpp's end-of-turn / end-of-message tokens when set.
    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and tid not in eos_ids:
            eos_ids.append(int(tid))

    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=meta.get(f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, freq_factors, source),
        max_position_embeddings=meta.get(f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        model_type=SUPPORTED_ARCHITECTURES[arch],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it is not one we map."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model takes, by Hugging Face name, with its PyTorch shape."""
    h, q, kv, inter = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    linears = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    with_bias = {"self_attn.o_proj"} if config.o_bias else set()
    if config.qkv_bias:
        with_bias |= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    if config.mlp_bias:
        with_bias |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, shape in linears.items():
            shapes[f"{p}{name}.weight"] = shape
            if name in with_bias:
                shapes[f"{p}{name}.bias"] = shape[:1]
    return shapes


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rows (half, pair) -> (pair, half) within each head).

    The converter interleaves each head's two rotary halves so that its rope rotates adjacent
    pairs; Hugging Face's rotate_half wants them back in halves. Works for weights and biases.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_state_dict(
    reader: gguf.GGUFReader, config: ModelConfig, dtype: torch.dtype, skip: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to `dtype`, under its Hugging Face name and in its PyTorch shape.
    Tensors named in `skip` are not read: an uninitialised tensor of their shape stands in (for
    weights that arrive another way, e.g. as their 4-bit blocks)."""
    source = _file(reader)
    if reader.byte_order == "S":
        raise FalconetError(f"{source}: big-endian GGUF files are not supported")
    shapes = expected_shapes(config)
    for t in reader.tensors:  # refuse before spending time on dequantizing anything
        check_tensor_type(t.name, t.tensor_type, source)
    freqs_in_config = (config.rope_scaling or {}).get("rope_type") == "freq_factors"
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS and freqs_in_config:
            continue  # already in config.rope_scaling
        name = hf_name(t.name)
        if name not in shapes:
            raise FalconetError(f"{source}: unexpected tensor {t.name!r} for this {config.model_type} model")
        if name in skip:
            state[name] = torch.empty(shapes[name], dtype=dtype)
            continue
        arr = _dequantize(t, source)
        if arr.shape != shapes[name]:
            raise FalconetError(
                f"{source}: tensor {t.name!r} has shape {list(arr.shape)}, expected {list(shapes[name])}"
            )
        # Only llama's converter permutes Q/K; qwen2 runs llama.cpp's NEOX rope, which already
        # rotates halves like Hugging Face.
        if config.model_type == "llama" and ".self_attn.q_proj." in name:
            arr = unpermute_qk(arr, config.num_heads)
        elif config.model_type == "llama" and ".self_attn.k_proj." in name:
            arr = unpermute_qk(arr, config.num_kv_heads)
        state[name] = torch.from_numpy(arr).to(dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise FalconetError(f"{source}: missing tensors (Hugging Face names) {', '.join(missing[:5])}{more}")
    return state


def four_bit_blocks(t: gguf.ReaderTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A Q4_0 or Q4_1 tensor's own blocks of 32 as (q uint8 [N, K] in 0..15, d fp16 [N, K/32],
    m fp16 [N, K/32]) with weight = q * d + m exactly (Q4_0's (q - 8) d is m = -8 d, exact in
    fp16); None for other types. In a block, byte j holds value j (low nibble) and j + 16."""
    kind = t.tensor_type
    if kind not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        return None
    head = 2 if kind == gguf.GGMLQuantizationType.Q4_0 else 4  # fp16 d (and m) before the 16 bytes
    raw = np.asarray(t.data, dtype=np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, head + 16)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if head == 4:
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    else:
        m = (d * np.float16(-8)).astype(np.float16)
    qs = blocks[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], -1)
    return q, d.copy(), m.copy()


def load_gguf_4bit_blocks(
    reader: gguf.GGUFReader, config: ModelConfig
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The Q4_0/Q4_1 weights of a GGUF file as their blocks (`four_bit_blocks`), by Hugging Face
    name, rows in PyTorch order (llama's Q/K rows unpermuted as in load_gguf_state_dict)."""
    out = {}
    for t in reader.tensors:
        blocks = four_bit_blocks(t)
        name = hf_name(t.name)
        if blocks is None or name is None:
            continue
        if config.model_type == "llama" and ".self_attn.q_proj." in name:
            blocks = tuple(unpermute_qk(x, config.num_heads) for x in blocks)
        elif config.model_type == "llama" and ".self_attn.k_proj." in name:
            blocks = tuple(unpermute_qk(x, config.num_kv_heads) for x in blocks)
        out[name] = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in blocks)
    return out


def load_gguf(
    path: str | Path, dtype: torch.dtype
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Config, state dict and metadata (the tokenizer is built from the metadata) of a GGUF file."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    config = config_from_gguf(meta, reader)
    return config, load_gguf_state_dict(reader, config, dtype), meta
