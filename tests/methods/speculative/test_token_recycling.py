"""Token Recycling's candidate matrix: the target's top-k per context, longest context first,
grown into a tree best-first; and in the engine, every row the target computes feeds it."""

import pytest
import torch

from falconet.engine.engine import EngineConfig, LLMEngine
from falconet.methods.speculative.base import Draft
from falconet.methods.speculative.token_recycling import CandidateMatrix
from falconet.models.loader import load_model
from falconet.sampling_params import SamplingParams


def _logits(*ranked, vocab=20):
    """One row per list: those token ids get the highest scores, in order."""
    rows = torch.zeros(len(ranked), vocab)
    for r, ids in enumerate(ranked):
        for rank, t in enumerate(ids):
            rows[r, t] = 10.0 - rank
    return rows


def _paths(tokens, parents):
    draft = Draft(tokens, parents=parents)
    leaves = set(range(len(tokens))) - set(parents)
    return sorted(tuple(tokens[i] for i in draft.path(leaf)) for leaf in leaves)


def test_the_latest_row_for_a_context_gives_its_candidates_longest_context_first():
    m = CandidateMatrix(top_k=3, max_order=2)
    m.update([(1, 2)], _logits([5, 6, 7]))
    assert m.candidates((9, 2))[0] == [5, 6, 7]  # (9, 2) unseen: token 2's candidates
    m.update([(4, 2)], _logits([8, 5, 6]))
    assert m.candidates((1, 2))[0] == [5, 6, 7]  # its own pair's
    assert m.candidates((9, 2))[0] == [8, 5, 6]  # token 2's, replaced by the latest row
    assert m.candidates((3,))[0] == []
    # the token-level entry's old candidates ranked the fresh argmax (8) nowhere: one trial, no hit
    hits, trials = m.tally[0]
    assert trials == 51 and sum(hits) == sum(m.tally[1][0])
    m.update([(7, 2)], _logits([5, 8, 6]))  # 5 was the old entry's second
    assert m.tally[0][1] == 52 and m.tally[0][0][1] > m.tally[1][0][1]


def test_a_row_with_nan_scores_gives_only_real_candidates():
    m = CandidateMatrix(top_k=3, max_order=1)
    row = torch.full((1, 20), float("nan"))
    row[0, 4] = 1.0
    m.update([(1,)], row)
    assert m.candidates((1,))[0] == [4]


def test_the_tree_grows_best_first_through_the_matrix():
    m = CandidateMatrix(top_k=2, max_order=1)
    m.update([(1,), (2,), (3,), (4,)], _logits([2, 3], [4, 5], [6, 7], [8, 9]))
    # rank hit rates (the prior): 0.36 for a first candidate, 0.08 for a second; a node's value is
    # the product along its path: 2 (0.36), 4 (0.13), 3 (0.08), 8 (0.047), then 5 and 6 (0.029)
    assert m.tree((1,), budget=3) == ([2, 4, 3], [-1, 0, -1])
    assert m.tree((1,), budget=6) == ([2, 4, 3, 8, 5, 6], [-1, 0, -1, 1, 0, 2])
    assert m.tree((1,), budget=6, max_depth=1) == ([2, 3], [-1, -1])
    assert m.tree((11,), budget=6) == ([], [])
    values = []
    m.tree((1,), budget=6, values=values)  # each node's value: what smartspec-recycling weighs
    expected = [0.36, 0.36 * 0.36, 0.08, 0.36**3, 0.36 * 0.08, 0.08 * 0.36]
    assert values == pytest.approx(expected)


def test_deeper_nodes_use_their_own_path_as_context():
    m = CandidateMatrix(top_k=1, max_order=2)
    m.update([(1, 2), (2, 3), (9, 3)], _logits([3], [4], [5]))
    assert m.tree((1, 2), budget=2)[0] == [3, 4]  # after 2 -> 3, the pair (2, 3) says 4, not 5


def test_seeding_from_text_never_overrides_the_target():
    m = CandidateMatrix(top_k=3, max_order=2)
    m.update([(1, 2)], _logits([5, 6, 7]))
    m.seed([1, 2, 3, 4, 2, 9])
    assert m.candidates((1, 2))[0] == [5, 6, 7]
    assert m.candidates((3, 4))[0] == [2]
    assert m.candidates((4, 2))[0] == [9]  # the pair's own follower, not token 2's candidates


def test_old_contexts_are_dropped_beyond_the_bound():
    m = CandidateMatrix(top_k=1, max_order=2, max_contexts=4)
    m.update([(i, i + 1) for i in range(10)], _logits(*[[1]] * 10))
    assert len(m.tables[1]) == 4 and (9, 10) in m.tables[1] and (0, 1) not in m.tables[1]


def test_every_row_the_target_computes_feeds_the_matrix(tiny_llama_dir):
    """Sampled steps' rows and verified drafts' rows, rejected ones included, reach the matrix,
    each with the (up to 3) tokens its input ends: the request's last ones, or a node's path."""
    engine = LLMEngine(load_model(tiny_llama_dir, with_tokenizer=False), EngineConfig(max_num_seqs=2))
    proposer = engine.speculator.proposer("token-recycling")
    calls = []
    update, hook = proposer.matrix.update, proposer.on_target_logits

    def record(request, draft, logits):
        calls.append({"known": len(request.all_ids), "draft": draft, "rows": logits.shape[0]})
        hook(request, draft, logits)

    def record_update(contexts, logits):
        calls[-1]["contexts"] = contexts
        update(contexts, logits)

    proposer.on_target_logits, proposer.matrix.update = record, record_update
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, speculative="token-recycling")
    req = engine.add_request([3, 4, 5, 6, 3, 4, 5], params)
    while engine.has_unfinished():
        engine.step()
    ids = req.prompt_ids + req.output_ids
    assert calls[0]["draft"] is None and calls[0]["known"] == len(req.prompt_ids)  # the prefill's row
    assert any(c["draft"] is not None and c["draft"].is_tree for c in calls)
    for c in calls:
        draft, contexts = c["draft"], c["contexts"]
        assert len(contexts) == c["rows"] == 1 + (len(draft.tokens) if draft else 0)
        assert contexts[0] == tuple(ids[: c["known"]][-3:])
        for j, token in enumerate(draft.tokens if draft else []):
            parent = draft.parents[j] if draft.is_tree else j - 1
            assert contexts[j + 1] == (contexts[parent + 1] + (token,))[-3:]
    assert sum(c["rows"] for c in calls) > len(req.output_ids)  # rejected rows count too
