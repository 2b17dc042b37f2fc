"""`falconet bench multi-draft`: how close SpecTr and RSD come to the best any verifier can do.

Hu et al. (2025), "Towards Optimal Multi-draft Speculative Decoding": for a given way of drawing
k drafts, the highest acceptance any exact verifier reaches is an optimal-transport problem whose
dual is a minimum over token sets (multi_draft.optimal_acceptance). This measures, on the target's
own next-token distributions p and the EAGLE head's q (teacher-forced on the target's greedy
answers to the benchmark's prompts, both at the chosen temperature), the acceptance at one
position of:
- SpecTr's k-sequential selection over k i.i.d. drafts (exact: 1 - (1 - beta)^k),
- recursive rejection sampling over k drafts drawn without replacement (RSD; Monte Carlo),
next to the optimum for each way of drawing (exact for i.i.d.; for k = 2 without replacement an
upper bound), and single-draft speculative sampling (k = 1: sum of min(p, q)).
"""

from __future__ import annotations

import argparse
import time

import torch

from falconet.methods.speculative.multi_draft import (
    optimal_acceptance,
    rrs_select,
    sample_without_replacement,
    spectr_rho,
)


def acceptance_table(
    p_rows: torch.Tensor, q_rows: torch.Tensor, ks=(1, 2, 3), trials: int = 200, seed: int = 0
) -> dict[int, dict[str, float]]:
    """Mean acceptance over positions (rows of p and q, full-vocabulary distributions)."""
    g = torch.Generator().manual_seed(seed)
    # without replacement the optimum is computed for k <= 2 (multi_draft.optimal_acceptance)
    out = {
        k: {"spectr": 0.0, "optimal_iid": 0.0, "rsd": 0.0, "optimal_without": 0.0 if k <= 2 else float("nan")}
        for k in ks
    }
    n = len(p_rows)
    for p, q in zip(p_rows, q_rows, strict=True):
        p, q = p.double(), q.double()
        for k in ks:
            _, beta = spectr_rho(p, q, k)
            row = out[k]
            row["spectr"] += (1.0 - (1.0 - beta) ** k) / n
            row["optimal_iid"] += optimal_acceptance(p, q, k) / n
            hits = 0
            for _ in range(trials):
                chosen, _ = rrs_select(p, q, sample_without_replacement(q, k, g), g)
                hits += chosen is not None
            row["rsd"] += hits / trials / n
            if k <= 2:
                row["optimal_without"] += optimal_acceptance(p, q, k, replacement=False) / n
    return out


@torch.no_grad()
def distributions(
    loaded, head, prompts: list[list[int]], max_tokens: int, temperature: float, positions: int
):
    """(p, q) rows at up to `positions` answer positions spread over the prompts' greedy answers."""
    from falconet.train.train_head import _batch, collect_features, head_forward

    examples = collect_features(loaded, prompts, max_tokens)
    vocab, size = head.draft_vocab, loaded.config.vocab_size
    lm_head = loaded.model.lm_head
    p_rows, q_rows = [], []
    for e in examples:
        ids, feats, mask = _batch([e], head.config.hidden_size)
        pred = head_forward(head, ids, feats)[0][0, :-1][mask[0]]  # predicts x_{t+2} from (f_t, x_{t+1})
        target_feats = e.features[1:][mask[0]]  # f_{t+1}: the target's own distribution for x_{t+2}
        p = torch.softmax(lm_head(target_feats.to(lm_head.weight.dtype)).float() / temperature, -1)
        q_small = torch.softmax(head.lm_head(pred).float() / temperature, -1)
        q = torch.zeros(len(q_small), size).index_copy_(1, vocab, q_small)
        p_rows.append(p)
        q_rows.append(q)
    p_all, q_all = torch.cat(p_rows), torch.cat(q_rows)
    pick = torch.linspace(0, len(p_all) - 1, min(positions, len(p_all))).round().long()
    return p_all[pick], q_all[pick]


def cmd_bench_multi_draft(args) -> int:
    from falconet.bench.spec import load_prompts
    from falconet.methods.speculative.eagle import default_head_path, load_head
    from falconet.models.catalog import resolve
    from falconet.models.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve(args.model)
    loaded = load_model(model_path, dtype=args.dtype)
    # float32: the head runs teacher-forced through its training path here
    head = load_head(args.draft_head or default_head_path(model_path), loaded.model, torch.float32)
    items = load_prompts(per_category=args.per_category)
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": it["turns"][0]}]) for it in items]
    t0 = time.perf_counter()
    p, q = distributions(loaded, head, prompts, args.max_tokens, args.temperature, args.positions)
    table = acceptance_table(p, q, tuple(range(1, args.max_drafts + 1)), args.trials)
    print(
        f"{len(prompts)} prompts, {len(p)} answer positions, temperature {args.temperature}, "
        f"EAGLE head drafts ({time.perf_counter() - t0:.0f} s)\n"
    )
    print(
        "| drafts k | SpecTr (i.i.d.) | optimum, i.i.d. | RSD (without replacement) "
        "| optimum, without replacement |"
    )
    print("|---|---|---|---|---|")
    for k, row in table.items():
        bound = "-" if row["optimal_without"] != row["optimal_without"] else f"{row['optimal_without']:.4f}"
        if k == 2 and bound != "-":
            bound += " (upper bound)"
        print(f"| {k} | {row['spectr']:.4f} | {row['optimal_iid']:.4f} | {row['rsd']:.4f} | {bound} |")
    return 0


def add_multi_draft_parser(bench_subparsers) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser(
        "multi-draft", help="SpecTr and RSD acceptance against the optimal multi-draft acceptance"
    )
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--draft-head", default=None, help="EAGLE head (falconet train-head)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--positions", type=int, default=300)
    p.add_argument("--max-drafts", type=int, default=3)
    p.add_argument("--trials", type=int, default=200, help="Monte Carlo trials per position for RSD")
    p.set_defaults(func=cmd_bench_multi_draft)
    return p
