"""`falconet train-head`: an EAGLE draft head trained on the target's own features.

EAGLE's recipe (Li et al., 2024), sized for a 2-core CPU:
1. the target answers synthetic instructions (falconet/train/prompts.py) greedily in our own
   engine, and an engine hidden-state tap records its final hidden states at every position
   (prompt and answer) as they are computed: no second pass over the data;
2. the head (methods/speculative/eagle.py) starts from the target's last decoder layer, final
   norm and the LM-head rows of the V' tokens the target used most;
3. for each position t the head reads (f_t + noise, x_{t+1}) and predicts f_{t+1}; the loss is
   EAGLE's: smooth-L1 between the predicted and the real feature, plus 0.1 x the cross-entropy
   of the head's token distribution against the target's own distribution over the V' tokens
   (the target's LM head applied to the real f_{t+1}), on answer positions. Uniform noise on
   the input features (EAGLE's augmentation) teaches the head to read its own imperfect
   predictions, which it gets from the second draft on.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative.eagle import EagleHead, save_head
from falconet.sampling_params import SamplingParams
from falconet.train.distill_draft import (
    Example,
    _rms,
    draft_vocabulary,
    run_adamw,
    shuffled_batches,
    train_layer_forward,
)
from falconet.train.generate import generate


@dataclasses.dataclass
class FeatureExample(Example):
    features: torch.Tensor | None = None  # [len(ids) - 1, hidden]: the target's f_t per position


def collect_features(
    loaded, prompts: list[list[int]], max_tokens: int, max_num_seqs: int = 32
) -> list[FeatureExample]:
    """The target's greedy answers to token-id prompts, with its final hidden states for every
    position but the last (whose feature nothing learns from). Prefix caching is off so that every
    position is computed; a preempted request's recomputed rows overwrite the first ones."""
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=max_num_seqs, enable_prefix_caching=False))
    hidden_size = loaded.config.hidden_size
    dtype = loaded.model.embed_tokens.weight.dtype
    buffers: dict[str, torch.Tensor] = {}

    def record(req, start: int, rows: torch.Tensor) -> None:
        buf = buffers.get(req.request_id)
        if buf is None:
            buf = buffers[req.request_id] = torch.empty(
                len(req.prompt_ids) + max_tokens, hidden_size, dtype=dtype
            )
        buf[start : start + len(rows)] = rows

    engine.hidden_taps.append(record)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    examples = []
    for p, req in zip(prompts, reqs, strict=True):
        ids = req.all_ids
        examples.append(FeatureExample(ids, len(p), buffers.pop(req.request_id)[: len(ids) - 1].clone()))
    return examples


def collect_features_dense(loaded, prompts: list[list[int]], max_tokens: int) -> list[FeatureExample]:
    """`collect_features` by train/generate.py, on the model's own device (a GPU: seconds)."""
    eos = loaded.config.eos_token_ids
    outs = generate(loaded.model, prompts, max_tokens, eos, batch_size=256, features=True)
    return [FeatureExample(p + o.output_ids, len(p), o.features) for p, o in zip(prompts, outs, strict=True)]


def _batch(examples: list[FeatureExample], hidden: int, device="cpu") -> tuple[torch.Tensor, ...]:
    """Padded [B, S] ids, [B, S-1, hidden] features, and the [B, S-2] mask of positions t whose
    prediction (f_{t+1}, x_{t+2}) is learnt: x_{t+2} is an answer token."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    feats = torch.zeros(len(examples), width - 1, hidden, device=device)
    mask = torch.zeros(len(examples), width - 2, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        feats[i, : n - 1] = e.features.float()
        mask[i, max(0, e.answer_start - 2) : n - 2] = True
    return ids.to(device), feats, mask.to(device)


def head_forward(head: EagleHead, ids: torch.Tensor, feats: torch.Tensor, context: list | None = None):
    """Differentiable: predicted features [B, S-1, hidden] for the pairs (feats[:, t], ids[:, t+1]),
    and the layer's (keys, values); `context`: earlier passes' keys and values (training-time test)."""
    emb = F.embedding(ids[:, 1:], head.target.embed_tokens.weight.detach()).float()
    x = head.fc(torch.cat([emb, feats], dim=-1)).float()
    x, kv = train_layer_forward(head.layer, x, context)
    return _rms(head.norm, x), kv


def train_head(
    head: EagleHead,
    examples: list[FeatureExample],
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    noise: float = 0.2,
    ce_weight: float = 0.1,
    unroll: int = 1,
    seed: int = 0,
    log=print,
) -> list[float]:
    """EAGLE's loss (feature regression + 0.1 x soft cross-entropy); returns every step's loss.
    `noise`: width of the uniform noise added to input features, relative to their RMS.
    `unroll`: drafting steps simulated per position (training-time test, as in HASS and EAGLE-3):
    pass m reads, at t, pass m-1's prediction of f_t instead of the real feature, and attends to
    the real entries before t - m + 1 and to each earlier pass's entry after, as drafting step m
    does in the engine. Without it the head only ever sees real features in training, and its
    second draft, made from its own first prediction, is far worse than its first."""
    target = head.target
    rows = target.lm_head.weight[head.draft_vocab].detach().float()  # the target's scores over V'
    params = list(head.parameters())
    batches = shuffled_batches(len(examples), batch_size, seed)
    gen = torch.Generator().manual_seed(seed)
    hidden = head.config.hidden_size
    device = rows.device

    def step_loss(step: int) -> torch.Tensor:
        ids, feats, mask = _batch([examples[i] for i in next(batches)], hidden, device)
        scale = feats.pow(2).mean().sqrt()
        inputs = feats + (torch.rand(feats.shape, generator=gen).to(device) - 0.5) * noise * scale
        real = feats[:, 1:][mask]
        with torch.no_grad():
            p = torch.softmax(real @ rows.T, dim=-1)
        total, context = 0.0, []
        for _ in range(unroll):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred_all, kv = head_forward(head, ids, inputs, context)
                pred = pred_all[:, :-1][mask]  # predictions of f_{t+1}
                logits = head.lm_head(pred)
            regression = F.smooth_l1_loss(pred.float(), real)
            ce = -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            total = total + regression + ce_weight * ce
            # The next pass reads at t this pass's prediction of f_t (the real f_0 at t = 0).
            inputs = torch.cat([inputs[:, :1], pred_all[:, :-1].detach().float()], dim=1)
            context = context + [(kv[0].detach(), kv[1].detach())]
        return total / unroll

    head.train()
    losses = run_adamw(params, steps, lr, step_loss, log)
    head.eval()
    return losses


@torch.no_grad()
def top1_agreement(head: EagleHead, examples: list[FeatureExample]) -> float:
    """Teacher-forced: how often the head's argmax over V' equals the target's next token, on
    answer positions (the first draft's greedy acceptance, in expectation)."""
    hits = total = 0
    vocab = head.draft_vocab
    device = head.lm_head.weight.device
    for e in examples:
        ids, feats, mask = _batch([e], head.config.hidden_size, device)
        pred = head_forward(head, ids, feats)[0][:, :-1][mask]
        guess = vocab[head.lm_head(pred).argmax(-1)]
        want = ids[:, 2:][mask]
        hits += int((guess == want).sum())
        total += len(want)
    return hits / max(total, 1)


def train(
    target_spec: str | None,
    output: Path,
    vocab_size: int = 8192,
    num_prompts: int = 4096,
    max_tokens: int = 128,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    data: Path | None = None,
    unroll: int = 1,
    max_num_seqs: int = 64,
    device: str = "cpu",
    log=print,
) -> dict:
    """The whole recipe; returns what it measured. `data`: a file to keep the collected answers
    and features in (reused when it exists, so the head can be retrained without recollecting).
    `device`: where to collect and train; on CPU the engine collects, elsewhere train/generate.py."""
    from falconet.models.loader import load_model
    from falconet.train.prompts import self_written_prompts, self_written_prompts_dense, synthetic_prompts

    t0 = time.perf_counter()
    on_cpu = torch.device(device).type == "cpu"
    loaded = load_model(target_spec, dtype=torch.bfloat16)
    loaded.model.to(device)
    if data is not None and Path(data).is_file():
        log(f"reading the collected answers and features from {data}")
        examples = [FeatureExample(**e) for e in torch.load(data, map_location=device)]
    else:
        # Three quarters written by the model itself (varied), a quarter from our templates
        # (translation, arithmetic, questions over a passage: the benchmark's task kinds).
        log(f"sampling {3 * num_prompts // 4} user requests from the target itself...")
        if on_cpu:
            engine = LLMEngine(loaded, EngineConfig(max_num_seqs=max_num_seqs))
            prompts = self_written_prompts(engine, 3 * num_prompts // 4 + 48, seed=0, max_tokens=48)
            del engine
        else:
            prompts = self_written_prompts_dense(loaded, 3 * num_prompts // 4 + 48, seed=0, max_tokens=48)
        prompts += synthetic_prompts(num_prompts + 64 - len(prompts), seed=0)
        random.Random(0).shuffle(prompts)
        encoded = [loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        log(f"collecting the answers and features for {len(encoded)} prompts ({max_tokens} tokens)...")
        if on_cpu:
            examples = collect_features(loaded, encoded, max_tokens, max_num_seqs)
        else:
            examples = collect_features_dense(loaded, encoded, max_tokens)
        if data is not None:
            torch.save([dataclasses.asdict(e) for e in examples], data)
    t_collect = time.perf_counter() - t0
    held_out, examples = examples[-64:], examples[:-64]
    target = load_model(target_spec, dtype=torch.float32, with_tokenizer=False).model.to(device)
    eos = list(loaded.config.eos_token_ids)
    del loaded
    full = target.config.vocab_size
    vocab = draft_vocabulary(examples, min(vocab_size, full), full, eos)
    head = EagleHead(target, vocab)
    head.init_from_target()
    head.to(device)
    log(f"training an EAGLE head (vocabulary {len(vocab)}) for {steps} steps...")
    t1 = time.perf_counter()
    losses = train_head(head, examples, steps, batch_size, lr, unroll=unroll, log=log)
    t_train = time.perf_counter() - t1
    agreement = top1_agreement(head, held_out)
    head.to("cpu")
    info = {
        "target": str(target_spec or "smollm2-135m"), "draft_vocab_size": len(vocab),
        "num_prompts": len(examples), "max_tokens": max_tokens, "steps": steps, "batch_size": batch_size,
        "unroll": unroll, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "collect_s": round(t_collect, 1), "train_s": round(t_train, 1), "held_out_top1": round(agreement, 4),
        "device": str(device),
    }  # fmt: skip
    save_head(head, output, info)
    log(f"saved {output} ({info})")
    return info
