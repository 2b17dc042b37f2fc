"""Load a model from a name, a GGUF file or a Hugging Face folder into one `LoadedModel`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from falconet.config import ModelConfig
from falconet.errors import FalconetError
from falconet.models.catalog import resolve
from falconet.models.llama import LlamaForCausalLM
from falconet.models.rope import RotaryEmbedding

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: object | None  # falconet.models.tokenizer.Tokenizer
    config: ModelConfig
    path: Path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise FalconetError(f"unsupported dtype {dtype}; use float32 or bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise FalconetError(f"unsupported dtype {dtype!r}; use float32 or bfloat16")
    return DTYPES[dtype]


def load_model(
    spec: str | Path | None = None,
    dtype: str | torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    max_model_len: int | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """`spec`: a known model name (pulled if needed), a .gguf file, or a Hugging Face folder.
    `quantization`: a weight quantization method by name (`falconet methods`), or None."""
    dtype = parse_dtype(dtype)
    quantizer = None
    if quantization is not None:
        from falconet.methods.registry import QUANTIZATION_METHODS

        quantizer = QUANTIZATION_METHODS.lookup(quantization)()  # an unknown name fails before loading
    path = resolve(spec)
    blocks = None
    if path.is_dir():
        config, weights, tokenizer = _read_hf_folder(path, with_tokenizer)
    else:
        four_bit = getattr(quantizer, "takes_gguf_blocks", False)
        config, weights, tokenizer, blocks = _read_gguf(path, dtype, with_tokenizer, four_bit)
    max_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    model = _build(config, max_len, dtype)
    model.load_weights(weights)
    if quantizer is not None:
        with torch.no_grad():
            if blocks is not None:
                quantizer.apply(model, blocks)
            else:
                quantizer.apply(model)
    return LoadedModel(model.eval(), tokenizer, config, path)


def _build(config: ModelConfig, max_len: int, dtype: torch.dtype) -> LlamaForCausalLM:
    """An uninitialised model in `dtype` (built on the meta device: no wasted random init)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config, max_positions=max_len)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    # Rope tables are computed, not loaded, and stay float32: rebuild them for real.
    rope = RotaryEmbedding(config, max_len)
    for layer in model.layers:
        layer.self_attn.rope = rope
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _read_hf_folder(path: Path, with_tokenizer: bool):
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FalconetError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise FalconetError(f"{config_file}: invalid JSON ({e})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FalconetError(f"{path}: no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise FalconetError(f"{f}: cannot read safetensors file ({e})") from None
    tokenizer = None
    if with_tokenizer:
        from falconet.models.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_folder(path)
    return config, weights, tokenizer


def _read_gguf(path: Path, dtype: torch.dtype, with_tokenizer: bool, four_bit: bool = False):
    """Config, weights, tokenizer and, with `four_bit`, the file's Q4_0/Q4_1 layers as their own
    blocks by our module names (exactly the file's values, never dequantized: their float
    weights are placeholders the 4-bit layers replace)."""
    from falconet.models import gguf

    reader = gguf.open_gguf(path)
    meta = gguf.read_metadata(reader)
    config = gguf.config_from_gguf(meta, reader)
    blocks, skip = None, frozenset()
    if four_bit:
        by_weight = gguf.load_gguf_4bit_blocks(reader, config)
        blocks = LlamaForCausalLM.fuse_rows(by_weight)
        skip = frozenset(n for n in by_weight if LlamaForCausalLM.module_of(n)[0] in blocks)
    weights = gguf.load_gguf_state_dict(reader, config, dtype, skip)
    tokenizer = None
    if with_tokenizer:
        from falconet.models.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf_metadata(meta, source=str(path))
    return config, weights, tokenizer, blocks
