"""`falconet train-prompts`: the prompt tokens of Parallel Prompt Decoding, learnt through the
frozen target.

PPD (Chen et al., 2024, "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient
Acceleration of LLM Inference"): m trained input embeddings P_1..P_m, appended after a
sequence x_1..x_t, make the unchanged target guess x_{t+1+j} at P_j, so one forward both
verifies the last step's guesses and makes the next step's (methods/speculative/ppd.py). Only the
m embedding rows are trained (m x hidden numbers: 1,728 for SmolLM2-135M); the target is frozen.

The recipe, sized for a 2-core CPU:
1. the target answers synthetic instructions greedily in our own engine (as for
   `falconet distill-draft`), or a `--data` file of answers collected before is read;
2. each training sequence runs through the target once without gradients (its keys and values at
   every layer); prompt groups are inserted after N random answer positions t at once, each group
   attending to x_1..x_t and to its own earlier prompt rows (positions t+1..t+m, as at inference),
   and only those rows carry gradients;
3. the loss is the cross-entropy of the target's LM head at P_j against x_{t+1+j}, the target's
   own greedy token there (so this is distillation of the target's argmax). PPD's ensemble prompt
   tokens (several embeddings averaged per P_j) are left out.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from falconet.methods.speculative.artifacts import save_artifact
from falconet.train.distill_draft import Example, _rms, collect_outputs, run_adamw, shuffled_batches
from falconet.train.distill_draft import train_layer_forward as real_layer_forward

MARKER = "falconet_prompts.json"


def init_prompts(target, num_prompts: int) -> torch.Tensor:
    """[m, hidden] float32: each starts as the mean input embedding, slightly apart."""
    emb = target.embed_tokens.weight.detach().float()
    g = torch.Generator().manual_seed(0)
    return emb.mean(0).repeat(num_prompts, 1) + 0.01 * emb.std() * torch.randn(
        num_prompts, emb.shape[1], generator=g
    )


def _prompt_layer(layer, xp: torch.Tensor, positions: torch.Tensor, real_kv, mask: torch.Tensor):
    """One decoder layer over the prompt rows xp [B, R, hidden] (positions [B, R]), attending to
    the real tokens' (keys, values) [B, Hkv, S, D] and to each other, as `mask` [B, R, S + R] says."""
    b, r, _ = xp.shape
    attn, mlp = layer.self_attn, layer.mlp
    h = _rms(layer.input_layernorm, xp).reshape(b * r, -1)
    q, k, v = attn.qkv_proj(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.reshape(b * r, attn.num_heads, attn.head_dim)
    k = k.reshape(b * r, attn.num_kv_heads, attn.head_dim)
    v = v.reshape(b * r, attn.num_kv_heads, attn.head_dim)
    q, k = attn.rope(positions.reshape(-1), q, k)
    q, k, v = (t.view(b, r, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    keys = torch.cat([real_kv[0].to(k.dtype), k], dim=2)
    values = torch.cat([real_kv[1].to(v.dtype), v], dim=2)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], enable_gqa=True)
    xp = xp + attn.o_proj(o.transpose(1, 2).reshape(b * r, attn.q_size)).view(b, r, -1).float()
    h = _rms(layer.post_attention_layernorm, xp).reshape(b * r, -1)
    gate, up = mlp.gate_up_proj(h).split(mlp.intermediate, dim=-1)
    return xp + mlp.down_proj(F.silu(gate) * up).view(b, r, -1).float()


def parallel_logits(
    target, ids: torch.Tensor, anchors: torch.Tensor, m: int, start: int, inputs
) -> torch.Tensor:
    """The target's logits [B, N, m, V] at m extra rows inserted after position anchors[b, n] of
    ids[b] (padded [B, S]), each group seeing the tokens up to its anchor and its own earlier rows.
    The extra rows enter at layer `start`: `inputs(stream)` gives their stream [B, N * m, hidden]
    from the real tokens' stream [B, S, hidden] there (differentiable in what it is made of)."""
    b, s = ids.shape
    n = anchors.shape[1]
    positions = (anchors[:, :, None] + torch.arange(1, m + 1)).reshape(b, n * m)
    group = torch.arange(n).repeat_interleave(m)
    step = torch.arange(m).repeat(n)
    sees_real = torch.arange(s)[None, None, :] <= anchors.repeat_interleave(m, dim=1)[:, :, None]
    sees_prompt = (group[:, None] == group[None, :]) & (step[None, :] <= step[:, None])
    mask = torch.cat([sees_real, sees_prompt.expand(b, -1, -1)], dim=2)
    with torch.no_grad():
        xr = F.embedding(ids, target.embed_tokens.weight).float()
    xp = None
    for i, layer in enumerate(target.layers):
        if i == start:
            xp = inputs(xr)
        with torch.no_grad():
            xr, kv = real_layer_forward(layer, xr)
        if xp is not None:
            xp = _prompt_layer(layer, xp, positions, kv, mask)
    return target.compute_logits(_rms(target.norm, xp)).view(b, n, m, -1)


def prompt_logits(target, prompts: torch.Tensor, ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """PPD: P_1..P_m ([m, hidden], differentiable) as the extra rows' input embeddings."""
    b, n = anchors.shape
    return parallel_logits(
        target, ids, anchors, prompts.shape[0], 0, lambda xr: prompts[None].repeat(b, n, 1)
    )


def _batch(examples: list[Example], num_anchors: int, m: int, rng: random.Random):
    """Padded ids [B, S], anchors [B, N] and labels [B, N, m] (-100: past the sequence's end).
    Anchors are answer positions t (the group's P_j learns x_{t+1+j}, an answer token)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    anchors = torch.zeros(len(examples), num_anchors, dtype=torch.long)
    labels = torch.full((len(examples), num_anchors, m), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        valid = range(max(0, e.answer_start - 1), len(e.ids) - 2)
        picks = rng.sample(valid, min(num_anchors, len(valid))) if len(valid) else []
        for n, t in enumerate(picks):
            anchors[i, n] = t
            later = e.ids[t + 2 : t + 2 + m]
            labels[i, n, : len(later)] = torch.tensor(later)
    return ids, anchors, labels


def train_extra_rows(
    logits_of,
    params: list,
    examples: list[Example],
    m: int,
    steps: int,
    batch_size: int,
    num_anchors: int,
    lr: float,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Cross-entropy of `logits_of(ids, anchors)` ([B, N, m, V], differentiable in `params`)
    against the tokens 2..m+1 places past each anchor; returns every step's loss."""  # fmt: skip
    batches = shuffled_batches(len(examples), batch_size, seed)
    rng = random.Random(seed)

    def step_loss(step: int) -> torch.Tensor:
        ids, anchors, labels = _batch([examples[i] for i in next(batches)], num_anchors, m, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = logits_of(ids, anchors)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return run_adamw(params, steps, lr, step_loss, log)


@torch.no_grad()
def top1_by_position(logits_of, m: int, examples: list[Example], num_anchors: int = 32) -> list[float]:
    """Held-out: how often the argmax at extra row j is x_{t+1+j}, per j (teacher-forced)."""
    hits, totals = torch.zeros(m), torch.zeros(m)
    rng = random.Random(1)
    for e in examples:
        ids, anchors, labels = _batch([e], num_anchors, m, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            guess = logits_of(ids, anchors).argmax(-1)
        valid = labels >= 0
        hits += ((guess == labels) & valid).sum(dim=(0, 1)).float()
        totals += valid.sum(dim=(0, 1)).float()
    return (hits / totals.clamp(min=1)).tolist()


def train_prompt_tokens(
    target,
    examples: list[Example],
    num_prompts: int = 3,
    steps: int = 200,
    batch_size: int = 4,
    num_anchors: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
    log=print,
) -> tuple[torch.Tensor, list[float]]:
    """Returns the trained [m, hidden] embeddings (float32) and every step's loss."""
    target.requires_grad_(False)
    prompts = torch.nn.Parameter(init_prompts(target, num_prompts))
    losses = train_extra_rows(
        lambda ids, anchors: prompt_logits(target, prompts, ids, anchors),
        [prompts], examples, num_prompts, steps, batch_size, num_anchors, lr, seed, log,
    )  # fmt: skip
    return prompts.detach(), losses


def top1_by_prompt(
    target, prompts: torch.Tensor, examples: list[Example], num_anchors: int = 32
) -> list[float]:
    """Held-out: how often the target's argmax at P_j is x_{t+1+j}, per j (teacher-forced)."""
    logits_of = lambda ids, anchors: prompt_logits(target, prompts, ids, anchors)  # noqa: E731
    return top1_by_position(logits_of, prompts.shape[0], examples, num_anchors)


def default_prompts_path(model_path) -> Path:
    """Where `falconet train-prompts` saves for a model by default (and `ppd` looks)."""
    from falconet.models.catalog import falconet_home

    return falconet_home() / "heads" / f"{Path(model_path).stem}-ppd"


def save_prompts(path: Path, prompts: torch.Tensor, config, info: dict) -> None:
    save_artifact(path, {"prompt_embeddings": prompts}, config, MARKER, info)


def read_examples(data: Path) -> list[Example]:
    """Answers saved by `falconet train-head --data` or by this command."""
    return [Example(list(e["ids"]), int(e["answer_start"])) for e in torch.load(data)]


def target_answers(
    target_spec, data: Path | None, num_prompts: int, max_tokens: int, log=print
) -> list[Example]:
    """The target's greedy answers to synthetic instructions, or those kept in `data` (a file
    written here or by `falconet train-head --data`, read if it exists, else written)."""
    from falconet.api import LLM
    from falconet.train.prompts import synthetic_prompts

    if data is not None and Path(data).is_file():
        log(f"reading the collected answers from {data}")
        return read_examples(data)
    llm = LLM(target_spec, dtype="bfloat16", max_num_seqs=32)
    prompts = synthetic_prompts(num_prompts + 32, seed=0)
    log(f"collecting the target's answers to {len(prompts)} prompts ({max_tokens} tokens each)...")
    examples = collect_outputs(llm, prompts, max_tokens)
    if data is not None:
        torch.save([{"ids": e.ids, "answer_start": e.answer_start} for e in examples], data)
    return examples


def train(
    target_spec: str | None,
    output: Path,
    num_prompt_tokens: int = 3,
    num_prompts: int = 1024,
    max_tokens: int = 128,
    steps: int = 300,
    batch_size: int = 8,
    num_anchors: int = 32,
    lr: float = 1e-2,
    data: Path | None = None,
    log=print,
) -> dict:
    """The whole recipe; returns what it measured (times, loss, held-out accuracy per P_j)."""
    from falconet.models.loader import load_model

    t0 = time.perf_counter()
    examples = target_answers(target_spec, data, num_prompts, max_tokens, log)
    t_collect = time.perf_counter() - t0
    held_out, examples = examples[-32:], examples[:-32]
    target = load_model(target_spec, dtype=torch.float32, with_tokenizer=False).model
    log(f"training {num_prompt_tokens} prompt tokens through the frozen target for {steps} steps...")
    t1 = time.perf_counter()
    prompts, losses = train_prompt_tokens(
        target, examples, num_prompt_tokens, steps, batch_size, num_anchors, lr, log=log
    )
    t_train = time.perf_counter() - t1
    top1 = top1_by_prompt(target, prompts, held_out)
    info = {
        "target": str(target_spec or "smollm2-135m"), "num_prompt_tokens": num_prompt_tokens,
        "num_prompts": len(examples), "max_tokens": max_tokens, "steps": steps, "batch_size": batch_size,
        "num_anchors": num_anchors, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "collect_s": round(t_collect, 1), "train_s": round(t_train, 1),
        "held_out_top1": [round(a, 4) for a in top1],
    }  # fmt: skip
    save_prompts(output, prompts, target.config, info)
    log(f"saved {output} ({info})")
    return info
