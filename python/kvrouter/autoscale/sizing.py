"""How many prefill and decode workers a predicted load needs, from the calibrated cost model.

The numbers come from the same `EngineProfile` the simulated engine steps with
(`kvrouter.engines.sim.profile`, a calibration file of ../shared/calibration), so the
planner and the fleet it is judged on agree on what a GPU can do:

* prefill: a prefill worker runs prompts in chunks of `max_num_batched_tokens`, so its
  throughput is that budget over the time of one full chunk. Prompts arrive at random, so
  the pool is an M/M/c queue (Erlang C) with service rate throughput / mean prompt; the
  pool is the smallest c whose probability of waiting past the TTFT budget (the SLO less
  one prompt's own prefill and KV transfer) is at most `ttft_tail`, at utilisation at most
  `prefill_util_max`.
* decode: the largest batch whose step time at the mean context stays under
  `itl_margin` x the ITL SLO and whose KV fits the cache; Little's law gives the sequences
  in decode (rate x output tokens x step time), divided by that batch at
  `decode_util_max`.

* aggregated: a worker that prefills and decodes (chunked prefill mixed into its decode
  steps, as the sim engine schedules them). Its prefill work (rate x prompt over the
  prefill throughput) is the share `rho` of its time that decode steps carry a prefill
  chunk; a decode token then costs its step time / (1 - rho) on average, so the largest
  batch is the one whose step time stays under (1 - rho) x `itl_margin` x the ITL SLO
  and whose KV fits. The pool is the smallest n whose prefill share is at most
  `prefill_util_max`, whose prompts meet the TTFT tail (Erlang C over n workers, as the
  prefill pool) and whose sequences in decode (Little's law at that per-token time) fit
  n such batches at `decode_util_max`.

An SLO no fleet meets (a prompt whose prefill alone exceeds the TTFT SLO, a single decode
step over the ITL SLO) is reported as infeasible rather than sized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrouter.autoscale.config import AutoscaleConfig
from kvrouter.engines.sim.engine import EngineConfig
from kvrouter.engines.sim.profile import EngineProfile


@dataclass(frozen=True, slots=True)
class Load:
    """One pool's load: arrivals per second and mean lengths."""

    rate: float
    prompt_tokens: float
    output_tokens: float

    def valid(self) -> bool:
        return all(math.isfinite(v) and v >= 0 for v in (self.rate, self.prompt_tokens,
                                                          self.output_tokens))


@dataclass(frozen=True, slots=True)
class Need:
    prefill: int
    decode: int
    feasible: bool = True
    reason: str = ""
    prefill_exact: float = 0.0  # fractional workers before rounding (for logs)
    decode_exact: float = 0.0
    decode_batch: int = 0
    aggregated: int = 0  # aggregated workers (PerfModel.need_aggregated; the planner's layout)
    aggregated_exact: float = 0.0

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.aggregated


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load a = lambda/mu (< c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    # sum_{k<c} a^k/k! and a^c/c! computed incrementally (no factorial overflow)
    term = 1.0
    total = 1.0
    for k in range(1, c):
        term *= a / k
        total += term
    top = term * a / c * c / (c - a)
    return top / (total + top)


class PerfModel:
    """Worker capacities of one model on one GPU (see the module doc)."""

    def __init__(self, profile: EngineProfile, engine: EngineConfig | None = None) -> None:
        self.profile = profile
        self.engine = engine or EngineConfig()
        chunk = self.engine.max_num_batched_tokens
        self.prefill_tok_s = chunk / profile.prefill_time(chunk)
        self.kv_tokens = self.engine.resolve_blocks(profile) * self.engine.block_size

    def prefill_service_s(self, prompt_tokens: float) -> float:
        return self.profile.prefill_time(max(1, round(prompt_tokens)))

    def transfer_s(self, prompt_tokens: float) -> float:
        return self.profile.transfer_time(max(1, round(prompt_tokens)),
                                          self.engine.link_bytes_per_s)

    def decode_batch(self, context: float, seq_tokens: float, itl_s: float) -> int:
        """Largest batch with step time <= itl_s at `context` whose KV fits (0: none)."""
        kv_cap = int(0.9 * self.kv_tokens // max(seq_tokens, 1.0))
        hi = min(self.engine.max_num_seqs, kv_cap)
        if hi < 1 or self.profile.decode_time(1, context) > itl_s:
            return 0
        lo = 1
        while lo < hi:  # step time grows with batch: binary search the last fitting one
            mid = (lo + hi + 1) // 2
            if self.profile.decode_time(mid, context) <= itl_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _ttft_ok(self, c: int, rate: float, mu: float, budget: float, tail: float) -> bool:
        """M/M/c: P(wait > budget) <= tail with c servers of rate mu (offered load rate/mu)."""
        return erlang_c(c, rate / mu) * math.exp(-(c * mu - rate) * budget) <= tail

    def need_aggregated(self, load: Load, cfg: AutoscaleConfig, scale: float = 1.0) -> Need:
        """Aggregated workers for `load` (prefill and decode on each; see the module doc);
        `scale` is the planner's SLO correction."""
        slo = cfg.slo
        if not load.valid():
            raise ValueError(f"invalid load {load}")
        if load.rate <= 0:
            return Need(0, 0)
        p, o = max(load.prompt_tokens, 1.0), max(load.output_tokens, 1.0)
        rate = load.rate * scale
        context = p + o / 2
        itl = slo.itl_s * cfg.itl_margin
        step1 = self.profile.decode_time(1, context)
        # a new prompt joins the next step: it waits for at most the one running
        budget = slo.ttft_s - self.prefill_service_s(p) - step1
        if budget <= 0:
            return Need(0, 0, False, f"one {p:.0f}-token prefill exceeds the TTFT SLO "
                        f"{slo.ttft_s}s")
        if self.decode_batch(context, p + o, itl) == 0:  # then no n helps either
            return Need(0, 0, False, f"no decode batch meets the ITL SLO {slo.itl_s}s at "
                        f"context {context:.0f}")
        mu = self.prefill_tok_s / p
        a = rate / mu  # workers' worth of prefill
        # the share of decode time prompts take: a mixed step pays the chunk's prefill, the
        # decode part only above the step floor (EngineProfile.step_time)
        chunks = math.ceil(p / self.engine.max_num_batched_tokens)
        extra = max(0.0, self.prefill_service_s(p) - chunks * self.profile.decode_floor_s)
        n = max(1, math.ceil(a / cfg.prefill_util_max))
        while True:
            rho = min(1.0, rate * extra / n)
            batch = self.decode_batch(context, p + o, itl * (1 - rho)) if rho < 1 else 0
            if batch > 0 and self._ttft_ok(n, rate, mu, budget, cfg.ttft_tail):
                per_token = self.profile.decode_time(batch, context) / (1 - rho)
                exact = rate * o * per_token / (batch * cfg.decode_util_max)
                if exact <= n:
                    return Need(0, 0, aggregated=n, aggregated_exact=max(exact, a),
                                decode_batch=batch)
            n += 1

    def need(self, load: Load, cfg: AutoscaleConfig, prefill_scale: float = 1.0,
             decode_scale: float = 1.0) -> Need:
        """Workers for `load` under cfg's SLO; the scales are the planner's SLO corrections."""
        slo = cfg.slo
        if not load.valid():
            raise ValueError(f"invalid load {load}")
        if load.rate <= 0:
            return Need(0, 0, decode_batch=0)
        p, o = max(load.prompt_tokens, 1.0), max(load.output_tokens, 1.0)
        budget = slo.ttft_s - self.prefill_service_s(p) - self.transfer_s(p)
        if budget <= 0:
            return Need(0, 0, False, f"one {p:.0f}-token prefill exceeds the TTFT SLO "
                        f"{slo.ttft_s}s")
        mu = self.prefill_tok_s / p
        a = load.rate * prefill_scale / mu
        c = max(1, math.ceil(a / cfg.prefill_util_max))
        while not self._ttft_ok(c, load.rate * prefill_scale, mu, budget, cfg.ttft_tail):
            c += 1
        context = p + o / 2
        batch = self.decode_batch(context, p + o, slo.itl_s * cfg.itl_margin)
        if batch == 0:
            return Need(c, 0, False, f"no decode batch meets the ITL SLO {slo.itl_s}s at "
                        f"context {context:.0f}", prefill_exact=a)
        in_decode = load.rate * decode_scale * o * self.profile.decode_time(batch, context)
        d_exact = in_decode / (batch * cfg.decode_util_max)
        return Need(c, max(1, math.ceil(d_exact)), prefill_exact=a, decode_exact=d_exact,
                    decode_batch=batch)
