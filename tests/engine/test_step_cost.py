"""The engine's fit of forward time against rows."""

import pytest

from falconet.engine.step_cost import PRIOR_ROW_SHARE, StepCostModel


def test_fit_recovers_a_line():
    model = StepCostModel()
    assert model.predict(10) == 0.0  # nothing measured
    for i in range(200):
        rows = 1 + (i * 7) % 40
        model.record(rows, 0.008 + 0.0003 * rows)
    a, b = model.line
    assert a == pytest.approx(0.008, rel=0.02) and b == pytest.approx(0.0003, rel=0.02)


def test_prior_before_the_steps_vary():
    model = StepCostModel()
    model.record(1, 0.01)
    a, b = model.line
    assert b == pytest.approx(PRIOR_ROW_SHARE * a, rel=0.01) and model.predict(1) == pytest.approx(0.01)
    for _ in range(5000):  # always the same size: the level follows, the slope stays the prior's
        model.record(16, 0.02)
    a, b = model.line
    assert model.predict(16) == pytest.approx(0.02, rel=0.01) and b == pytest.approx(
        PRIOR_ROW_SHARE * a, rel=0.01
    )


def test_the_engine_times_decode_steps_only(tiny_llama_dir):
    """Prefill rows cost differently (and a first step carries the warm-up): not in the fit."""
    from falconet.engine.engine import EngineConfig, LLMEngine
    from falconet.models.loader import load_model
    from falconet.sampling_params import SamplingParams

    engine = LLMEngine(load_model(tiny_llama_dir, with_tokenizer=False), EngineConfig())
    engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.num_steps == 5 and engine.step_cost.num_steps == 4
    assert engine.step_cost.predict(1) > 0


def test_recent_steps_weigh_more():
    model = StepCostModel()
    for i in range(300):
        model.record(1 + i % 30, 0.01 + 0.001 * (1 + i % 30))
    for i in range(300):  # the load changed: every row now costs twice as much
        model.record(1 + i % 30, 0.01 + 0.002 * (1 + i % 30))
    assert model.line[1] == pytest.approx(0.002, rel=0.05)


def test_the_rest_of_a_step_is_a_constant_not_a_slope():
    model = StepCostModel()
    for i in range(300):
        rows = 1 + i % 6  # the more rows, the more tokens produced, the longer the rest of the step
        model.record(rows, 0.008 + 0.0003 * rows, 0.008 + 0.0003 * rows + 0.001 * rows)
    a, b = model.line
    assert b == pytest.approx(0.0003, rel=0.05)
    assert model.predict(4) == pytest.approx(0.008 + 0.0012 + 0.0035, rel=0.05)  # the rest's mean
