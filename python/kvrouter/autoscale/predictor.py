"""Next-interval load prediction: Holt's linear smoothing, floored by the recent maximum.

Why this one: arrival rates in the Azure traces move as slow ramps with short bursts on
top. Holt's method (an EWMA of the level plus an EWMA of the per-tick trend) follows a
ramp without the lag of a plain moving average, and needs two constants, no history
beyond its state, and no training. Under-provisioning costs SLO misses at once while
over-provisioning costs a few GPU-minutes, so the forecast is floored by the maximum of
the last few observations: a burst keeps its capacity for `recent_ticks` ticks, and a
falling trend never predicts below what was just seen. Lengths (prompt, output) are
smoothed by the same level EWMA, without trend or floor (the mean length of a 30 s
window is noisy; the rate floor already keeps the work of a burst).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Forecast:
    rate: float
    prompt_tokens: float
    output_tokens: float


class Holt:
    """Level + trend smoothing of one series; `forecast(h)` is h ticks ahead."""

    def __init__(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = alpha, beta
        self.level: float | None = None
        self.trend = 0.0

    def observe(self, x: float) -> None:
        if self.level is None:
            self.level = x
            return
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (prev + self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.trend

    def forecast(self, h: float = 1.0) -> float:
        return 0.0 if self.level is None else max(0.0, self.level + h * self.trend)


class LoadPredictor:
    def __init__(self, alpha: float = 0.5, beta: float = 0.3, recent: int = 3) -> None:
        self._rate = Holt(alpha, beta)
        self._prompt = Holt(alpha, 0.0)
        self._output = Holt(alpha, 0.0)
        self._recent: deque[float] = deque(maxlen=recent)

    @property
    def primed(self) -> bool:
        return self._rate.level is not None

    def observe(self, rate: float, prompt_tokens: float, output_tokens: float) -> None:
        """One interval's measurement; non-finite or negative values are refused."""
        for name, v in (("rate", rate), ("prompt_tokens", prompt_tokens),
                        ("output_tokens", output_tokens)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        self._rate.observe(rate)
        self._recent.append(rate)
        if rate > 0:  # an idle interval says nothing about lengths
            self._prompt.observe(prompt_tokens)
            self._output.observe(output_tokens)

    def forecast(self, ticks_ahead: float = 1.0) -> Forecast:
        rate = max(self._rate.forecast(ticks_ahead), max(self._recent, default=0.0))
        return Forecast(rate, self._prompt.forecast(), self._output.forecast())
