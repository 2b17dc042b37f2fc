"""Speculative decoding in the engine is lossless: greedy outputs are token-identical to plain
decoding for every draft source, and sampled outputs are distributed as plain sampling."""

from __future__ import annotations

import random

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.errors import FalconetError
from falconet.methods.quant.int8 import Int8Linear
from falconet.methods.registry import SPECULATIVE_METHODS
from falconet.methods.speculative import verifier
from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.ngram import NgramTreeProposer
from falconet.models.linear import bf16_linear_kernels
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams

METHODS = [
    "ngram",
    "ngram-tree",
    "draft-model",
    "layer-skip",
    "eagle",
    "eagle-tree",
    "spectr",
    "rsd",
    "dyspec",
    "smartspec",
    "tetris",
    "lookahead",
    "specdecpp",
    "pearl",
    "disco",
    "ouroboros",
    "ppd",
    "hidden-transfer",
    "token-recycling",
    "ngram-recycling",
    "smartspec-recycling",
]


class DecoyTreeProposer(NgramTreeProposer):
    """Test-only: the n-gram tree behind a decoy chain of two random tokens, so the likely nodes
    sit on side branches (scratch blocks, moved into place when kept) among more candidates.
    Given 3 nodes or more it always drafts a tree."""

    name = "decoy-tree"

    def propose(self, requests, max_tokens):
        inner = super().propose(requests, [max(k - 2, 0) for k in max_tokens])
        out = []
        for req, k, draft in zip(requests, max_tokens, inner, strict=True):
            if k < 3:
                out.append(draft)
                continue
            rng = random.Random(len(req.all_ids))
            if not draft.tokens:  # no match: a random second branch, so there is always a tree
                draft = Draft([rng.randrange(97)])
            parents = draft.parents if draft.is_tree else list(range(-1, len(draft.tokens) - 1))
            tokens = [rng.randrange(97), rng.randrange(97), *draft.tokens]
            out.append(Draft(tokens, parents=[-1, 0, *(p + 2 if p >= 0 else -1 for p in parents)]))
        return out


@pytest.fixture(scope="module", autouse=True)
def decoy_tree():
    SPECULATIVE_METHODS.register(DecoyTreeProposer.name, DecoyTreeProposer)
    yield
    SPECULATIVE_METHODS.unregister(DecoyTreeProposer.name)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir, with_tokenizer=False)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A different random model with the same vocabulary: a poor but valid draft."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-draft")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds matches."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(97) for _ in range(rng.randint(3, 8))]
        filler = [rng.randrange(97) for _ in range(rng.randint(0, 20))]
        out.append(filler + phrase * rng.randint(2, 5) + phrase[: rng.randint(1, len(phrase))])
    return out


@pytest.fixture(scope="module")
def drafts(draft_dir, tiny_eagle_head_dir) -> dict:
    """Engine options giving every model-based method its artifact."""
    return {"draft_model": str(draft_dir), "draft_head": str(tiny_eagle_head_dir)}


@pytest.fixture
def drafts_for(drafts, tiny_llama_dir, tiny_ppd_dir, tiny_transfer_dir):
    """PEARL uses its drafts only when the draft model guessed the target's next token, which
    a random draft never does: it drafts with the target itself (every draft then kept, greedy).
    PPD's trained prompt tokens and hidden transfer's maps come as their --draft-head."""

    def options(method: str) -> dict:
        if method == "pearl":
            return {**drafts, "draft_model": str(tiny_llama_dir)}
        if method in ("ppd", "hidden-transfer"):
            return {**drafts, "draft_head": str(tiny_ppd_dir if method == "ppd" else tiny_transfer_dir)}
        return drafts

    return options


def generate(loaded, prompts, params, **options) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(loaded, EngineConfig(**options))
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(20000):
        if not engine.has_unfinished():
            break
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # all freed
    return [r.output_ids for r in reqs], engine


def spec(params: SamplingParams, method: str, k: int | None = None) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "speculative": method, "num_speculative_tokens": k})


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("method", [*METHODS, "decoy-tree"])
def test_greedy_is_token_identical(tiny, drafts_for, method):
    prompts = repetitive_prompts(8, seed=1)
    plain, _ = generate(tiny, prompts, GREEDY, max_num_seqs=8)
    outs, engine = generate(tiny, prompts, spec(GREEDY, method, k=3), max_num_seqs=8, **drafts_for(method))
    assert outs == plain
    stats = engine.speculator.stats
    assert stats.num_steps > 0 and stats.num_drafted > 0
    if method in (
        "ngram",
        "ngram-tree",
        "decoy-tree",
        "eagle",
        "eagle-tree",
        "smartspec",
        "lookahead",
        "specdecpp",
        "pearl",
        "token-recycling",
        "ngram-recycling",
        "smartspec-recycling",
    ):
        assert stats.num_accepted > 0  # repeated phrases are found (ngram), the head learnt some


# methods that learn from earlier requests (Proposer.forget has something to drop)
LEARNING_METHODS = [
    "smartspec", "lookahead", "specdecpp", "pearl", "disco", "ouroboros", "ppd",
    "token-recycling", "ngram-recycling", "smartspec-recycling",
]  # fmt: skip


@pytest.mark.parametrize("method", LEARNING_METHODS)
def test_forgetting_mid_flight_changes_nothing_but_drafts(tiny, drafts_for, method):
    """A server's POST /forget may come while requests run: every few steps the methods drop
    what they learnt, and the outputs are still plain decoding's, the KV cache all freed."""
    prompts = repetitive_prompts(6, seed=6)
    plain, _ = generate(tiny, prompts, GREEDY, max_num_seqs=6)
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=6, **drafts_for(method)))
    reqs = [engine.add_request(p, spec(GREEDY, method, k=3)) for p in prompts]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps % 3 == 0:
            engine.speculator.forget()
    assert [r.output_ids for r in reqs] == plain
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("method", [*METHODS, "decoy-tree"])
def test_mixed_batch_chunking_and_preemption(tiny, drafts_for, method):
    """Speculative and plain requests share steps under a small token budget and a KV cache
    so small that requests are preempted: every output still equals plain decoding alone."""
    prompts = repetitive_prompts(8, seed=2)
    params = [spec(GREEDY, method) if i % 2 else GREEDY for i in range(len(prompts))]
    alone = [generate(tiny, [p], GREEDY, enable_prefix_caching=False)[0][0] for p in prompts]
    engine = LLMEngine(
        tiny,
        EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=24, block_size=4, num_kv_blocks=40, **drafts_for(method)
        ),
    )
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert [r.output_ids for r in reqs] == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_bfloat16_fast_paths_are_bitwise_identical(tiny_llama64_dir, tmp_path):
    """In bf16 the verification rows take the decode kernel: outputs match plain decoding."""
    from falconet.methods.speculative.eagle import EagleHead, save_head

    loaded = load_model(tiny_llama64_dir, dtype=torch.bfloat16, with_tokenizer=False)
    head = EagleHead(load_model(tiny_llama64_dir, with_tokenizer=False).model, torch.arange(97))
    head.init_from_target()  # untrained: drafts the target's last layer run once more
    save_head(head, tmp_path, {})
    prompts = repetitive_prompts(6, seed=3)
    plain, _ = generate(loaded, prompts, GREEDY, max_num_seqs=6)
    methods = (("ngram", 4), ("layer-skip", 4), ("eagle", 4), ("eagle-tree", 10))
    for method, k in (*methods, ("ngram-tree", 12), ("decoy-tree", 12)):
        outs, engine = generate(
            loaded, prompts, spec(GREEDY, method, k=k), max_num_seqs=6, draft_head=str(tmp_path)
        )
        assert outs == plain, method
        assert engine.speculator.stats.num_accepted > 0 or method.startswith("eagle"), method
        if method.startswith("eagle") and bf16_linear_kernels() is not None:
            # a bf16 head on the CPU kernels drafts in int8 (its layer and LM head)
            head = engine.speculator.proposer(method).head
            assert isinstance(head.lm_head, Int8Linear) and isinstance(head.layer.mlp.down_proj, Int8Linear)


def test_eagle_after_a_prefix_cache_hit(tiny, tiny_eagle_head_dir):
    """A request whose prompt starts with cached blocks has no target features there: the head
    drafts from what its cache holds, and the output stays exact."""
    shared = repetitive_prompts(1, seed=6)[0] * 2
    prompts = [shared + [5, 6, 7], shared + [8, 9]]
    plain = [generate(tiny, [p], GREEDY, enable_prefix_caching=False)[0][0] for p in prompts]
    engine = LLMEngine(tiny, EngineConfig(block_size=4, draft_head=str(tiny_eagle_head_dir)))
    outs = []
    for p in prompts:  # one after the other: the second hits the first's blocks
        req = engine.add_request(p, spec(GREEDY, "eagle", k=3))
        while engine.has_unfinished():
            engine.step()
        outs.append(req.output_ids)
    assert outs == plain
    assert engine.block_manager.hit_rate > 0 and engine.speculator.stats.num_drafted > 0


def test_draft_model_errors_are_clear(tiny, tmp_path):
    engine = LLMEngine(tiny, EngineConfig())
    with pytest.raises(FalconetError, match="needs a draft model"):
        engine.add_request([1, 2, 3], spec(GREEDY, "draft-model"))
    with pytest.raises(FalconetError, match="needs a trained EAGLE head: run `falconet train-head`"):
        engine.add_request([1, 2, 3], spec(GREEDY, "eagle"))
    with pytest.raises(FalconetError, match="is not an EAGLE head"):
        LLMEngine(tiny, EngineConfig(draft_head=str(tmp_path))).add_request([1, 2, 3], spec(GREEDY, "eagle"))
    with pytest.raises(FalconetError, match="unknown speculative method 'nope'; valid: "):
        SamplingParams(speculative="nope")
    with pytest.raises(FalconetError, match="num_speculative_tokens"):
        SamplingParams(speculative="ngram", num_speculative_tokens=99)


def test_seeded_speculative_sampling_is_reproducible(tiny, draft_dir):
    params = spec(SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True), "draft-model", 3)
    prompts = repetitive_prompts(1, seed=4)
    a, _ = generate(tiny, prompts, params, draft_model=str(draft_dir))
    b, _ = generate(tiny, prompts * 3, params, max_num_seqs=3, draft_model=str(draft_dir))
    assert a[0] == b[0] == b[1] == b[2]


# --- the sampled distribution ------------------------------------------------------------------

SAMPLES = 3000  # requests (seeds) per distribution
POSITIONS = (1, 2)  # output positions compared: the first two that come from verification
TV_BOUND = 0.15  # two samples of 3000 from one distribution differ by TV <= 0.083 here


@pytest.fixture(scope="module")
def peaked(tiny_llama_dir, draft_dir):
    """Target and draft with sharper, different distributions (random models are near uniform,
    where a wrong acceptance rule would hardly show)."""
    target = load_model(tiny_llama_dir, with_tokenizer=False)
    draft = load_model(draft_dir, with_tokenizer=False).model
    with torch.no_grad():
        target.model.lm_head.weight.mul_(12)
        draft.lm_head.weight.mul_(12)
    return target, draft


def _samples(loaded, draft, params, seed0: int, head=None) -> list[list[int]]:
    prompt = repetitive_prompts(1, seed=5)[0]
    # Sampled trees are sized before drafting to the scratch blocks their share guarantees (a
    # tree is never cut afterwards): 8 at a time leaves room for trees of 6 nodes.
    tree = params.speculative in MULTI_DRAFT_METHODS
    engine = LLMEngine(
        loaded, EngineConfig(max_num_seqs=8 if tree else 256, draft_model=draft, draft_head=head)
    )
    if params.speculative in ("smartspec", "smartspec-recycling"):
        # 256 requests at once: rows cheap enough that first drafts pay, later ones not
        engine.step_cost.predict = lambda rows: 1.0 + 0.002 * rows
    reqs = [
        engine.add_request(prompt, SamplingParams(**{**params.__dict__, "seed": seed0 + i}))
        for i in range(SAMPLES)
    ]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def _chi_square_homogeneity(a: list[int], b: list[int]) -> tuple[float, float]:
    """Two-sample chi-square test of equal distributions (bins with < 10 expected merged);
    returns (p-value, total variation distance)."""
    ca, cb = (
        torch.bincount(torch.tensor(a), minlength=97).double(),
        torch.bincount(torch.tensor(b), minlength=97).double(),
    )
    tv = 0.5 * (ca / ca.sum() - cb / cb.sum()).abs().sum().item()
    order = (ca + cb).argsort(descending=True)
    ca, cb = ca[order], cb[order]
    keep = (ca + cb) >= 20
    ca = torch.cat([ca[keep], ca[~keep].sum(0, keepdim=True)])
    cb = torch.cat([cb[keep], cb[~keep].sum(0, keepdim=True)])
    if ca[-1] + cb[-1] < 20:
        ca, cb = ca[:-1], cb[:-1]
    total = ca + cb
    ea, eb = total * ca.sum() / total.sum(), total * cb.sum() / total.sum()
    stat = (((ca - ea) ** 2) / ea + ((cb - eb) ** 2) / eb).sum()
    dof = len(total) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2)), tv


SAMPLED = [
    SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True),
    SamplingParams(
        max_tokens=3, temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.3, ignore_eos=True
    ),
]


# methods that draft sampled trees (several candidates per position, exactly verified)
MULTI_DRAFT_METHODS = ("spectr", "rsd", "dyspec")

# drafts per step (a tree's: nodes); decoy-tree drafts trees of two branches or more
DISTRIBUTION_METHODS = {
    "draft-model": 2, "ngram": 2, "eagle": 2, "ngram-tree": 6, "decoy-tree": 6, "eagle-tree": 6,
    "spectr": 6, "rsd": 6, "dyspec": 6, "smartspec": 4, "tetris": 4,
    "lookahead": 6, "specdecpp": 3, "pearl": 3, "disco": 3,
    "ouroboros": 4, "ppd": 3, "hidden-transfer": 3, "token-recycling": 6, "ngram-recycling": 6,
    "smartspec-recycling": 6,
}  # fmt: skip


def _pearl_setting(target, params):
    """PEARL drafts with the target itself (see drafts_for; sampled, its argmax drafts are
    often rejected), and its first drafts come a step later than other methods': output
    position 2 is verified only if a 4th token follows (positions 1-2 are unaffected by it)."""
    return target.model, SamplingParams(**{**params.__dict__, "max_tokens": 4})


def _ppd_setting(params):
    """PPD's first guesses are made by the first decode step's forward (output position 1, which
    the verifier samples without drafts); with 5 tokens, position 2 on comes from verified guesses."""
    return SamplingParams(**{**params.__dict__, "max_tokens": 5})


def _head(method: str, tiny_eagle_head_dir, tiny_ppd_dir, tiny_transfer_dir) -> str:
    return str({"ppd": tiny_ppd_dir, "hidden-transfer": tiny_transfer_dir}.get(method, tiny_eagle_head_dir))


@pytest.mark.parametrize("method", list(DISTRIBUTION_METHODS))
@pytest.mark.parametrize("params", SAMPLED, ids=["t1", "shaped"])
def test_sampling_matches_plain_sampling(
    peaked, tiny_eagle_head_dir, tiny_ppd_dir, tiny_transfer_dir, method, params
):
    """Empirical distribution of output tokens 2 and 3 over 3000 seeds, with speculation vs
    without: chi-square homogeneity p > 0.001 and total variation < TV_BOUND. Seeds are fixed,
    so the outcome is deterministic. Calibration (plain vs plain, other seeds): p 0.35-0.88, TV
    0.03-0.083; the mutations below give p < 1e-5 and TV 0.11-0.96."""
    target, draft = peaked
    plain = _samples(target, draft, params, seed0=0)
    k = DISTRIBUTION_METHODS[method]
    if method == "pearl":
        draft, params = _pearl_setting(target, params)
    if method in ("ppd", "hidden-transfer"):
        params = _ppd_setting(params)
    head = _head(method, tiny_eagle_head_dir, tiny_ppd_dir, tiny_transfer_dir)
    ours = _samples(target, draft, spec(params, method, k=k), seed0=10**6, head=head)
    for pos in POSITIONS:
        p_value, tv = _chi_square_homogeneity([o[pos] for o in plain], [o[pos] for o in ours])
        assert p_value > 1e-3 and tv < TV_BOUND, (pos, p_value, tv)


def _always(u, p, q):
    return True


def _ratio_inverted(u, p, q):
    return u * p < q


@pytest.mark.parametrize(
    "method", ["draft-model", "decoy-tree", "spectr", "rsd", "tetris", "pearl", "ppd", "token-recycling"]
)
@pytest.mark.parametrize("mutation", [_always, _ratio_inverted], ids=["accept-always", "q-over-p"])
def test_the_distribution_test_catches_a_wrong_acceptance_rule(
    peaked, tiny_eagle_head_dir, tiny_ppd_dir, tiny_transfer_dir, monkeypatch, mutation, method
):
    target, draft = peaked
    params = SAMPLED[0]
    plain = _samples(target, draft, params, seed0=0)
    monkeypatch.setattr(verifier, "accept", mutation)
    k = DISTRIBUTION_METHODS[method]
    if method == "pearl":
        draft, params = _pearl_setting(target, params)
    if method in ("ppd", "hidden-transfer"):
        params = _ppd_setting(params)
    head = _head(method, tiny_eagle_head_dir, tiny_ppd_dir, tiny_transfer_dir)
    ours = _samples(target, draft, spec(params, method, k=k), seed0=10**6, head=head)
    results = [_chi_square_homogeneity([o[pos] for o in plain], [o[pos] for o in ours]) for pos in POSITIONS]
    assert any(p_value <= 1e-3 or tv >= TV_BOUND for p_value, tv in results), results


@pytest.mark.parametrize("method", ["smartspec", "smartspec-recycling"])
@pytest.mark.parametrize("slope, verified", [(1e-6, True), (10.0, False)], ids=["cheap-rows", "dear-rows"])
def test_smartspec_verifies_drafts_only_where_they_pay(tiny, slope, verified, method):
    """SmartSpec weighs drafts against the step time they add: with rows almost free every
    request verifies drafts; with each row costing 10x a step's fixed part none does. The
    output is plain decoding's either way."""
    prompts = repetitive_prompts(8, seed=3)
    plain, _ = generate(tiny, prompts, GREEDY, max_num_seqs=8)
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=8))
    engine.step_cost.predict = lambda rows: 1.0 + slope * rows
    reqs = [engine.add_request(p, spec(GREEDY, method)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in reqs] == plain
    drafted = engine.speculator.stats.num_drafted
    assert drafted > 0 if verified else drafted == 0, drafted
    if verified:
        assert engine.speculator.stats.num_accepted > 0


def test_tetris_spends_the_batch_budget_where_drafts_are_surest(peaked):
    """Every step verifies at most half the batch's drafted tokens, and a request's share follows
    its drafter's confidence (so shares differ between requests; the peaked draft is surer of
    some tokens than of others)."""
    target, draft = peaked
    prompts = repetitive_prompts(6, seed=4)
    engine = LLMEngine(target, EngineConfig(max_num_seqs=6, draft_model=draft))
    reqs = [engine.add_request(p, spec(GREEDY, "tetris", k=4)) for p in prompts]
    proposer = engine.speculator.proposer("tetris")
    select, propose, shares = proposer.select, proposer.propose, []

    def checked(requests, max_tokens):  # the draft model never resumes past what it computed
        assert all(proposer._computed(r) <= r.num_tokens for r in requests)
        return propose(requests, max_tokens)

    def recording(requests, made, base_rows, base_tokens):
        drafted = sum(len(d.tokens) for d in made)
        select(requests, made, base_rows, base_tokens)
        verified = [len(d.tokens) for d in made]
        assert sum(verified) <= -(-drafted // 2)
        shares.append(verified)

    proposer.select, proposer.propose = recording, checked
    while engine.has_unfinished():
        engine.step()
    assert any(len(set(v)) > 1 for v in shares), shares
    plain, _ = generate(target, prompts, GREEDY, max_num_seqs=6)
    assert [r.output_ids for r in reqs] == plain


def test_tetris_cuts_to_the_budget_and_rewinds_the_draft_cache():
    from types import SimpleNamespace

    from falconet.methods.speculative.tetris import TetrisProposer

    proposer = TetrisProposer.__new__(TetrisProposer)  # select needs no engine
    proposer._budget = 3
    reqs = [SimpleNamespace(request_id="a", num_tokens=10), SimpleNamespace(request_id="b", num_tokens=20)]
    proposer._valid = {"a": (0, 13), "b": (0, 23)}  # each fed its known tokens and 3 of 4 drafts
    made = [Draft([1, 2, 3, 4], confidence=[0.9] * 4), Draft([5, 6, 7, 8], confidence=[0.2, 0.9, 0.9, 0.9])]
    proposer.select(reqs, made, 2, 2)
    assert [d.tokens for d in made] == [[1, 2, 3], []]
    # b's drafts are not verified: its draft model resumes from its known tokens
    assert proposer._valid == {"a": (0, 13), "b": (0, 20)}


def test_tetris_never_judges_a_sampled_draft_by_its_own_draw():
    from falconet.methods.speculative.tetris import _survival

    q = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]])
    sure, unsure = (
        Draft([0, 0, 0], q, confidence=[0.5, 0.9, 0.4]),
        Draft([2, 1, 2], q, confidence=[0.2, 0.05, 0.2]),
    )
    # token 0's value is the same whichever token was drawn; later ones see the draws before them
    assert _survival(sure)[0] == _survival(unsure)[0] == pytest.approx(0.38)
    assert _survival(sure)[1] == pytest.approx(min(0.38, 0.5 * 0.815))
    assert _survival(unsure)[1] == pytest.approx(0.2 * 0.815)
    greedy = Draft([0, 0], confidence=[0.5, 0.9])  # point masses: their own confidence counts
    assert _survival(greedy) == pytest.approx([0.5, 0.45])


def test_lookahead_drafts_an_earlier_answer_whole(tiny):
    """The pool outlives requests: asked again, the answer comes back in a few long steps; after
    forget() the pool is empty again. Output is plain decoding's throughout."""
    prompt = repetitive_prompts(1, seed=6)[0]
    params = spec(SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "lookahead")
    (plain,), _ = generate(tiny, [prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine = LLMEngine(tiny, EngineConfig(max_num_seqs=2))
    steps = []
    for _ in range(3):
        req = engine.add_request(prompt, params)
        before = engine.stats.num_steps
        while engine.has_unfinished():
            engine.step()
        assert req.output_ids == plain
        steps.append(engine.stats.num_steps - before)
        if len(steps) == 2:
            engine.speculator.forget()
    assert steps[1] <= 30 // 5 + 2 < steps[0] and steps[2] == steps[0], steps


def test_specdecpp_learns_from_verification(tiny, tiny_eagle_head_dir):
    """The acceptance head is trained by the engine's verifications: its weights move from the
    head's own confidence, and output stays plain decoding's."""
    prompts = repetitive_prompts(6, seed=8)
    plain, _ = generate(tiny, prompts, GREEDY, max_num_seqs=6)
    outs, engine = generate(
        tiny, prompts, spec(GREEDY, "specdecpp"), max_num_seqs=6, draft_head=str(tiny_eagle_head_dir)
    )
    assert outs == plain
    assert engine.speculator.proposer("specdecpp").acceptance.weights != [0.0, 1.0, 0.0]


def test_every_speculative_method_is_in_the_catalogue():
    assert set(METHODS) <= set(SPECULATIVE_METHODS.names())
