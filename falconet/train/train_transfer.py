"""`falconet train-transfer`: hidden transfer's linear maps, learnt through the frozen target.

Hidden transfer (Wu et al., 2024; methods/speculative/hidden_transfer.py): W_j h_t + b_j, h_t the
stream of token t entering layer L, is a pseudo hidden state of token t+1+j that the target's
layers L..end and LM head turn into a guess. The recipe is `falconet train-prompts`' (same
answers, same groups inserted after random answer positions, same loss against the target's
greedy tokens), with the m maps (started at the identity) trained in place of prompt embeddings.
Only layers L..end run with gradients.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from falconet.methods.speculative.hidden_transfer import TransferLayers, save_transfer
from falconet.train.train_prompts import parallel_logits, target_answers, top1_by_position, train_extra_rows


def transfer_logits(
    target, transfer: TransferLayers, ids: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """[B, N, m, V]: the pseudo rows of groups inserted after anchors [B, N] of ids [B, S]."""
    b, n = anchors.shape
    m = transfer.num_tokens

    def inputs(stream: torch.Tensor) -> torch.Tensor:
        h = stream[torch.arange(b)[:, None], anchors]  # [B, N, hidden]
        return transfer.all_tokens(h).reshape(b, n * m, -1)

    return parallel_logits(target, ids, anchors, m, transfer.layer, inputs)


def train(
    target_spec: str | None,
    output: Path,
    num_tokens: int = 3,
    layer: int | None = None,
    num_prompts: int = 1024,
    max_tokens: int = 128,
    steps: int = 600,
    batch_size: int = 8,
    num_anchors: int = 32,
    lr: float = 2e-3,
    data: Path | None = None,
    log=print,
) -> dict:
    """The whole recipe; returns what it measured. `layer`: where the transfer happens (default:
    half-way up)."""
    from falconet.models.loader import load_model

    t0 = time.perf_counter()
    examples = target_answers(target_spec, data, num_prompts, max_tokens, log)
    t_collect = time.perf_counter() - t0
    held_out, examples = examples[-32:], examples[:-32]
    target = load_model(target_spec, dtype=torch.float32, with_tokenizer=False).model
    target.requires_grad_(False)
    layer = target.config.num_layers // 2 if layer is None else layer
    transfer = TransferLayers(num_tokens, target.config.hidden_size, layer)
    log(
        f"training {num_tokens} transfer maps at layer {layer} through the frozen target for {steps} steps..."
    )
    t1 = time.perf_counter()
    logits_of = lambda ids, anchors: transfer_logits(target, transfer, ids, anchors)  # noqa: E731
    losses = train_extra_rows(
        logits_of,
        list(transfer.parameters()),
        examples,
        num_tokens,
        steps,
        batch_size,
        num_anchors,
        lr,
        log=log,
    )
    t_train = time.perf_counter() - t1
    top1 = top1_by_position(logits_of, num_tokens, held_out)
    info = {
        "target": str(target_spec or "smollm2-135m"), "num_tokens": num_tokens, "layer": layer,
        "num_prompts": len(examples), "max_tokens": max_tokens, "steps": steps, "batch_size": batch_size,
        "num_anchors": num_anchors, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "collect_s": round(t_collect, 1), "train_s": round(t_train, 1),
        "held_out_top1": [round(a, 4) for a in top1],
    }  # fmt: skip
    save_transfer(output, transfer, target.config, info)
    log(f"saved {output} ({info})")
    return info
