"""The Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) in plain PyTorch.

Input is flattened: token ids [T] and their positions [T] for any number of sequences,
with the batch layout held by the KV cache object. q/k/v and gate/up projections are
fused into one matmul each (as in gpt-fast and nano-vllm); `load_weights` maps the
Hugging Face parameter names onto the fused layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from falconet.config import ModelConfig
from falconet.errors import FalconetError
from falconet.kernels import cpu_kernels
from falconet.models.linear import Linear
from falconet.models.rope import RotaryEmbedding


def _kernels(x: torch.Tensor):
    """The fused C++ element-wise ops, for float32 and bf16 on CPU (else the PyTorch path)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        return cpu_kernels()
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `residual`, first `residual += x` in place and return norm(residual)."""
        kernels = _kernels(x)
        if kernels is not None and x.dim() == 2:
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual.add_(x)
        # Normalise in float32 and scale in the model dtype, as the reference does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.rope = rope

    # A KV quantizer (methods/quant/bfp_kv.py): (k, v) -> (k, v) as a quantized cache holds them.
    kv_quant = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache) -> torch.Tensor:
        if kv_cache.decode_only and self.kv_quant is None:
            return self.o_proj.forward(
                kv_cache.attend_decode(self.layer, self.qkv_proj.forward(x), positions, self.rope)
            )
        q, k, v = self.qkv_proj.forward(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope.rotate(positions, q, k)
        if self.kv_quant is not None:
            k, v = self.kv_quant(k, v)
        o = kv_cache.attend(self.layer, q, k, v)
        return self.o_proj.forward(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate, bias=config.mlp_bias)
        self.down_proj = Linear(self.intermediate, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        kernels = _kernels(x)
        if kernels is not None:
            return self.down_proj.forward(kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, kv_cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output (the embeddings for the first layer); residual: the
        stream it is added to. Each add is fused into the norm that follows it; the sums are the
        reference's `x = x + sublayer(norm(x))`, rounded the same way."""
        # Children are called through .forward: nn.Module.__call__ costs microseconds a call, and
        # batch-1 decode makes ~10 calls a layer (no hooks are ever registered on them).
        if residual is None:
            residual = x
            h = self.input_layernorm.forward(x)
        else:
            h = self.input_layernorm.forward(x, residual)
        h = self.post_attention_layernorm.forward(self.self_attn.forward(h, positions, kv_cache), residual)
        return self.mlp.forward(h), residual


# Hugging Face parameter name fragment -> (our fused parameter, index of its shard).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.max_positions = max_positions or config.max_position_embeddings
        rope = RotaryEmbedding(config, self.max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rope) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache,
        num_layers: int | None = None,
        edit_rows=None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for flattened tokens; call `compute_logits` on the rows needed.
        `num_layers` stops after the first layers (then the final norm): layer-skip drafting.
        `edit_rows(i, x, residual)`, called before layer i, may rewrite some rows' stream in place
        (x: the last sublayer's output, residual: the stream it is added to; before layer 0, x is
        the embeddings and residual None): trained inputs of extra rows (methods/speculative/ppd.py)."""
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers[:num_layers]):
            if edit_rows is not None:
                edit_rows(i, x, residual)
            x, residual = layer.forward(x, residual, positions, kv_cache)
        return self.norm.forward(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in; every parameter must be covered exactly once."""
        params = dict(self.named_parameters())
        filled: dict[str, int] = {}
        for hf_name, tensor in weights.items():
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some checkpoints store the tied head anyway
            if name.endswith("rotary_emb.inv_freq"):
                continue
            shard = None
            for frag, (fused, idx) in _FUSED.items():
                if f".{frag}." in name:
                    name, shard = name.replace(frag, fused), idx
                    break
            if name not in params:
                raise FalconetError(f"unexpected weight {hf_name!r} for a {self.config.model_type} model")
            target = params[name].data
            if shard is not None:
                target = self._shard(name, target, shard)
            if target.shape != tensor.shape:
                raise FalconetError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            filled[name] = filled.get(name, 0) + 1
        # A fused parameter is complete only when each of its shards was loaded.
        shards = {"qkv_proj": 3, "gate_up_proj": 2}
        missing = [n for n in params if filled.get(n, 0) < shards.get(n.split(".")[-2], 1)]
        if missing:
            raise FalconetError(
                f"checkpoint is missing weights: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )

    @staticmethod
    def module_of(hf_weight: str) -> tuple[str, int]:
        """A Hugging Face linear weight's name -> (our linear module holding it, its shard)."""
        name = hf_weight.removeprefix("model.").removesuffix(".weight")
        for frag, (fused, i) in _FUSED.items():
            if name.endswith(f".{frag}"):
                return name.replace(frag, fused), i
        return name, 0

    @staticmethod
    def fuse_rows(tensors: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per-weight tuples of row-wise tensors (e.g. a quantized weight's values and scales)
        under Hugging Face weight names -> the same under our linear modules' names, the shards
        of a fused layer stacked in order. A fused layer with a shard missing is left out."""
        shards: dict[str, dict[int, tuple]] = {}
        for hf_name, parts in tensors.items():
            name, idx = LlamaForCausalLM.module_of(hf_name)
            shards.setdefault(name, {})[idx] = parts
        out = {}
        for name, found in shards.items():
            needed = 3 if name.endswith("qkv_proj") else 2 if name.endswith("gate_up_proj") else 1
            if len(found) == needed:
                out[name] = tuple(
                    torch.cat(xs) for xs in zip(*(found[i] for i in range(needed)), strict=True)
                )
        return out

    def _shard(self, name: str, target: torch.Tensor, idx: int) -> torch.Tensor:
        c = self.config
        if "qkv_proj" in name:
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return target.narrow(0, [0, q, q + kv][idx], [q, kv, kv][idx])
        return target.narrow(0, idx * c.intermediate_size, c.intermediate_size)
