"""Model configuration: one dataclass for every Llama-family decoder we run.

Built either from a Hugging Face ``config.json`` (``ModelConfig.from_hf``) or from GGUF
metadata (``falconet.models.gguf``). Everything downstream reads only this object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from falconet.errors import FalconetError

# model_type in config.json -> the attention/MLP details that differ between them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" ("linear" or "llama3") and its parameters.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise FalconetError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = ", ".join(d.get("architectures") or []) or model_type
            raise FalconetError(
                f"unsupported architecture {arch!r} (model_type={model_type!r}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise FalconetError(
                f"unsupported hidden_act {d['hidden_act']!r}: only 'silu' (SwiGLU) is supported"
            )
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        # transformers >= 5 nests rope settings in rope_parameters; older versions use
        # rope_theta and rope_scaling at the top level.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        if scaling is None and d.get("rope_scaling"):
            scaling = dict(d["rope_scaling"])
        if scaling is not None:
            scaling.setdefault("rope_type", scaling.get("type"))
            if scaling["rope_type"] in (None, "default"):
                scaling = None
            elif scaling["rope_type"] not in ("linear", "llama3"):
                raise FalconetError(f"unsupported rope scaling type {scaling['rope_type']!r}")
        sliding = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        is_llama = model_type == "llama"
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (is_llama and bool(d.get("attention_bias", False))),
            o_bias=is_llama and bool(d.get("attention_bias", False)),
            mlp_bias=is_llama and bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
