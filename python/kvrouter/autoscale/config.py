"""Autoscaling planner settings: SLOs, fleet limits, loop timing, hysteresis (defaults defined once)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SLO(BaseModel):
    """Latency targets a request must meet (both) to count as within SLO."""

    model_config = ConfigDict(extra="forbid")
    ttft_s: float = Field(default=2.0, gt=0, description="time to first token")
    itl_s: float = Field(default=0.05, gt=0, description="mean inter-token latency of a request")


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slo: SLO = Field(default_factory=SLO)
    interval_s: float = Field(default=30.0, gt=0, description="one planning tick")
    min_prefill: int = Field(default=1, ge=0)
    min_decode: int = Field(default=1, ge=1,
                            description="decode workers at least; when every request is sized "
                                        "onto aggregated workers, aggregated workers at least")
    aggregated: bool = Field(default=True,
                             description="size an aggregated pool for the specialiser's short "
                                         "requests when cheaper (telemetry must split them)")
    layout_margin: int = Field(default=1, ge=0,
                               description="workers a layout change (with/without aggregated "
                                           "workers) must save, for down_stable_ticks ticks")
    max_workers: int = Field(default=32, ge=2, description="GPUs of the pool at most")
    # predictor (docs/autoscale.md: Holt level + trend, floored by the max of the recent ticks)
    ewma_alpha: float = Field(default=0.5, gt=0, le=1)
    trend_beta: float = Field(default=0.3, ge=0, le=1)
    recent_ticks: int = Field(default=10, ge=1,
                              description="floor: max of the last n observations (10 x 30 s: "
                                          "the 5-minute scale-down window of Kubernetes' HPA)")
    # sizing margins
    headroom: float = Field(default=0.15, ge=0, le=2,
                            description="extra share of the forecast rate provisioned: "
                                        "capacity asked for now arrives a cold start later")
    prefill_util_max: float = Field(default=0.8, gt=0, lt=1)
    decode_util_max: float = Field(default=0.85, gt=0, le=1)
    ttft_tail: float = Field(default=0.03, gt=0, lt=1,
                             description="accepted share of requests waiting past the TTFT budget")
    itl_margin: float = Field(default=0.85, gt=0, le=1,
                              description="decode batches sized for this share of the ITL SLO")
    # hysteresis and cooldowns
    up_cooldown_s: float = Field(default=30.0, ge=0)
    down_cooldown_s: float = Field(default=60.0, ge=0)
    down_stable_ticks: int = Field(default=2, ge=1,
                                   description="ticks a lower target must hold before scaling down")
    down_band: int = Field(default=1, ge=0, description="ignore surpluses of this many workers")
    max_step_down_share: float = Field(default=0.25, gt=0, le=1,
                                       description="share of a role drained per tick at most")
    # worker life cycle
    start_s: float = Field(default=60.0, ge=0, description="expected cold start of a worker")
    flip_s: float = Field(default=5.0, ge=0, description="expected role change of a drained worker")
    ready_timeout_s: float = Field(default=300.0, gt=0,
                                   description="a worker not ready after this is stopped")
    telemetry_max_age_s: float = Field(default=90.0, gt=0,
                                       description="older telemetry is a gap: hold")
    # actuator calls
    action_timeout_s: float = Field(default=30.0, gt=0)
    action_attempts: int = Field(default=3, ge=1)
    # SLO feedback: multiply the modelled need when the observed tail misses the SLO
    correction_step: float = Field(default=1.1, ge=1)
    correction_max: float = Field(default=1.5, ge=1)
    backlog_drain_s: float = Field(default=60.0, gt=0,
                                   description="queued prefill work is sized to clear in this")
    kv_usage_target: float = Field(
        default=0.8, gt=0, le=1,
        description="decode workers at least so that the KV the decode pool holds (engines' "
                    "load reports) would fill this share of their caches")

    @model_validator(mode="after")
    def _limits(self) -> AutoscaleConfig:
        if self.min_prefill + self.min_decode > self.max_workers:
            raise ValueError("min_prefill + min_decode exceeds max_workers")
        return self
