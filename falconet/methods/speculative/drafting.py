"""Autoregressive drafting with a model over the engine's paged KV layout (shared by the
draft-model and layer-skip proposers), and the token choice every model-based drafter makes."""

from __future__ import annotations

import torch

from falconet.engine.sampler import _draw, warp_logits
from falconet.methods.speculative.base import Draft
from falconet.models.kv_cache import PagedKVCache, Segment


def new_drafts(requests: list) -> list[Draft]:
    """Empty drafts; sampling requests collect the distribution of each draft token."""
    return [Draft([], [] if not r.params.greedy else None, confidence=[]) for r in requests]


def choose_tokens(
    logits: torch.Tensor, requests: list, drafts: list[Draft], vocab, full_size: int
) -> list[float]:
    """Append one draft token per row of `logits` to drafts[i] (for requests[i]); returns the
    probability the drafter gave each chosen token (its confidence).

    Greedy requests draft the argmax (a point mass); sampling requests draw from the
    temperature/top-k/top-p/min-p shaped distribution with the request's own generator and keep
    it. `vocab`: the full-vocabulary id of each logit column for a reduced head (None: all)."""
    confidence = []
    for row, (req, draft) in enumerate(zip(requests, drafts, strict=True)):
        if req.params.greedy:
            probs = torch.softmax(logits[row], dim=-1)
            token = int(probs.argmax())
            confidence.append(float(probs[token]))
            draft.tokens.append(token if vocab is None else int(vocab[token]))
        else:
            q = torch.softmax(warp_logits(logits[row : row + 1], [req.params]), dim=-1)[0]
            token = int(_draw(q[None], [req.generator])[0])
            confidence.append(float(q[token]))
            if vocab is not None:  # q over the whole vocabulary: zero outside the draft's
                token, q = int(vocab[token]), torch.zeros(full_size).index_copy_(0, vocab, q)
            draft.tokens.append(token)
            draft.probs.append(q)
        if draft.confidence is not None:
            draft.confidence.append(confidence[-1])
    return confidence


def finish_drafts(drafts: list[Draft]) -> list[Draft]:
    for d in drafts:
        if d.probs is not None:
            d.probs = torch.stack(d.probs) if d.probs else None
    return drafts


@torch.inference_mode()
def draft_autoregressively(
    model,
    cache: PagedKVCache,
    requests: list,
    computed: list[int],
    max_tokens: list[int],
    num_layers: int | None = None,
    keep_going=None,
    continues=None,
) -> list[Draft]:
    """Draft max_tokens[i] tokens for requests[i] with `model` (its first `num_layers` layers).

    computed[i]: positions of requests[i] whose KV the drafting model already has in `cache`
    (through the request's block table). The first forward catches up from there to the last
    known token; each later one feeds the previous draft. keep_going: asked before each later
    forward; False stops every draft where it is (a drafter with a time limit). continues(i,
    logits): asked after each token drafted for requests[i], with the logits it was chosen from;
    False ends that request's draft (a learnt stopping rule).
    """
    # A draft with a reduced head (falconet distill-draft) scores only these token ids.
    vocab = getattr(model, "draft_vocab", None)
    drafts = new_drafts(requests)
    active = [i for i, n in enumerate(max_tokens) if n > 0]
    step = 0
    while active:
        ids, positions, segments, last_rows = [], [], [], []
        for i in active:
            req = requests[i]
            if step == 0:
                start, tokens = computed[i], req.all_ids[computed[i] :]
            else:
                start, tokens = req.num_tokens + step - 1, drafts[i].tokens[-1:]
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            segments.append(Segment(req.block_table, start, len(tokens)))
            last_rows.append(len(ids) - 1)
        cache.begin_step(segments)
        hidden = model(torch.tensor(ids), torch.tensor(positions), cache, num_layers=num_layers)
        logits = model.compute_logits(hidden[torch.tensor(last_rows)])
        reqs = [requests[i] for i in active]
        choose_tokens(logits, reqs, [drafts[i] for i in active], vocab, model.config.vocab_size)
        step += 1
        active = [
            i
            for row, i in enumerate(active)
            if (continues is None or continues(i, logits[row])) and len(drafts[i].tokens) < max_tokens[i]
        ]
        if keep_going is not None and active and not keep_going():
            break
    return finish_drafts(drafts)
