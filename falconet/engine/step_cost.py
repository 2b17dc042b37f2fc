"""What an engine step costs, as the engine measures it: time = a + b * rows.

Load-aware speculation (SmartSpec's goodput, TETRIS's budget) weighs the tokens a draft may
bring against the time its extra rows add to the step. On a CPU a step's time grows close to
linearly in its rows (measured forwards of the default model, 2 threads, bf16: 8.1 ms for 1 row,
13.8 ms for 16, 27 ms for 60), so a line fitted to the engine's own recent steps predicts the next
one. A whole step is timed, not just its forward: where the rest of a step is slow (a server's
threads contending for the GIL), a draft's rows weigh less against it.
The fit weighs recent steps more (load and context lengths drift); a weak prior keeps the slope
sensible before the steps have varied in size.
"""

from __future__ import annotations

# The prior's slope per row as a share of the fixed cost (0.3 ms / 8.5 ms, measured as above).
PRIOR_ROW_SHARE = 0.035


class StepCostModel:
    """Exponentially weighted least squares of step seconds on rows."""

    def __init__(self, decay: float = 0.98, prior_weight: float = 0.5):
        self.decay, self.prior_weight = decay, prior_weight
        self._sums = [0.0] * 5  # of the steps: sum w, w*r, w*r^2, w*t, w*r*t
        self._prior = [0.0] * 5  # two points on a line through the first step; never decays
        self.num_steps = 0

    def record(self, rows: int, seconds: float) -> None:
        if self.num_steps == 0:
            a = seconds / (1 + PRIOR_ROW_SHARE * rows)
            for r in (1, 9):
                self._add(self._prior, r, a * (1 + PRIOR_ROW_SHARE * r), self.prior_weight)
        self._sums = [s * self.decay for s in self._sums]
        self._add(self._sums, rows, seconds, 1.0)
        self.num_steps += 1

    @staticmethod
    def _add(sums: list[float], r: float, t: float, w: float) -> None:
        for i, v in enumerate((w, w * r, w * r * r, w * t, w * r * t)):
            sums[i] += v

    @property
    def line(self) -> tuple[float, float]:
        """(a, b): seconds at zero rows and per row; (0, 0) before any step."""
        w, wr, wr2, wt, wrt = (s + p for s, p in zip(self._sums, self._prior, strict=True))
        if w == 0:
            return 0.0, 0.0
        det = w * wr2 - wr * wr
        b = (w * wrt - wr * wt) / det if det > 1e-12 else 0.0
        b = max(b, 0.0)  # noise must not make rows look free of charge or negative
        return (wt - b * wr) / w, b

    def predict(self, rows: int) -> float:
        a, b = self.line
        return a + b * rows
