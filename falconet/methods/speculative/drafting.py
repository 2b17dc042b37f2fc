"""Autoregressive drafting with a model over the engine's paged KV layout (shared by the
draft-model and layer-skip proposers)."""

from __future__ import annotations

import torch

from falconet.engine.sampler import _draw, warp_logits
from falconet.methods.speculative.base import Draft
from falconet.models.kv_cache import PagedKVCache, Segment


@torch.inference_mode()
def draft_autoregressively(
    model,
    cache: PagedKVCache,
    requests: list,
    computed: list[int],
    max_tokens: list[int],
    num_layers: int | None = None,
) -> list[Draft]:
    """Draft max_tokens[i] tokens for requests[i] with `model` (its first `num_layers` layers).

    computed[i]: positions of requests[i] whose KV the drafting model already has in `cache`
    (through the request's block table). The first forward catches up from there to the last
    known token; each later one feeds the previous draft. Greedy requests draft the argmax
    (a point mass); sampling requests draw from the temperature/top-k/top-p/min-p shaped
    distribution with the request's own generator, and report it.
    """
    # A draft with a reduced head (falconet distill-draft) scores only these token ids.
    vocab = getattr(model, "draft_vocab", None)
    full_size = model.config.vocab_size
    drafts = [Draft([], [] if not r.params.greedy else None) for r in requests]
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
        for row, i in enumerate(active):
            req, draft = requests[i], drafts[i]
            if req.params.greedy:
                token = int(logits[row].argmax())
                draft.tokens.append(token if vocab is None else int(vocab[token]))
            else:
                q = torch.softmax(warp_logits(logits[row : row + 1], [req.params]), dim=-1)[0]
                token = int(_draw(q[None], [req.generator])[0])
                if vocab is not None:  # q over the whole vocabulary: zero outside the draft's
                    token, q = int(vocab[token]), torch.zeros(full_size).index_copy_(0, vocab, q)
                draft.tokens.append(token)
                draft.probs.append(q)
        step += 1
        active = [i for i in active if len(drafts[i].tokens) < max_tokens[i]]
    for d in drafts:
        if d.probs is not None:
            d.probs = torch.stack(d.probs) if d.probs else None
    return drafts
