"""EAGLE: a one-layer draft head over the target's own features.

EAGLE (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty"): drafting at the level of features (the target's last hidden states, the input
of its LM head) is easier than at the level of tokens, and a draft that is given the token
actually sampled knows which branch the target took. The head maps the pair
(feature f_t, token x_{t+1}) at position t to a prediction of f_{t+1}: an input projection
of [embed(x_{t+1}); f_t], one decoder layer attending to the head's earlier positions, a norm;
the prediction goes through an LM head (here over a reduced vocabulary, initialised from the
target's rows, as a cheap stand-in for the full head) to give the next draft token, and is fed
back as the feature of the next draft step.

In the engine, the target's hidden rows of each step reach the proposer (`observe`): where the
target computed a position, the head catches up with the real feature, so only the positions
drafted in this step run on predicted ones. The head's one-layer KV cache is laid out like the
target's and indexed by the same block tables. A prefix-cache hit skips the target's forward,
so it brings no features: a new request may reuse a cached block only if the head wrote its
entries for the block's current content (tracked by the block manager's content id), and the
target recomputes the rest. (The entry at a block's last slot read the next block's first
token; where a new prompt differs right there, that one entry is slightly off: drafts may get
worse, never the output, which verification keeps exact.)

`falconet train-head` (falconet/train/train_head.py) trains a head for a model; it is saved as
a folder (falconet_head.json, config.json, model.safetensors) and found by default in
$FALCONET_HOME/heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from falconet.errors import FalconetError
from falconet.methods.quant.int8 import Int8WeightOnly
from falconet.methods.speculative.artifacts import find_artifact, read_artifact, save_artifact
from falconet.methods.speculative.base import Draft, Proposer, ProposerError, merge_trees
from falconet.methods.speculative.drafting import choose_tokens, finish_drafts, new_drafts
from falconet.methods.speculative.ngram import NgramIndex, lookup_tree
from falconet.models.kv_cache import PagedKVCache, Segment
from falconet.models.linear import Linear, bf16_linear_kernels
from falconet.models.llama import DecoderLayer, LlamaForCausalLM, RMSNorm

MARKER = "falconet_head.json"


class EagleHead(nn.Module):
    """fc([embed(token); feature]) -> one decoder layer -> norm: the next feature; `lm_head`
    scores the tokens of `draft_vocab` from it. Shares the target's embeddings and RoPE tables."""

    def __init__(self, target: LlamaForCausalLM, vocab: torch.Tensor):
        super().__init__()
        c = target.config
        self.config = dataclasses.replace(c, num_layers=1)
        self.fc = Linear(2 * c.hidden_size, c.hidden_size, bias=True)
        self.layer = DecoderLayer(self.config, 0, target.layers[0].self_attn.rope)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, len(vocab), bias=False)
        self.register_buffer("draft_vocab", vocab.clone(), persistent=False)
        # Not submodules: the target owns its embeddings and RoPE tables (float32, which the
        # fused RoPE kernel wants), so `.to(dtype)` and saving must not reach them.
        object.__setattr__(self, "target", target)
        attn = self.layer.self_attn
        del attn._modules["rope"]
        object.__setattr__(attn, "rope", target.layers[0].self_attn.rope)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target.embed_tokens(ids)

    def forward(
        self, ids: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, kv_cache
    ) -> torch.Tensor:
        """Predicted features [T, hidden] for the flattened pairs (features[i], ids[i]) at
        `positions` (features[i] is the target's hidden state at positions[i], ids[i] the token
        after it)."""
        x = self.fc(torch.cat([self.embed(ids), features.to(self.fc.weight.dtype)], dim=-1))
        x, residual = self.layer(x, None, positions, kv_cache)
        return self.norm(x, residual)

    def compute_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features).float()

    def init_from_target(self) -> None:
        """A starting point (float32): the target's last layer, final norm and vocabulary rows;
        fc reads the feature half as the identity, so the untrained head is the last layer run
        once more on the target's output."""
        t = self.target
        with torch.no_grad():
            self.layer.load_state_dict({k: v.float() for k, v in t.layers[-1].state_dict().items()})
            self.norm.weight.copy_(t.norm.weight.float())
            self.lm_head.weight.copy_(t.lm_head.weight[self.draft_vocab].float())
            h = self.config.hidden_size
            self.fc.weight.zero_()
            self.fc.weight[:, h:] = torch.eye(h)
            self.fc.weight[:, :h].normal_(0.0, 0.02)
            self.fc.bias.zero_()


def int8_draft_head(head: EagleHead) -> EagleHead:
    """A copy of `head` whose layer and LM head run on weight-only int8 weights (fc, whose
    dtype the head's inputs and cache follow, stays as it is). The copy shares the target."""
    copy = EagleHead(head.target, head.draft_vocab).to(head.fc.weight.dtype)
    copy.load_state_dict(head.state_dict())
    fc = copy.fc
    Int8WeightOnly().apply(copy)
    copy.fc = fc
    return copy.eval()


def default_head_path(model_path) -> Path:
    """Where `falconet train-head` saves a head for a model by default (and `eagle` looks)."""
    from falconet.models.catalog import falconet_home

    return falconet_home() / "heads" / f"{Path(model_path).stem}-eagle"


def is_eagle_head(path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_head(head: EagleHead, path: Path, info: dict) -> None:
    tensors = {**dict(head.named_parameters()), "draft_vocab": head.draft_vocab}
    save_artifact(path, tensors, head.target.config, MARKER, info)


def load_head(path, target: LlamaForCausalLM, dtype: torch.dtype) -> EagleHead:
    """A head saved by `save_head` for `target`, in `dtype`."""
    _, tensors = read_artifact(path, "EAGLE head", target.config)
    head = EagleHead(target, tensors.pop("draft_vocab"))
    try:
        missing, unexpected = head.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes differ
        raise FalconetError(f"{path}: this EAGLE head was made for another model ({e})") from None
    if missing or unexpected:
        raise FalconetError(f"{path}: weights do not fit (missing {missing}, extra {unexpected})")
    return head.to(dtype).eval()


@dataclass
class _HeadState:
    """Per request: the head's cache holds real-feature entries for positions [0, valid);
    `features` are the target's hidden states for positions [feature_start, ...), not fed yet."""

    epoch: int  # the request's num_preemptions when this began (a preempted request restarts)
    valid: int = 0
    feature_start: int = 0
    features: list[torch.Tensor] = field(default_factory=list)

    @property
    def feature_end(self) -> int:
        return self.feature_start + sum(len(f) for f in self.features)

    def truncate(self, end: int) -> None:
        if end < self.feature_end:
            kept = torch.cat(self.features)[: max(0, end - self.feature_start)] if self.features else None
            self.features = [kept] if kept is not None and len(kept) else []


class EagleProposer(Proposer):
    """Drafts with a one-layer head over the target's features (EAGLE, Li et al., 2024)."""

    name = "eagle"
    paper = "EAGLE (Li et al., 2024): Speculative Sampling Requires Rethinking Feature Uncertainty"
    default_num_tokens = 4
    uses_hidden_states = True
    # Stop drafting a request after a token its head gave less than this probability: later
    # drafts would mostly be rejected, and each costs a head forward (EAGLE-2's observation that
    # the draft's confidence approximates acceptance). 0.3 measured best of 0-0.6 on the default
    # model (docs/benchmarks.md).
    min_confidence = 0.3
    # Inside a step the head's weights (18 MB for the default model's: its layer and 8,192 LM-head
    # rows) come from memory at every draft step, the target's weights having pushed them out
    # of cache, so in int8 they take about half as long. Only the drafts can change, never the
    # output (verification is exact). On the default model, with tokens per forward unchanged,
    # it made eagle-tree ~4% faster (docs/benchmarks.md). Used where the head runs in bf16 on
    # the CPU kernels.
    int8_head = True

    def __init__(self, engine, head=None):
        super().__init__(engine)
        head = head if head is not None else engine.config.draft_head
        if not isinstance(head, EagleHead):
            default = default_head_path(engine.model_path)
            head = find_artifact(
                head, default, MARKER,
                f"speculative method {self.name!r} needs a trained EAGLE head: run `falconet train-head` "
                f"(it is then found at {default}), or pass draft_head= to LLM (--draft-head)",
            )  # fmt: skip
            if not is_eagle_head(head):
                raise ProposerError(f"{head} is not an EAGLE head made by `falconet train-head`")
            try:
                head = load_head(head, engine.model, engine.model.embed_tokens.weight.dtype)
            except FalconetError as e:
                raise ProposerError(str(e)) from None
        w = head.fc.weight
        if self.int8_head and w.dtype == torch.bfloat16 and w.device.type == "cpu" and bf16_linear_kernels():
            head = int8_draft_head(head)
        self.head = head
        kv = engine.kv_cache
        self.cache = PagedKVCache(head.config, kv.num_blocks, kv.block_size, head.fc.weight.dtype)
        self._state: dict[str, _HeadState] = {}
        # block id -> content id of the block when the head wrote real entries for all its slots
        self._head_blocks: dict[int, int] = {}

    def usable_prefix(self, blocks: list[int]) -> int:
        content_id = self.engine.block_manager.content_id
        for i, block in enumerate(blocks):
            if self._head_blocks.get(block, -1) != content_id(block):
                return i
        return len(blocks)

    def _record_blocks(self, req, old_valid: int, new_valid: int) -> None:
        """The head now holds real entries for positions [0, new_valid) of `req`."""
        bs, content_id = self.engine.kv_cache.block_size, self.engine.block_manager.content_id
        for i in range(old_valid // bs, new_valid // bs):
            block = req.block_table[i]
            if content_id(block) >= 0:
                self._head_blocks[block] = content_id(block)

    def _get(self, req) -> _HeadState:
        state = self._state.get(req.request_id)
        if state is None or state.epoch != req.num_preemptions:
            state = self._state[req.request_id] = _HeadState(req.num_preemptions)
        return state

    def observe(self, req, start: int, hidden: torch.Tensor) -> None:
        """The target computed positions [start, start + len(hidden)) of `req` this step."""
        state = self._get(req)
        end = state.feature_end
        if start > end:  # a gap: positions the target did not compute (a prefix-cache hit)
            state.features, state.feature_start, state.valid = [], start, start
        elif start < end:
            state.truncate(start)
        state.features.append(hidden.detach().clone())

    def on_verified(self, req) -> None:
        # The rows of rejected drafts were observed too: drop them.
        self._get(req).truncate(req.num_computed)

    def on_reset(self, req) -> None:
        self._state.pop(req.request_id, None)

    def _catch_up(self, requests, max_tokens) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Feed the head the target's features it has not seen, up to each request's last known
        token. Returns the requests it can draft for (indices), and for each the head's predicted
        feature at its last known token and its logits there (the first draft's distribution)."""
        active, ids, feats, positions, segments, last_rows = [], [], [], [], [], []
        for i, req in enumerate(requests):
            state, last = self._get(req), req.num_tokens - 2  # the last pair: (f_{N-2}, x_{N-1})
            first = max(state.valid, state.feature_start)
            if max_tokens[i] < 1 or state.feature_end != last + 1 or first > last:
                continue  # no draft (the target has not computed what the head needs)
            pending = torch.cat(state.features)[first - state.feature_start :]
            ids.extend(req.all_ids[first + 1 : last + 2])
            feats.append(pending)
            positions.extend(range(first, last + 1))
            segments.append(Segment(req.block_table, first, last + 1 - first))
            last_rows.append(len(ids) - 1)
            active.append(i)
            # Consumed: the head's cache now holds real entries up to the last known token.
            self._record_blocks(req, first, last + 1)
            state.valid, state.feature_start, state.features = last + 1, last + 1, []
        if not active:
            return active, None, None
        self.cache.begin_step(segments)
        out = self.head(torch.tensor(ids), torch.cat(feats), torch.tensor(positions), self.cache)
        out = out[torch.tensor(last_rows)]
        return active, out, self.head.compute_logits(out)

    @torch.inference_mode()
    def propose(self, requests, max_tokens):
        head, vocab, full = self.head, self.head.draft_vocab, self.engine.model.config.vocab_size
        drafts = new_drafts(requests)
        active, out, logits = self._catch_up(requests, max_tokens)
        if not active:
            return self.widen(requests, max_tokens, finish_drafts(drafts), {})
        first_logits = dict(zip(active, logits, strict=True))
        while True:
            reqs = [requests[i] for i in active]
            confidence = choose_tokens(logits, reqs, [drafts[i] for i in active], vocab, full)
            keep = [
                r for r, i in enumerate(active)
                if self.keeps_drafting(requests[i], drafts[i], confidence[r])
                and len(drafts[i].tokens) < max_tokens[i]
            ]  # fmt: skip
            active = [active[r] for r in keep]
            if not active:
                break
            # The next pair: (predicted feature, drafted token) at the next position.
            feats = out[torch.tensor(keep, dtype=torch.long)]
            ids = [drafts[i].tokens[-1] for i in active]
            positions = [requests[i].num_tokens + len(drafts[i].tokens) - 2 for i in active]
            self.cache.begin_step(
                [Segment(requests[i].block_table, p, 1) for i, p in zip(active, positions, strict=True)]
            )
            out = head(torch.tensor(ids), feats, torch.tensor(positions), self.cache)
            logits = head.compute_logits(out)
        return self.widen(requests, max_tokens, finish_drafts(drafts), first_logits)

    def keeps_drafting(self, request, draft: Draft, confidence: float) -> bool:
        """Whether to draft another token after the one just drafted (given its head
        probability `confidence`): only what the drafter knows may decide it."""
        return confidence >= self.min_confidence

    def widen(self, requests, max_tokens, drafts, first_logits) -> list[Draft]:
        """Hook for tree variants: the chains drafted, and the head's logits at each drafting
        request's first position (index in requests -> logits over the head's vocabulary)."""
        return drafts


class EagleTreeProposer(EagleProposer):
    """EAGLE's chain plus the head's next-best first tokens and the n-gram tree, as one tree."""

    name = "eagle-tree"
    paper = (
        "EAGLE (Li et al., 2024) with a token tree (SpecInfer, Miao et al., 2024; EAGLE-2, Li et al., "
        "2024) and prompt lookup (Saxena, 2023)"
    )
    default_num_tokens = 10  # tree nodes
    drafts_trees = True
    chain_tokens = 4  # EAGLE's own chain at most (the rest of the budget: other candidates)
    root_candidates = 3  # the head's top tokens offered at the first position
    ngram = (6, 4, 2, 4)  # n-gram tree: depth, longest and shortest n, matches per n

    def __init__(self, engine, head=None):
        super().__init__(engine, head)
        self._indexes: dict[str, NgramIndex] = {}

    def on_reset(self, req) -> None:
        super().on_reset(req)
        self._indexes.pop(req.request_id, None)

    def propose(self, requests, max_tokens):
        self._budget = max_tokens
        return super().propose(requests, [min(k, self.chain_tokens) for k in max_tokens])

    def widen(self, requests, max_tokens, drafts, first_logits):
        vocab = self.head.draft_vocab
        out = []
        for i, (req, draft) in enumerate(zip(requests, drafts, strict=True)):
            budget = self._budget[i]
            if not req.params.greedy or budget <= len(draft.tokens):
                out.append(draft)  # sampled drafts carry q: they stay chains (exact sampling)
                continue
            tokens, parents = list(draft.tokens), list(range(-1, len(draft.tokens) - 1))
            root = {t for t, p in zip(tokens, parents, strict=True) if p < 0}
            if i in first_logits:
                for t in first_logits[i].topk(self.root_candidates).indices.tolist():
                    t = t if vocab is None else int(vocab[t])
                    if t not in root and len(tokens) < budget:
                        root.add(t)
                        tokens.append(t)
                        parents.append(-1)
            index = self._indexes.get(req.request_id)
            if index is None:
                index = self._indexes[req.request_id] = NgramIndex(self.ngram[2], self.ngram[1])
            grams, gram_parents = lookup_tree(req.all_ids, budget, *self.ngram, index)
            tokens, parents = merge_trees(tokens, parents, grams, gram_parents, budget)
            out.append(Draft(tokens, parents=parents))
        return out
