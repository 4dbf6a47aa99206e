"""Planner: the pool and the path (aggregated, disaggregated, local prefill) of one request.

Runs before scoring, in two steps, both synchronous and free of I/O so that the
gRPC service (Router.Generate) and the fleet simulator share them:

1. Specialisation: a pluggable `Specialiser` sends the request to a pool of
   workers by its input and expected output length. The default
   (`LengthSpecialiser`, thresholds in `SpecialisationConfig`) sends short
   inputs, and inputs whose output is long next to them, to the aggregated
   pool; medium inputs to the disaggregated pool; long contexts to the
   long-context pool (disaggregated, provisioned with more prefill capacity).
   A missing pool falls back to the next best one.
2. Path: in an aggregated pool the request runs whole on one worker. In a
   disaggregated pool the decode worker is chosen first (decode load plus the
   cost of moving the KV it does not already hold), then conditional
   disaggregation decides: prefill locally on that decode worker when the part
   of the prompt it lacks is short, or when every prefill worker is saturated;
   otherwise prefill remotely on the prefill worker with the lowest kv cost.

Scoring is always `Scheduler.route*` (Rust); load is reserved at each stage:
the prefill worker holds prompt tokens (and the KV until it is handed over), the
decode worker holds the request's decode blocks from the start, so concurrent
plans do not pile on the same worker.

Pools: a worker's pool is its registry metadata ``pool``; without it,
aggregated workers form the "aggregated" pool and prefill/decode workers the
"disaggregated" pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from kvrouter._core import Decision, NoRoutableWorker, Scheduler
from kvrouter.config import DisaggConfig, SpecialisationConfig
from kvrouter.registry import Role

log = logging.getLogger("kvrouter.planner")

AGGREGATED_POOL = "aggregated"
DISAGGREGATED_POOL = "disaggregated"
LONG_CONTEXT_POOL = "long-context"
POOL_METADATA_KEY = "pool"


class PlanPath(StrEnum):
    AGGREGATED = "aggregated"  # whole request on one aggregated worker
    DISAGGREGATED = "disaggregated"  # context on a prefill worker, generation on a decode worker
    LOCAL_PREFILL = "local_prefill"  # whole request on a decode worker (conditional disagg.)


class RequestClass(StrEnum):
    SHORT = "short"
    MEDIUM = "medium"
    LONG = "long"


class NoWorker(LookupError):
    """No routable worker can serve the request (the message says which pool / role)."""


@dataclass(frozen=True, slots=True)
class Pool:
    """Worker ids of one pool, by role."""

    name: str
    aggregated: tuple[int, ...] = ()
    prefill: tuple[int, ...] = ()
    decode: tuple[int, ...] = ()

    @property
    def disaggregated(self) -> bool:
        return bool(self.decode)

    @property
    def usable(self) -> bool:
        """Some worker can finish a request (prefill alone cannot)."""
        return bool(self.aggregated or self.decode)

    def without(self, excluded: Iterable[int]) -> Pool:
        ex = set(excluded)
        if not ex:
            return self
        return Pool(self.name, tuple(w for w in self.aggregated if w not in ex),
                    tuple(w for w in self.prefill if w not in ex),
                    tuple(w for w in self.decode if w not in ex))


def default_pool(role: Role) -> str:
    return AGGREGATED_POOL if role is Role.AGGREGATED else DISAGGREGATED_POOL


def build_pools(workers: Iterable[tuple[int, Role, str | None]]) -> dict[str, Pool]:
    """Pools from (worker id, role, pool name or None) of the routable workers."""
    acc: dict[str, tuple[list[int], list[int], list[int]]] = {}
    for wid, role, name in workers:
        agg, pre, dec = acc.setdefault(name or default_pool(role), ([], [], []))
        (agg if role is Role.AGGREGATED else pre if role is Role.PREFILL else dec).append(wid)
    return {name: Pool(name, tuple(sorted(a)), tuple(sorted(p)), tuple(sorted(d)))
            for name, (a, p, d) in acc.items()}


# --------------------------------------------------------------------------- specialisation


class Specialiser(Protocol):
    """Chooses a pool for a request before scoring (pluggable)."""

    def classify(self, prompt_tokens: int, expected_output_tokens: int) -> str: ...

    def choose(self, prompt_tokens: int, expected_output_tokens: int,
               pools: Mapping[str, Pool]) -> str:
        """The name of a usable pool in `pools`; NoWorker if there is none."""
        ...


class LengthSpecialiser:
    """Input/output length classes mapped to pools, with fallbacks (see module doc)."""

    PREFERENCE: dict[RequestClass, tuple[str, ...]] = {
        RequestClass.SHORT: (AGGREGATED_POOL, DISAGGREGATED_POOL, LONG_CONTEXT_POOL),
        RequestClass.MEDIUM: (DISAGGREGATED_POOL, LONG_CONTEXT_POOL, AGGREGATED_POOL),
        RequestClass.LONG: (LONG_CONTEXT_POOL, DISAGGREGATED_POOL, AGGREGATED_POOL),
    }

    def __init__(self, config: SpecialisationConfig | None = None) -> None:
        self.config = config or SpecialisationConfig()
        if self.config.long_input_tokens <= self.config.short_input_tokens:
            raise ValueError("specialisation: long_input_tokens must be > short_input_tokens")

    def classify(self, prompt_tokens: int, expected_output_tokens: int) -> RequestClass:
        c = self.config
        if prompt_tokens >= c.long_input_tokens:
            return RequestClass.LONG
        if prompt_tokens <= c.short_input_tokens:
            return RequestClass.SHORT
        if expected_output_tokens >= c.agg_output_ratio * prompt_tokens:
            # decode dominates: prefill interference is small, moving the KV is not worth it
            return RequestClass.SHORT
        return RequestClass.MEDIUM

    def choose(self, prompt_tokens: int, expected_output_tokens: int,
               pools: Mapping[str, Pool]) -> str:
        cls = self.classify(prompt_tokens, expected_output_tokens)
        for name in self.PREFERENCE[cls]:
            pool = pools.get(name)
            if pool is not None and pool.usable:
                return name
        for name in sorted(pools):  # pools with other names: any that can serve
            if pools[name].usable:
                return name
        raise NoWorker("no routable aggregated or decode worker")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the scheduler takes it: token ids (service) or router hashes (simulator)."""

    prompt_tokens: int
    tokens: Any = None  # anything Scheduler.route takes
    hashes: Sequence[int] | None = None
    extra_key: bytes | None = None

    @classmethod
    def from_tokens(cls, tokens: Any, extra_key: bytes | None = None) -> Prompt:
        n = len(tokens) // 4 if isinstance(tokens, bytes | bytearray | memoryview) else len(tokens)
        return cls(prompt_tokens=n, tokens=tokens, extra_key=extra_key or None)

    @classmethod
    def from_hashes(cls, hashes: Sequence[int], prompt_tokens: int) -> Prompt:
        return cls(prompt_tokens=prompt_tokens, hashes=hashes)


@dataclass(slots=True)
class Plan:
    request_id: str
    pool: str
    request_class: str
    path: PlanPath
    worker: int  # aggregated worker, or the decode worker
    prefill_worker: int | None = None
    overlap_blocks: int = 0  # cached prompt blocks on `worker`
    prefill_overlap_blocks: int = 0
    reason: str = ""
    reservations: list[str] = field(default_factory=list)

    @property
    def prefill_request_id(self) -> str:
        return prefill_id(self.request_id)


def prefill_id(request_id: str) -> str:
    return f"{request_id}/prefill"


class Planner:
    """Pool choice, path choice and the reservations of each stage for one model."""

    def __init__(self, scheduler: Scheduler, config: DisaggConfig | None = None, *,
                 block_size: int, prefill_weight: float = 1.0,
                 specialiser: Specialiser | None = None) -> None:
        self.scheduler = scheduler
        self.config = config or DisaggConfig()
        self.block_size = block_size
        self.prefill_weight = prefill_weight
        self.specialiser: Specialiser = specialiser or LengthSpecialiser(self.config.specialisation)

    # -- scheduler calls ----------------------------------------------------------------
    def _route(self, prompt: Prompt, candidates: Sequence[int], *, request_id: str | None,
               expected_output_tokens: int, reserve: bool, now: float | None,
               prefill_weight: float | None = None) -> Decision:
        if not candidates:
            raise NoWorker("no routable candidate")
        sched = self.scheduler
        try:
            if prompt.hashes is not None:
                return sched.route_hashes(prompt.hashes, prompt.prompt_tokens,
                                          request_id=request_id,
                                          expected_output_tokens=expected_output_tokens,
                                          candidates=candidates, reserve=reserve, now=now,
                                          prefill_weight=prefill_weight)
            return sched.route(prompt.tokens, extra_key=prompt.extra_key, request_id=request_id,
                               expected_output_tokens=expected_output_tokens,
                               candidates=candidates, reserve=reserve, now=now,
                               prefill_weight=prefill_weight)
        except NoRoutableWorker as e:
            # Bad input (InvalidArgument, DuplicateRequest) is a bug here, not "no worker".
            raise NoWorker(str(e)) from None

    def route_whole(self, prompt: Prompt, request_id: str, expected_output_tokens: int,
                    candidates: Sequence[int], now: float | None = None) -> Decision:
        """A worker for the whole request (prefill + decode), reserving both."""
        return self._route(prompt, candidates, request_id=request_id,
                           expected_output_tokens=expected_output_tokens, reserve=True, now=now)

    def choose_decode(self, prompt: Prompt, candidates: Sequence[int],
                      now: float | None = None) -> Decision:
        """The decode worker: decode load plus transfer cost of the KV it lacks (no reservation).
        The prompt part a decode worker lacks is moved over the link, not computed there, so
        it is scored with the transfer weight in place of the prefill weight."""
        return self._route(prompt, candidates, request_id=None, expected_output_tokens=0,
                           reserve=False, now=now,
                           prefill_weight=self.prefill_weight * self.config.transfer_weight)

    def reserve_decode(self, worker: int, request_id: str, prompt_tokens: int,
                       expected_output_tokens: int, now: float | None = None) -> None:
        """Decode blocks of an imported request; no prefill tokens (nothing is computed)."""
        blocks = -(-(prompt_tokens + expected_output_tokens) // self.block_size)
        self.scheduler.reserve(worker, request_id, 0, blocks, now=now)

    def route_prefill(self, prompt: Prompt, request_id: str, candidates: Sequence[int],
                      now: float | None = None) -> Decision:
        """The prefill worker by kv cost over the prefill pool; reserves the prompt tokens
        and its KV blocks (held until the handover)."""
        return self._route(prompt, candidates, request_id=request_id, expected_output_tokens=0,
                           reserve=True, now=now)

    def prefill_saturated(self, candidates: Sequence[int], now: float | None = None) -> bool:
        limit = self.config.prefill_queue_max_tokens
        sched = self.scheduler
        return all(sched.load(w, now).prefill_tokens > limit for w in candidates)

    def release(self, plan: Plan) -> None:
        for rid in plan.reservations:
            self.scheduler.release(rid)
        plan.reservations.clear()

    # -- the plan -------------------------------------------------------------------------
    def choose_pool(self, prompt_tokens: int, expected_output_tokens: int,
                    pools: Mapping[str, Pool], mode: str) -> tuple[str, str]:
        """(pool name, request class) for `mode` auto | aggregated | disaggregated."""
        sp = self.specialiser
        cls = str(sp.classify(prompt_tokens, expected_output_tokens))
        if mode == "auto":
            return sp.choose(prompt_tokens, expected_output_tokens, pools), cls
        want_disagg = mode == "disaggregated"
        fitting = {n: p for n, p in pools.items()
                   if ((p.disaggregated and bool(p.prefill)) if want_disagg else bool(p.aggregated))}
        if not fitting:
            # nothing of the asked kind: aggregated falls back to decode workers (local
            # prefill), disaggregated to aggregated workers
            fitting = {n: p for n, p in pools.items() if p.usable}
        if not fitting:
            raise NoWorker("no routable aggregated or decode worker")
        return sp.choose(prompt_tokens, expected_output_tokens, fitting), cls

    def plan(self, prompt: Prompt, request_id: str, expected_output_tokens: int,
             pools: Mapping[str, Pool], mode: str = "auto", now: float | None = None) -> Plan:
        """Choose pool, path and workers; reserve the load of every stage."""
        name, cls = self.choose_pool(prompt.prompt_tokens, expected_output_tokens, pools, mode)
        pool = pools[name]
        if pool.aggregated and (not pool.disaggregated or mode == "aggregated"):
            d = self.route_whole(prompt, request_id, expected_output_tokens, pool.aggregated, now)
            return Plan(request_id, name, cls, PlanPath.AGGREGATED, d.worker,
                        overlap_blocks=d.overlap_blocks, reason="aggregated pool",
                        reservations=[request_id])
        return self.plan_disaggregated(prompt, request_id, expected_output_tokens, pool, cls,
                                       force_remote=mode == "disaggregated",
                                       force_local=mode == "aggregated", now=now)

    def plan_disaggregated(self, prompt: Prompt, request_id: str, expected_output_tokens: int,
                           pool: Pool, request_class: str = "", *, force_remote: bool = False,
                           force_local: bool = False, now: float | None = None) -> Plan:
        dec = self.choose_decode(prompt, pool.decode, now)
        uncached = max(0, prompt.prompt_tokens - dec.overlap_blocks * self.block_size)
        reason = ""
        if force_local:
            reason = "aggregated requested"
        elif not pool.prefill:
            reason = "no prefill worker"
        elif expected_output_tokens <= 1 and not force_remote:
            reason = "nothing to decode"
        elif not force_remote and uncached < self.config.local_prefill_max_tokens:
            reason = f"uncached {uncached} < local_prefill_max_tokens"
        elif not force_remote and self.prefill_saturated(pool.prefill, now):
            reason = "prefill pool saturated"
        if reason:
            d = self.route_whole(prompt, request_id, expected_output_tokens, [dec.worker], now)
            return Plan(request_id, pool.name, request_class, PlanPath.LOCAL_PREFILL, d.worker,
                        overlap_blocks=d.overlap_blocks, reason=reason,
                        reservations=[request_id])
        self.reserve_decode(dec.worker, request_id, prompt.prompt_tokens, expected_output_tokens,
                            now)
        plan = Plan(request_id, pool.name, request_class, PlanPath.DISAGGREGATED, dec.worker,
                    overlap_blocks=dec.overlap_blocks, reason="remote prefill",
                    reservations=[request_id])
        try:
            pf = self.route_prefill(prompt, plan.prefill_request_id, pool.prefill, now)
        except NoWorker:
            self.release(plan)
            raise
        plan.prefill_worker = pf.worker
        plan.prefill_overlap_blocks = pf.overlap_blocks
        plan.reservations.append(plan.prefill_request_id)
        return plan
