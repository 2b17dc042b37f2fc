"""Turn one row of logits per sequence into its next token, in vLLM's order of operations:

    logit_bias -> repetition penalty -> frequency/presence penalties     (greedy = argmax here)
    -> temperature -> top-k -> top-p -> min-p -> draw

Each step works on the whole batch at once and touches only the rows that ask for it, so a
batch of greedy requests costs one argmax. Logprobs are taken from the raw model logits, before
any of the above (vLLM's default `logprobs_mode="raw_logprobs"`).

Each sequence owns a torch.Generator seeded from its own seed and the draw for a row uses only
that row's generator, so a seeded request draws the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams

NEG_INF = float("-inf")
_BLOCK = 256  # tokens per block in the two-level inverse-CDF draw
_TOP_P_CANDIDATES = 1024  # top-p looks at this many tokens first, sorting all only if too few


@dataclass
class SamplingState:
    """What the sampler needs to know about one sequence. The engine's Request has the same
    attribute names, so it can be passed as is."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()  # tokens generated so far


@dataclass
class TokenLogprobs:
    """The logprob of one token (sampled, or a prompt token) and the most likely alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely; like vLLM, the number of tokens whose logprob is >= this one's
    top: dict[int, float] = field(default_factory=dict)  # top-k alternatives, most likely first

    def as_dict(self) -> dict[int, float]:
        """vLLM's shape: the chosen token plus the top-k, so k or k + 1 entries."""
        return {self.token_id: self.logprob, **self.top}


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """The engine's original entry point. It passes no token history, so repetition, presence
    and frequency penalties see none; sample_batch is the full one."""
    states = [SamplingState(p, g) for p, g in zip(params, generators, strict=True)]
    return sample_batch(logits, states).token_ids


def sample_batch(logits: torch.Tensor, requests: Sequence[SamplingState]) -> SampleResult:
    """logits: [B, V] float32, one row per sequence -> the next token of each (and its logprobs)."""
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise FalconetError(f"sampler got logits of shape {tuple(logits.shape)} for {len(requests)} rows")
    params = [r.params for r in requests]
    raw_logprobs = _raw_logprobs(logits, params)

    logits = apply_logit_bias(logits, params)
    logits = apply_penalties(logits, requests)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not random_rows:  # the common cheap case: one argmax, no sort, no softmax
        tokens = logits.argmax(dim=-1)
    elif len(random_rows) == len(params):
        tokens = _sample_random(logits, requests)
    else:
        tokens = logits.argmax(dim=-1)
        rows = torch.tensor(random_rows, device=logits.device)
        tokens[rows] = _sample_random(logits[rows], [requests[i] for i in random_rows])
    token_ids = tokens.tolist()
    return SampleResult(token_ids, _gather_logprobs(raw_logprobs, token_ids, params))


# --- steps that can change the argmax: bias and penalties -----------------------------------


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    entries = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
    if not entries:
        return logits
    rows, ids, values = (list(column) for column in zip(*entries, strict=True))
    if max(ids) >= logits.shape[-1]:
        raise FalconetError(f"logit_bias has a token id >= the vocabulary size {logits.shape[-1]}")
    logits = logits.clone()  # the caller's logits stay raw (logprobs, other samplers)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, requests: Sequence[SamplingState]) -> torch.Tensor:
    """vLLM's semantics, which the OpenAI API defines for presence/frequency:
    - repetition penalty (HF/CTRL) on every token seen in the prompt *or* the output: positive
      logits are divided by it, negative ones multiplied;
    - then logit -= frequency_penalty * count + presence_penalty * (count > 0), counting
      occurrences in the *output only*."""
    rows = [i for i, r in enumerate(requests) if _has_penalty(r.params)]
    if not rows:
        return logits
    sub = [requests[i] for i in rows]
    vocab, device = logits.shape[-1], logits.device
    out_counts = _token_counts([r.output_ids for r in sub], vocab, device)
    # The prompt matters only to the repetition penalty; skip counting long prompts otherwise.
    seen_prompt = _token_counts(
        [r.prompt_ids if r.params.repetition_penalty != 1.0 else () for r in sub], vocab, device
    )
    rep, freq, pres = (
        torch.tensor([getattr(r.params, name) for r in sub], dtype=logits.dtype, device=device)[:, None]
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")
    )
    x = logits[rows]
    seen = (out_counts > 0) | (seen_prompt > 0)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * out_counts - pres * (out_counts > 0).to(x.dtype)
    logits = logits.clone()
    logits[rows] = x
    return logits


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _token_counts(id_lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), vocab] float counts of each token id in each list."""
    counts = torch.zeros(len(id_lists), vocab, device=device)
    flat = [t for ids in id_lists for t in ids]
    if flat:
        lengths = torch.tensor([len(ids) for ids in id_lists])
        rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths).to(device)
        ones = torch.ones(len(flat), device=device)
        counts.index_put_((rows, torch.tensor(flat, device=device)), ones, accumulate=True)
    return counts


# --- steps that only shape the distribution: temperature, top-k, top-p, min-p ---------------


def _sample_random(logits: torch.Tensor, requests: Sequence[SamplingState]) -> torch.Tensor:
    """Rows that sample: shape the distribution, then draw one token per row with its generator."""
    warped = warp_logits(logits, [r.params for r in requests])
    return _draw(torch.softmax(warped, dim=-1), [r.generator for r in requests])


def warp_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (HF's order, and vLLM's before V1 moved min-p
    ahead of top-k/top-p; only top-p then min-p vs min-p then top-p can differ). The rows must
    all sample (no greedy rows: temperature 0 would divide by zero)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    logits = logits / temperature[:, None]
    logits = apply_top_k(logits, torch.tensor([p.top_k for p in params], device=device))
    logits = apply_top_p(logits, torch.tensor([p.top_p for p in params], device=device))
    return apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th kept, like HF and vLLM).
    top_k: [B] ints; 0, -1 or >= V leave the row alone."""
    vocab = logits.shape[-1]
    on = (top_k > 0) & (top_k < vocab)
    if not bool(on.any()):
        return logits
    k_max = int(top_k[on].max())
    top = logits.topk(k_max, dim=-1).values  # a partial sort, only as deep as the deepest k
    kth = top.gather(-1, (top_k.clamp(1, k_max) - 1)[:, None])
    kth = torch.where(on[:, None], kth, torch.full_like(kth, NEG_INF))
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays if the
    mass strictly before it (in descending order) is < top_p. top_p: [B]; 1.0 leaves the row alone
    (without sorting it, and without float round-off dropping a tail token)."""
    rows = (top_p < 1.0).nonzero().flatten()
    if rows.numel() == 0:
        return logits
    x, p = logits[rows], top_p[rows, None]
    values, order, log_total = _top_p_candidates(x, p)
    probs = (values - log_total).exp()  # mass in the whole row, not just among the candidates
    drop = (probs.cumsum(dim=-1) - probs) >= p
    drop[:, 0] = False  # the most likely token always stays
    logits = logits.clone()
    # Tokens outside the candidates are dropped too: the candidates' mass before them is >= p.
    logits[rows] = torch.full_like(x, NEG_INF).scatter(-1, order, values.masked_fill(drop, NEG_INF))
    return logits


def _top_p_candidates(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row, sorted, enough of them to hold every token top-p
    keeps. A full sort of a large vocabulary is slow (on CPU, 100x an argmax), and the nucleus
    is usually small: the top _TOP_P_CANDIDATES tokens do whenever their mass reaches top_p
    (every token below them has at least that mass before it), or when they are all the
    tokens top-k left. Otherwise, sort everything. Also returns log(total mass) per row."""
    finite = (x > NEG_INF).sum(dim=-1, keepdim=True)
    k = min(int(finite.max()), _TOP_P_CANDIDATES)
    if k < x.shape[-1]:
        values, order = x.topk(k, dim=-1)
        if bool((finite <= k).all()):  # top-k left at most k tokens: the candidates are all of them
            return values, order, torch.logsumexp(values, dim=-1, keepdim=True)
        log_total = torch.logsumexp(x, dim=-1, keepdim=True)
        if bool(((values - log_total).exp().sum(dim=-1, keepdim=True) >= p).all()):
            return values, order, log_total
    values, order = x.sort(dim=-1, descending=True)
    return values, order, torch.logsumexp(values, dim=-1, keepdim=True)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's. min_p: [B]; 0 = off."""
    rows = (min_p > 0).nonzero().flatten()
    if rows.numel() == 0:
        return logits
    probs = logits[rows].softmax(dim=-1)
    drop = probs < min_p[rows, None] * probs.amax(dim=-1, keepdim=True)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(drop, NEG_INF)
    return logits


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform number per row, drawn from that row's own generator,
    so a row's token never depends on the other rows.

    Each search looks for the first entry whose cumulative mass reaches u in (0, total]; an
    entry of zero mass adds nothing to the sum, so it is never the first to reach u: filtered
    tokens are never drawn. Two levels (blocks of _BLOCK tokens, then one block) keep the
    float64 prefix sums short: V / _BLOCK block totals plus _BLOCK tokens per row, instead of
    a float64 copy and scan of the whole vocabulary."""
    b, v = probs.shape
    if v % _BLOCK:
        probs = torch.nn.functional.pad(probs, (0, _BLOCK - v % _BLOCK))  # zero mass: never drawn
    blocks = probs.view(b, -1, _BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # a 256-term float32 sum is exact enough
    u01 = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    u = (1.0 - u01).to(probs.device)[:, None] * block_cdf[:, -1:]  # 1 - U is uniform in (0, 1]
    block = torch.searchsorted(block_cdf, u)  # [b, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    rows = torch.arange(b, device=probs.device)
    inner_cdf = blocks[rows, block.flatten()].double().cumsum(dim=-1)  # [b, _BLOCK]
    # u > before, so the remainder is > 0; the clamp absorbs the two sums' different rounding.
    rest = torch.minimum(u - before, inner_cdf[:, -1:])
    return (block * _BLOCK + torch.searchsorted(inner_cdf, rest)).flatten()


# --- logprobs ---------------------------------------------------------------------------------


def _raw_logprobs(
    logits: torch.Tensor, params: list[SamplingParams]
) -> tuple[list[int], torch.Tensor | None]:
    """log_softmax of the unprocessed logits, only for the rows that ask for logprobs."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return rows, None
    picked = logits if len(rows) == len(params) else logits[rows]
    return rows, torch.log_softmax(picked.float(), dim=-1)


def _gather_logprobs(
    raw: tuple[list[int], torch.Tensor | None], token_ids: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    rows, logprobs = raw
    out: list[TokenLogprobs | None] = [None] * len(params)
    if logprobs is not None:
        found = token_logprobs(logprobs, [token_ids[i] for i in rows], [params[i].logprobs for i in rows])
        for i, info in zip(rows, found, strict=True):
            out[i] = info
    return out


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """logprobs: [R, V]; for row r, token_ids[r]'s logprob and rank and the top ks[r] tokens."""
    ids = torch.tensor(token_ids, device=logprobs.device)
    chosen = logprobs.gather(-1, ids[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1).tolist()
    k_max = min(max(ks), logprobs.shape[-1])
    top_values, top_ids = [[]] * len(ks), [[]] * len(ks)
    if k_max > 0:
        values, indices = logprobs.topk(k_max, dim=-1)
        top_values, top_ids = values.tolist(), indices.tolist()
    chosen_values = chosen.flatten().tolist()
    return [
        TokenLogprobs(
            t, chosen_values[r], ranks[r], dict(zip(top_ids[r][:k], top_values[r][:k], strict=True))
        )
        for r, (t, k) in enumerate(zip(token_ids, ks, strict=True))
    ]


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: Sequence[int], k: int, chunk: int = 512
) -> list[TokenLogprobs | None]:
    """Logprob (and rank, and the top-k alternatives) of each prompt token under the logits of
    the position before it.

    logits: [P, V] (or [P - 1, V]): row i predicts token i + 1, so the last row of a [P, V]
    tensor (the first generated token's) is not used. Entry 0 is None: nothing predicts the
    first prompt token (vLLM does the same). Raw logits, as for sampled tokens. Rows are
    log-softmaxed a chunk at a time so a long prompt never holds a [P, V] float32 copy."""
    n = len(prompt_ids)
    if n == 0:
        return []
    if logits.dim() != 2 or logits.shape[0] < n - 1:
        raise FalconetError(f"prompt_logprobs needs >= {n - 1} rows of logits, got {tuple(logits.shape)}")
    out: list[TokenLogprobs | None] = [None]
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        block = torch.log_softmax(logits[start:end].float(), dim=-1)
        targets = [int(t) for t in prompt_ids[start + 1 : end + 1]]
        out.extend(token_logprobs(block, targets, [k] * len(targets)))
    return out
