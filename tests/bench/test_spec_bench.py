"""`falconet bench spec` on the default model, kept tiny: one prompt per category, 8 tokens."""

from __future__ import annotations

import json

import pytest

from falconet.api import LLM
from falconet.bench.spec import CATEGORIES, PLAIN, format_results, load_prompts, run_spec_bench, to_json


def test_prompt_set_has_six_categories_of_eight():
    items = load_prompts()
    assert len(items) == 48 and len({i["id"] for i in items}) == 48
    for category in CATEGORIES:
        chosen = [i for i in items if i["category"] == category]
        assert len(chosen) == 8
        assert all(len(i["turns"]) == (2 if category == "multi_turn" else 1) for i in chosen)
    assert [i["category"] for i in load_prompts(per_category=1)] == list(CATEGORIES)


@pytest.fixture(scope="module")
def llm(default_gguf):
    return LLM(str(default_gguf), dtype="bfloat16", max_num_seqs=1)


def test_every_method_runs_every_category_against_plain(llm):
    items = load_prompts(per_category=1)
    result = run_spec_bench(llm, ["ngram"], items, temperature=0.0, max_tokens=8, run=0)
    for method in (PLAIN, "ngram"):
        for category in CATEGORIES:
            tally = result.tally(method, category)
            assert tally.tokens == 8 * (2 if category == "multi_turn" else 1) and tally.seconds > 0
    assert result.overall(PLAIN).mean_accepted == 1.0
    assert result.overall("ngram").steps > 0  # it drafted somewhere
    rows = to_json([result])
    overall = [r for r in rows if r["category"] == "overall" and r["method"] == "ngram"]
    assert len(overall) == 1 and overall[0]["speedup"] > 0
    json.dumps(rows)
    table = format_results([result], ["ngram"])
    assert "| ngram |" in table and "overall" in table and "greedy" in table
