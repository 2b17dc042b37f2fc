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
    assert b == pytest.approx(PRIOR_ROW_SHARE * a) and model.predict(1) == pytest.approx(0.01)
    for _ in range(5000):  # always the same size: the level follows, the slope stays positive
        model.record(16, 0.02)
    a, b = model.line
    assert model.predict(16) == pytest.approx(0.02, rel=0.01) and 0.1 * PRIOR_ROW_SHARE * a < b


def test_recent_steps_weigh_more():
    model = StepCostModel()
    for i in range(300):
        model.record(1 + i % 30, 0.01 + 0.001 * (1 + i % 30))
    for i in range(300):  # the load changed: every row now costs twice as much
        model.record(1 + i % 30, 0.01 + 0.002 * (1 + i % 30))
    assert model.line[1] == pytest.approx(0.002, rel=0.05)
