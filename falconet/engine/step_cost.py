"""What an engine step costs, as the engine measures it: time = a + b * rows.

Load-aware speculation (SmartSpec's goodput, TETRIS's budget) weighs the tokens a draft may
bring against the time its extra rows add to the step. On a CPU a forward's time grows close to
linearly in its rows (the default model, 2 threads, bf16: 8.1 ms for 1 row, 13.8 ms for 16, 27 ms
for 60), so a line fitted to the engine's own recent forwards predicts the next one. The rest of
a step (scheduling, drafting, sampling, detokenizing; in a server, waiting for the GIL) is added
as its recent average: it grows with the tokens a step produces, not with the rows it verifies,
so fitting it against rows would make every draft row look several times dearer than it is.
The fit weighs recent steps more (load and context lengths drift); a weak prior keeps the slope
sensible before the steps have varied in size.
"""

from __future__ import annotations

# The prior's slope per row as a share of the fixed cost (0.3 ms / 8.5 ms, measured as above).
PRIOR_ROW_SHARE = 0.035


class StepCostModel:
    """Exponentially weighted least squares of forward seconds on rows, plus the rest of a step.

    The prior is a penalty on the slope's distance from PRIOR_ROW_SHARE times the intercept,
    relative, so it holds whatever the machine's speed (and an unusually slow first step, the
    warm-up, cannot skew it)."""

    def __init__(self, decay: float = 0.98, prior_weight: float = 8.0):
        self.decay, self.prior_weight = decay, prior_weight
        self._sums = [0.0] * 5  # of the steps: sum w, w*r, w*r^2, w*t, w*r*t
        self.num_steps = 0
        self.overhead = 0.0  # seconds of a step outside its forward, a moving average

    def record(self, rows: int, seconds: float, step_seconds: float | None = None) -> None:
        """A step of `rows` rows whose forward took `seconds` and the whole of it step_seconds."""
        if step_seconds is not None:
            rest = max(0.0, step_seconds - seconds)
            self.overhead = rest if self.num_steps == 0 else self.overhead + 0.05 * (rest - self.overhead)
        self._sums = [x * self.decay for x in self._sums]
        for i, v in enumerate((1.0, rows, rows * rows, seconds, rows * seconds)):
            self._sums[i] += v
        self.num_steps += 1

    @property
    def line(self) -> tuple[float, float]:
        """(a, b): forward seconds at zero rows and per row; (0, 0) before any step."""
        w, wr, wr2, wt, wrt = self._sums
        if w == 0:
            return 0.0, 0.0
        # minimise sum w (t - a - b r)^2 + lam (b - s a)^2: the normal equations, 2 x 2
        lam, s = self.prior_weight, PRIOR_ROW_SHARE
        m11, m12, m22 = w + lam * s * s, wr - lam * s, wr2 + lam
        det = m11 * m22 - m12 * m12
        a = (wt * m22 - m12 * wrt) / det
        b = (m11 * wrt - m12 * wt) / det
        if b < 0:  # noise must not make rows look free of charge
            a, b = wt / w, 0.0
        return a, b

    def predict(self, rows: int) -> float:
        """Seconds of a step with `rows` rows (0 before any step)."""
        a, b = self.line
        return a + b * rows + self.overhead
