"""The sampler against transformers' logits processors, hand-written formulas (vLLM's
presence/frequency penalties) and the exact distribution; logprobs against torch.log_softmax."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from falconet.engine import sampler
from falconet.engine.sampler import (
    SamplingState,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
    prompt_logprobs,
    sample,
    sample_batch,
    warp_logits,
)
from falconet.errors import FalconetError
from falconet.sampling_params import SamplingParams


def _logits(seed: int = 0, v: int = 50) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


def _batch(b: int, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.stack([_logits(seed + i, v) for i in range(b)])


def _state(prompt=(), output=(), **kwargs) -> SamplingState:
    p = SamplingParams(**kwargs)
    return SamplingState(p, make_generator(p.seed), list(prompt), list(output))


def _mask_equal(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(ours.isinf(), ref.isinf())


# --- each parameter against its reference ----------------------------------------------------


def test_top_k_matches_transformers_per_row():
    ks = [1, 5, 49, 0, -1, 50, 3]  # 0, -1 and k >= V leave the row alone
    x = _batch(len(ks))
    ours = apply_top_k(x, torch.tensor(ks))
    for i, k in enumerate(ks):
        ref = TopKLogitsWarper(k)(None, x[i : i + 1].clone())[0] if 0 < k < 50 else x[i]
        assert _mask_equal(ours[i], ref), k


def test_top_p_matches_transformers_per_row():
    ps = [0.05, 0.5, 0.9, 0.999, 1.0] * 4
    x = _batch(len(ps))
    ours = apply_top_p(x, torch.tensor(ps))
    for i, p in enumerate(ps):
        assert _mask_equal(ours[i], TopPLogitsWarper(p)(None, x[i : i + 1].clone())[0]), (i, p)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: the nucleus is in the top candidates; flat: full sort
def test_top_p_large_vocab_matches_transformers(scale):
    ps = [0.5, 0.9, 0.95, 0.99]
    x = torch.randn(len(ps), 5000, generator=torch.Generator().manual_seed(1)) * scale
    top = torch.softmax(x, -1).topk(sampler._TOP_P_CANDIDATES).values.sum(-1)
    assert bool((top >= torch.tensor(ps)).all()) == (scale > 1)  # each case takes the path it names
    ours = apply_top_p(x, torch.tensor(ps))
    for i, p in enumerate(ps):
        assert _mask_equal(ours[i], TopPLogitsWarper(p)(None, x[i : i + 1].clone())[0]), (scale, p)
    # after top-k, top-p looks at the survivors only
    xk = apply_top_k(x, torch.full((len(ps),), 300))
    ours = apply_top_p(xk, torch.tensor(ps))
    for i, p in enumerate(ps):
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(300)(None, x[i : i + 1].clone()))[0]
        assert _mask_equal(ours[i], ref), (scale, p)


def test_min_p_matches_transformers_per_row():
    ps = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0]
    x = _batch(len(ps))
    ours = apply_min_p(x, torch.tensor(ps))
    for i, p in enumerate(ps):
        ref = MinPLogitsWarper(p)(None, x[i : i + 1].clone())[0] if p > 0 else x[i]
        assert _mask_equal(ours[i], ref), p


def test_warp_chain_matches_transformers():
    """Temperature -> top-k -> top-p -> min-p, mixed per row, against HF's warpers in HF's order."""
    rows = [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=10, top_p=0.8),
        dict(temperature=0.5, top_p=0.9, min_p=0.05),
        dict(temperature=2.0, top_k=20, top_p=0.95, min_p=0.1),
    ]
    params = [SamplingParams(**r) for r in rows]
    x = _batch(len(rows), seed=10)
    ours = warp_logits(x, params)
    for i, p in enumerate(params):
        ref = x[i : i + 1].clone()
        warpers = [TemperatureLogitsWarper(p.temperature)]
        warpers += [TopKLogitsWarper(p.top_k)] if p.top_k > 0 else []
        warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
        warpers += [MinPLogitsWarper(p.min_p)] if p.min_p > 0 else []
        for warper in warpers:
            ref = warper(None, ref)
        kept = ~ref[0].isinf()
        assert _mask_equal(ours[i], ref[0]), i
        torch.testing.assert_close(ours[i][kept], ref[0][kept])


def test_repetition_penalty_matches_transformers_on_prompt_and_output():
    x = _batch(3, seed=20)
    prompt, output = [1, 2, 3, 7], [7, 9, 9, 11]
    states = [_state(prompt, output, repetition_penalty=r) for r in (1.3, 0.8, 1.0)]
    ours = apply_penalties(x, states)
    for i, s in enumerate(states):
        ids = torch.tensor([prompt + output])
        ref = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(ids, x[i : i + 1].clone())[0]
        torch.testing.assert_close(ours[i], ref)


def test_presence_and_frequency_penalties_follow_vllm_formula():
    """vLLM: logits -= frequency * count + presence * (count > 0), counting the output only."""
    x = _batch(3, seed=30)
    prompt, output = [4, 5, 5], [5, 6, 6, 6, 8]
    settings = [(0.5, 0.0), (0.0, 1.5), (-0.7, 1.2)]
    states = [_state(prompt, output, frequency_penalty=f, presence_penalty=p) for f, p in settings]
    ours = apply_penalties(x, states)
    count = torch.bincount(torch.tensor(output), minlength=50).float()
    for i, (f, p) in enumerate(settings):
        torch.testing.assert_close(ours[i], x[i] - f * count - p * (count > 0).float())
    assert ours[0, 4] == x[0, 4]  # prompt-only tokens are not penalised


def test_repetition_then_frequency_presence():
    x = _batch(1, seed=40)
    prompt, output = [1, 2], [2, 3, 3]
    s = _state(prompt, output, repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), x.clone())[0]
    count = torch.bincount(torch.tensor(output), minlength=50).float()
    torch.testing.assert_close(apply_penalties(x, [s])[0], ref - 0.3 * count - 0.2 * (count > 0).float())


def test_penalties_leave_other_rows_and_the_input_alone():
    x = _batch(3, seed=50)
    before = x.clone()
    out = apply_penalties(x, [_state(), _state([1], [1, 2], repetition_penalty=2.0), _state(output=[3])])
    assert torch.equal(x, before)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.equal(out[1], x[1])


def test_logit_bias_matches_transformers_sequence_bias():
    x = _batch(2, seed=60)
    bias = {3: 5.0, 17: -2.5, 49: 0.25}
    params = [SamplingParams(logit_bias=bias), SamplingParams()]
    ours = apply_logit_bias(x, params)
    ref = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.tensor([[0]]), x[:1].clone())
    torch.testing.assert_close(ours[0], ref[0])
    assert torch.equal(ours[1], x[1])
    # hand formula too
    expected = x[0].clone()
    expected[list(bias)] += torch.tensor(list(bias.values()))
    torch.testing.assert_close(ours[0], expected)


def test_logit_bias_token_outside_vocab_is_rejected():
    with pytest.raises(FalconetError, match="vocabulary"):
        apply_logit_bias(_batch(1), [SamplingParams(logit_bias={50: 1.0})])


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax_and_old_entry_point_still_works():
    x = _batch(4)
    params = [SamplingParams(temperature=0)] * 4
    assert sample(x, params, [make_generator(0)] * 4) == x.argmax(-1).tolist()
    assert sample_batch(x, [_state(temperature=0) for _ in range(4)]).token_ids == x.argmax(-1).tolist()


def test_greedy_takes_argmax_of_biased_and_penalised_logits():
    x = _batch(2, seed=70)
    top = int(x[0].argmax())
    low = int(x[1].argmin())
    states = [
        _state(
            output=[top], temperature=0, presence_penalty=2.0, frequency_penalty=2.0, logit_bias={top: -10}
        ),
        _state(temperature=0, logit_bias={low: 100.0}),
    ]
    tokens = sample_batch(x, states).token_ids
    penalised = x[0].clone()
    penalised[top] -= 14.0
    assert tokens == [int(penalised.argmax()), low]


def test_greedy_only_batch_skips_filtering(monkeypatch):
    """A greedy batch is one argmax: no sort, top-k, softmax or draw."""

    def boom(*args, **kwargs):
        raise AssertionError("greedy batch went through the sampling path")

    for name in ("warp_logits", "apply_top_k", "apply_top_p", "apply_min_p", "_draw"):
        monkeypatch.setattr(sampler, name, boom)
    x = _batch(32, v=1000)
    assert sample_batch(x, [_state(temperature=0) for _ in range(32)]).token_ids == x.argmax(-1).tolist()


def test_top_k_one_is_greedy():
    x = _batch(3)
    assert sample_batch(x, [_state(top_k=1, seed=i) for i in range(3)]).token_ids == x.argmax(-1).tolist()


# --- seeds and the distribution ---------------------------------------------------------------


def _run(x: torch.Tensor, states: list[SamplingState], steps: int) -> list[list[int]]:
    """Sample `steps` tokens per state, feeding each sampled token back into its output ids."""
    got: list[list[int]] = [[] for _ in states]
    for _ in range(steps):
        for i, t in enumerate(sample_batch(x, states).token_ids):
            got[i].append(t)
            states[i].output_ids.append(t)
    return got


def test_seeded_request_draws_the_same_tokens_in_any_batch():
    kwargs = dict(temperature=0.9, top_p=0.95, presence_penalty=0.5, seed=1234)
    x = _logits(80)
    alone = _run(x[None], [_state(**kwargs)], steps=40)[0]
    others = [
        _state(temperature=0),
        _state(temperature=1.5, top_k=5),
        _state(temperature=0.3, min_p=0.2, seed=5),
        _state(repetition_penalty=1.2, logprobs=3),
    ]
    for position in (0, 2, 4):
        states = others[:position] + [_state(**kwargs)] + others[position:]
        mixed = _run(x.expand(len(states), -1).clone(), states, steps=40)
        assert mixed[position] == alone, position
        for s in others:
            s.output_ids.clear()


def test_seed_reproducible_and_distribution_matches_softmax():
    """20k seeded draws at temperature 0.7 follow softmax(logits / 0.7): total variation < 0.02."""
    x = _logits(3, v=8)
    p = SamplingParams(temperature=0.7, seed=123)
    g = make_generator(p.seed)
    draws = [sample(x[None], [p], [g])[0] for _ in range(20000)]
    g2 = make_generator(p.seed)
    assert [sample(x[None], [p], [g2])[0] for _ in range(200)] == draws[:200]
    freq = torch.bincount(torch.tensor(draws), minlength=8).float() / len(draws)
    tv = 0.5 * (freq - torch.softmax(x / 0.7, -1)).abs().sum().item()
    assert tv < 0.02


def test_filtered_distribution_matches_reference():
    """40k rows, each with its own seed, all the filters on: the frequencies follow the softmax of
    the HF-processed logits within total variation 0.02, and no filtered-out token is ever drawn."""
    v, n = 16, 40000
    x = _logits(90, v=v)
    prompt, output = [0, 1, 2], [2, 5, 5]
    kwargs = dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    kwargs |= dict(frequency_penalty=0.3, presence_penalty=0.1, logit_bias={7: 1.0})
    states = [_state(prompt, output, seed=i, **kwargs) for i in range(n)]
    tokens = sample_batch(x.expand(n, -1).clone(), states).token_ids

    ref = SequenceBiasLogitsProcessor([[[7], 1.0]])(torch.tensor([[0]]), x[None].clone())
    ref = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([prompt + output]), ref)
    count = torch.bincount(torch.tensor(output), minlength=v).float()
    ref = ref - 0.3 * count - 0.1 * (count > 0).float()
    for warper in (
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(10),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.05),
    ):
        ref = warper(None, ref)
    probs = torch.softmax(ref[0], -1)
    freq = torch.bincount(torch.tensor(tokens), minlength=v).float() / n
    assert (freq[probs == 0] == 0).all()
    assert 1 < int((probs > 0).sum()) < v  # the filters did cut something, and left a choice
    assert 0.5 * (freq - probs).abs().sum().item() < 0.02


def test_draw_follows_the_probabilities_and_never_picks_zero_mass():
    """The two-level draw on a vocabulary that is not a multiple of the block size, with whole
    zero blocks and mass at block edges: exact support, total variation < 0.02 over 40k rows."""
    v, n = 1000, 40000
    probs = torch.zeros(v)
    support = [256, 511, 512, 767, 999]
    probs[support] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    tokens = sampler._draw(probs.expand(n, -1), [make_generator(i) for i in range(n)]).tolist()
    assert set(tokens) <= set(support)
    freq = torch.bincount(torch.tensor(tokens), minlength=v).float() / n
    assert 0.5 * (freq - probs).abs().sum().item() < 0.02


def test_top_k_sampling_never_leaves_top_k():
    x = _logits(4)
    p = SamplingParams(temperature=1.5, top_k=3, seed=0)
    g = make_generator(0)
    allowed = set(torch.topk(x, 3).indices.tolist())
    assert {sample(x[None], [p], [g])[0] for _ in range(500)} <= allowed


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k():
    x = _batch(4, seed=100)
    states = [
        _state(temperature=0, logprobs=3),
        _state(temperature=0.5, top_k=5, repetition_penalty=1.5, output=[1, 2], logprobs=5, seed=1),
        _state(temperature=1.0, logprobs=None),
        _state(temperature=2.0, logit_bias={int(x[3].argmin()): 50.0}, logprobs=0, seed=2),
    ]
    result = sample_batch(x, states)
    ref = torch.log_softmax(x, -1)
    assert result.logprobs[2] is None
    for i in (0, 1, 3):
        info, row, token = result.logprobs[i], ref[i], result.token_ids[i]
        assert info.token_id == token
        assert info.logprob == pytest.approx(row[token].item(), abs=1e-6)
        assert info.rank == int((row > row[token]).sum()) + 1  # no ties in random logits
        k = states[i].params.logprobs
        values, ids = row.topk(k)
        assert list(info.top) == ids.tolist()
        assert list(info.top.values()) == pytest.approx(values.tolist(), abs=1e-6)
    assert result.logprobs[0].rank == 1  # greedy picks the raw argmax here
    assert result.logprobs[3].top == {}
    assert result.token_ids[3] == int(x[3].argmin()) and result.logprobs[3].rank == 50  # biased, raw rank
    assert result.logprobs[1].as_dict()[result.token_ids[1]] == result.logprobs[1].logprob


def test_prompt_logprobs_align_with_the_next_token():
    p, v = 9, 50
    logits = _batch(p, v=v, seed=110)
    ids = [int(t) for t in torch.randint(0, v, (p,), generator=torch.Generator().manual_seed(0))]
    out = prompt_logprobs(logits, ids, k=2)
    ref = torch.log_softmax(logits, -1)
    assert len(out) == p and out[0] is None
    for i in range(1, p):
        assert out[i].token_id == ids[i]
        assert out[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-6)
        assert out[i].rank == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
        assert list(out[i].top) == ref[i - 1].topk(2).indices.tolist()
    # chunked the same; the [P - 1, V] form (no row for the first generated token) the same
    assert prompt_logprobs(logits, ids, k=2, chunk=3) == out
    assert prompt_logprobs(logits[:-1], ids, k=2) == out
    assert prompt_logprobs(logits[:1], ids[:1], k=2) == [None]
    with pytest.raises(FalconetError):
        prompt_logprobs(logits[:3], ids, k=2)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=-0.1),
        dict(min_p=1.5),
        dict(n=0),
        dict(n=3, best_of=2),
        dict(repetition_penalty=0),
        dict(repetition_penalty=-1.0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-2.1),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={"x": 1.0}),
        dict(logit_bias={3: float("inf")}),
        dict(stop=""),
        dict(stop=["ok", ""]),
        dict(stop_token_ids=[-3]),
        dict(logprobs=-1),
        dict(prompt_logprobs=-1),
        dict(seed=1.5),
    ],
)
def test_invalid_params_rejected(kwargs):
    with pytest.raises(FalconetError):
        SamplingParams(**kwargs)


def test_params_are_normalised():
    p = SamplingParams(stop="###", logit_bias={"5": 2}, n=2, best_of=3)
    assert p.stop == ["###"] and p.logit_bias == {5: 2.0}
    assert SamplingParams().stop == [] and SamplingParams().logit_bias is None
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(logit_bias={5: 1e308}), "logit_bias"),  # would overflow a float32 logit to inf
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(repetition_penalty=1e-300), "repetition_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(top_k=2**63), "top_k"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_values_that_would_break_the_batch_are_refused(kwargs, match):
    """Out-of-range values must fail at submission with a clear message, not as NaN or an
    overflow deep in a batched step that also carries other requests."""
    from falconet.sampling_params import SamplingParams

    with pytest.raises(FalconetError, match=match):
        SamplingParams(**kwargs)
