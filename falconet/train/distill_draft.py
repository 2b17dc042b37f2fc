"""`falconet distill-draft`: a small draft model trained on the target's own outputs.

Distillation for speculative decoding (DistillSpec, Zhou et al., 2024): a draft agrees with the
target more often when it is trained on what the target says rather than on generic text. The
recipe here, sized for a 2-core CPU:
1. the target answers synthetic instructions (falconet/train/prompts.py), greedily, with our
   own engine;
2. the draft is the target's first L decoder layers (copied as a starting point), its final norm
   and an LM head over the V' tokens the target used most in those answers, initialised from the
   target's output embeddings. It shares the target's input embeddings, so they are not stored.
   A reduced vocabulary keeps drafting cheap: with the full 49k-token head a 2-layer draft of
   SmolLM2-135M costs about a quarter of the target per token, with 8k about a tenth;
3. the layers, the norm and the head are trained with cross-entropy on the target's tokens
   (answer positions only; tokens outside the draft vocabulary are skipped), AdamW, bf16
   autocast.

Saved as a folder: falconet_draft.json (what it is), config.json (our ModelConfig) and
model.safetensors (our parameter names, plus `draft_vocab`, the full-vocabulary id of each head
row). `falconet.methods.speculative.draft_model` loads it with --draft-model PATH.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from falconet.config import ModelConfig
from falconet.errors import FalconetError
from falconet.methods.speculative.artifacts import read_artifact, save_artifact
from falconet.models.linear import Linear
from falconet.models.llama import LlamaForCausalLM

MARKER = "falconet_draft.json"


@dataclasses.dataclass
class Example:
    ids: list[int]  # prompt + answer
    answer_start: int  # index of the first answer token


def collect_outputs(llm, prompts: list[str], max_tokens: int, temperature: float = 0.0) -> list[Example]:
    """The target's answers to `prompts` (chat template applied), batched through the engine."""
    from falconet.sampling_params import SamplingParams

    encoded = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=0)
    outputs = llm.generate(encoded, params)
    return [Example(ids + out.token_ids, len(ids)) for ids, out in zip(encoded, outputs, strict=True)]


def draft_vocabulary(examples: list[Example], size: int, vocab_size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent answer tokens (plus `always`, e.g. EOS), sorted by id."""
    counts = Counter(t for e in examples for t in e.ids[e.answer_start :])
    chosen = set(always)
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        chosen.add(token)
    for token in range(vocab_size):  # fill up (tiny corpora) with the lowest ids not chosen
        if len(chosen) >= size:
            break
        chosen.add(token)
    return torch.tensor(sorted(chosen)[:size], dtype=torch.long)


def build_draft(target: LlamaForCausalLM, num_layers: int, vocab: torch.Tensor) -> LlamaForCausalLM:
    """The target's first `num_layers` layers, its norm and a head over `vocab` (float32)."""
    config = dataclasses.replace(target.config, num_layers=num_layers, tie_word_embeddings=False)
    draft = _skeleton(config, len(vocab))
    draft.embed_tokens = target.embed_tokens  # shared, frozen
    with torch.no_grad():
        for mine, theirs in zip(draft.layers, target.layers, strict=False):
            mine.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()})
        draft.norm.weight.copy_(target.norm.weight.float())
        draft.lm_head.weight.copy_(target.lm_head.weight[vocab].float())
    draft.draft_vocab = vocab
    return draft


def _skeleton(config: ModelConfig, head_size: int) -> LlamaForCausalLM:
    """Built with a 1-token vocabulary (the caller gives it the target's embeddings) and a
    reduced head: no full-size tensors are allocated for nothing."""
    draft = LlamaForCausalLM(dataclasses.replace(config, vocab_size=1, tie_word_embeddings=False))
    draft.config = config
    draft.lm_head = Linear(config.hidden_size, head_size, bias=False)
    return draft


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps))


def train_forward(draft: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Differentiable forward over [B, S] token ids (causal, no KV cache): head logits [B, S, V']."""
    x = F.embedding(ids, draft.embed_tokens.weight.detach()).float()
    for layer in draft.layers:
        x, _ = train_layer_forward(layer, x)
    return draft.lm_head(_rms(draft.norm, x))


def train_layer_forward(layer, x: torch.Tensor, context: list | None = None):
    """One decoder layer, differentiable, over a [B, S, hidden] float32 residual stream (causal
    attention within each row, positions 0..S-1, no KV cache). Returns (output, (keys, values)).

    `context`: the (keys, values) of earlier passes over the same positions, for EAGLE-style
    training-time test. Pass m (m - 1 earlier passes) models drafting step m: its query at t sees
    the first pass's entries up to t - m + 1 (real features), then pass i's entry at t - m + i."""
    b, s, _ = x.shape
    attn, mlp = layer.self_attn, layer.mlp
    positions = torch.arange(s, device=x.device).repeat(b)
    h = _rms(layer.input_layernorm, x).reshape(b * s, -1)
    q, k, v = attn.qkv_proj(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.reshape(b * s, attn.num_heads, attn.head_dim)
    k = k.reshape(b * s, attn.num_kv_heads, attn.head_dim)
    v = v.reshape(b * s, attn.num_kv_heads, attn.head_dim)
    q, k = attn.rope(positions, q, k)
    q, k, v = (t.view(b, s, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    if not context:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        m = len(context) + 1
        keys = torch.cat([c[0] for c in context] + [k], dim=2)
        values = torch.cat([c[1] for c in context] + [v], dim=2)
        ones = torch.ones(s, s, dtype=torch.bool, device=x.device)
        mask = [torch.tril(ones, -(m - 1))]
        mask += [torch.tril(ones, i - m) & torch.triu(ones, i - m) for i in range(2, m + 1)]  # j == t - m + i
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat(mask, dim=1), enable_gqa=True)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(b * s, attn.q_size)).view(b, s, -1).float()
    h = _rms(layer.post_attention_layernorm, x).reshape(b * s, -1)
    gate, up = mlp.gate_up_proj(h).split(mlp.intermediate, dim=-1)
    return x + mlp.down_proj(F.silu(gate) * up).view(b, s, -1).float(), (k, v)


def _batch(examples: list[Example], index_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        row = torch.tensor(e.ids)
        ids[i, : len(row)] = row
        # position t predicts token t + 1: learn only the answer's tokens
        targets = index_of[row[e.answer_start :]]
        labels[i, e.answer_start - 1 : len(row) - 1] = targets
    return ids, labels


def train_draft(
    draft: LlamaForCausalLM,
    examples: list[Example],
    steps: int,
    batch_size: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Cross-entropy on the target's answer tokens; returns the loss of every step."""
    vocab = draft.draft_vocab
    index_of = torch.full((draft.config.vocab_size,), -100, dtype=torch.long)
    index_of[vocab] = torch.arange(len(vocab))
    params = [p for name, p in draft.named_parameters() if not name.startswith("embed_tokens")]
    for p in draft.embed_tokens.parameters():
        p.requires_grad_(False)
    batches = shuffled_batches(len(examples), batch_size, seed)

    def step_loss(step: int) -> torch.Tensor:
        ids, labels = _batch([examples[i] for i in next(batches)], index_of)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = train_forward(draft, ids)
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)

    draft.train()
    losses = run_adamw(params, steps, lr, step_loss, log)
    draft.eval()
    return losses


def shuffled_batches(n: int, batch_size: int, seed: int):
    """Endless batches of example indices: epochs in a seeded random order."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(n), n)
        yield order[:batch_size]
        order = order[batch_size:]


def run_adamw(params: list, steps: int, lr: float, step_loss, log=print) -> list[float]:
    """AdamW with a 20-step warm-up and cosine decay, gradients clipped at 1; `step_loss(i)`
    returns step i's loss. Returns every step's loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s")
    return losses


def save_draft(draft: LlamaForCausalLM, path: Path, info: dict) -> None:
    tensors = {n: p for n, p in draft.named_parameters() if not n.startswith("embed_tokens")}
    save_artifact(path, {**tensors, "draft_vocab": draft.draft_vocab}, draft.config, MARKER, info)


def default_draft_path(model_path, num_layers: int = 2) -> Path:
    """Where `falconet distill-draft` saves a draft for a model by default (and draft-model looks)."""
    from falconet.models.catalog import falconet_home

    return falconet_home() / "drafts" / f"{Path(model_path).stem}-L{num_layers}"


def is_distilled_draft(path) -> bool:
    return (Path(path) / MARKER).is_file()


def load_draft(path, target: LlamaForCausalLM, dtype: torch.dtype) -> LlamaForCausalLM:
    """A draft saved by `save_draft`, sharing `target`'s embeddings, in `dtype`."""
    config, tensors = read_artifact(path, "draft", target.config)
    vocab = tensors.pop("draft_vocab")
    draft = _skeleton(config, len(vocab))
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.startswith("embed_tokens")]
    if missing or unexpected:
        raise FalconetError(f"{path}: weights do not fit its config (missing {missing}, extra {unexpected})")
    draft.to(dtype)
    # After .to(): the shared embedding table stays the target's, and so do the rope tables,
    # which stay float32 (the fused RoPE kernel wants them so).
    draft.embed_tokens = target.embed_tokens
    for layer in draft.layers:
        layer.self_attn.rope = target.layers[0].self_attn.rope
    draft.max_positions = target.max_positions
    draft.draft_vocab = vocab
    return draft.eval()


def distill(
    target_spec: str | None,
    output: Path,
    num_layers: int = 2,
    vocab_size: int = 8192,
    num_prompts: int = 4096,
    max_tokens: int = 128,
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 5e-4,
    log=print,
) -> dict:
    """The whole recipe; returns what it measured (times, final loss)."""
    from falconet.api import LLM
    from falconet.models.loader import load_model
    from falconet.train.prompts import synthetic_prompts

    t0 = time.perf_counter()
    llm = LLM(target_spec, dtype="bfloat16", max_num_seqs=32)
    prompts = synthetic_prompts(num_prompts, seed=0)
    log(f"collecting the target's answers to {len(prompts)} prompts ({max_tokens} tokens each)...")
    examples = collect_outputs(llm, prompts, max_tokens)
    t_collect = time.perf_counter() - t0
    eos = list(llm.engine.eos_ids)
    del llm
    target = load_model(target_spec, dtype=torch.float32, with_tokenizer=False).model
    full = target.config.vocab_size
    vocab = draft_vocabulary(examples, min(vocab_size, full), full, eos)
    draft = build_draft(target, num_layers, vocab)
    log(f"training a {num_layers}-layer draft (vocabulary {len(vocab)}) for {steps} steps...")
    t1 = time.perf_counter()
    losses = train_draft(draft, examples, steps, batch_size, lr, log=log)
    t_train = time.perf_counter() - t1
    info = {
        "target": str(target_spec or "smollm2-135m"), "num_layers": num_layers,
        "draft_vocab_size": len(vocab),
        "num_prompts": num_prompts, "max_tokens": max_tokens, "steps": steps, "batch_size": batch_size,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "collect_s": round(t_collect, 1),
        "train_s": round(t_train, 1),
    }  # fmt: skip
    save_draft(draft, output, info)
    log(f"saved {output} ({info})")
    return info
