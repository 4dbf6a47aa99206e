"""The live planner loop: router telemetry in, actuator and router calls out, every tick.

`RouterTelemetry` reads what the router already exports: ListWorkers (per worker:
role, pool, status, reservations, reported load) and its Prometheus counters, as
differences between two reads: Route calls (`kvrouter_decisions`, `kvrouter_routed_tokens`:
per model, expected output lengths) and answered Generate calls (`kvrouter_generate_*`:
per pool, real output lengths, TTFT and ITL histograms whose p95 the planner checks
against the SLO; `kvrouter_generate_class_*`: the specialiser's short requests apart, which
the planner may size an aggregated pool for). The planned pool's prefill/decode workers and
the aggregated pool's aggregated workers are one fleet. `PlannerLoop.tick` merges the
actuator's list of launched workers with the router's (registered and up: ready;
draining: draining; launched but not registered: starting), asks the `Autoscaler` (the
code the fleet-simulator bench runs) for a decision, and carries out its actions:

* START: actuator.start(role);
* DRAIN: router DrainWorker (the router stops routing to it at once);
* STOP: actuator.stop(name), then router DeregisterWorker (the index forgets it);
* FLIP: router DeregisterWorker, then actuator.set_role(name, role).

Every call has a timeout (`action_timeout_s`) and is retried with `retry.Backoff` up to
`action_attempts` times; a call that still fails is counted and reported to the
autoscaler, which re-plans from the actuator's list at the next tick (the list, not the
planner's memory, is what runs). Telemetry that cannot be read is a gap: the tick holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvrouter._proto.v1 import router_pb2
from kvrouter.autoscale.actuators import Actuator, ActuatorError, Launched
from kvrouter.autoscale.core import Action, ActionKind, Autoscaler, Decision, Phase, PoolTelemetry, WorkerView
from kvrouter.client import AsyncRouterClient, WorkerState, to_workers
from kvrouter.planner import AGGREGATED_POOL, POOL_METADATA_KEY, RequestClass, default_pool
from kvrouter.registry import Role
from kvrouter.retry import Backoff
from kvrouter.security.channels import ClientSecurity

log = logging.getLogger("kvrouter.autoscale")

_ERRORS = (ActuatorError, TimeoutError, OSError, grpc.RpcError, httpx.HTTPError)


@dataclass(frozen=True, slots=True)
class Counters:
    """The router's cumulative counters for one model (Route) and pool (Generate)."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    ttft: tuple[tuple[float, float], ...] = ()  # Generate histogram buckets (le, count)
    itl: tuple[tuple[float, float], ...] = ()
    # Generate calls of the specialiser's short class (None: the router does not export it)
    short: tuple[float, float, float] | None = None  # requests, prompt, output tokens

    def minus(self, old: Counters) -> Counters | None:
        """The interval between two reads; None when a counter went back (a restart)."""
        short = None
        if self.short is not None:
            (n, p, o), (n0, p0, o0) = self.short, old.short or (0.0, 0.0, 0.0)
            short = (n - n0, p - p0, o - o0)
        d = Counters(self.requests - old.requests, self.prompt_tokens - old.prompt_tokens,
                     self.output_tokens - old.output_tokens,
                     _bucket_delta(self.ttft, old.ttft), _bucket_delta(self.itl, old.itl),
                     short)
        if min(d.requests, d.prompt_tokens, d.output_tokens, *(short or ())) < 0 or any(
                c < 0 for _, c in (*d.ttft, *d.itl)):
            return None
        return d


def _bucket_delta(cur: tuple[tuple[float, float], ...], old: tuple[tuple[float, float], ...],
                  ) -> tuple[tuple[float, float], ...]:
    before = dict(old)
    return tuple((le, c - before.get(le, 0.0)) for le, c in cur)


def quantile(buckets: tuple[tuple[float, float], ...], q: float) -> float | None:
    """The q-quantile of a cumulative histogram (linear inside a bucket; None: empty)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    want = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= want:
            if math.isinf(le):
                return prev_le  # beyond the last finite bucket: its bound, a lower bound
            return prev_le + (le - prev_le) * ((want - prev_c) / (c - prev_c) if c > prev_c
                                               else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def parse_counters(text: str, model: str, pool: str,
                   aggregated_pool: str = AGGREGATED_POOL) -> Counters:
    """Arrivals, token totals and Generate latency histograms of `model` (Route counters are
    per model; Generate's are per pool: `pool` and `aggregated_pool` together) from the
    router's /metrics text."""
    req = prompt = output = 0.0
    ttft: dict[float, float] = {}
    itl: dict[float, float] = {}
    short: list[float] | None = None
    pools = (pool, aggregated_pool)
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("kvrouter_generate_class_") and short is None:
            short = [0.0, 0.0, 0.0]  # exported (empty until a Generate call is answered)
        for s in fam.samples:
            lab = s.labels
            if lab.get("model") != model:
                continue
            if fam.name == "kvrouter_decisions" and s.name.endswith("_total") \
                    and lab.get("outcome") == "routed":
                req += s.value
            elif fam.name == "kvrouter_routed_tokens" and s.name.endswith("_total"):
                if lab.get("kind") == "prompt":
                    prompt += s.value
                elif lab.get("kind") == "expected_output":
                    output += s.value
            elif lab.get("pool") not in pools:
                continue
            elif fam.name.startswith("kvrouter_generate_class_") and s.name.endswith("_total"):
                if short is None or lab.get("class") != RequestClass.SHORT.value:
                    continue
                if fam.name == "kvrouter_generate_class_requests":
                    short[0] += s.value
                elif lab.get("kind") in ("prompt", "output"):
                    short[1 if lab["kind"] == "prompt" else 2] += s.value
            elif fam.name == "kvrouter_generate_requests" and s.name.endswith("_total"):
                req += s.value
            elif fam.name == "kvrouter_generate_tokens" and s.name.endswith("_total"):
                if lab.get("kind") == "prompt":
                    prompt += s.value
                elif lab.get("kind") == "output":
                    output += s.value
            elif s.name.endswith("_bucket") and fam.name in ("kvrouter_generate_ttft_seconds",
                                                             "kvrouter_generate_itl_seconds"):
                into = ttft if fam.name == "kvrouter_generate_ttft_seconds" else itl
                le = float(lab["le"])
                into[le] = into.get(le, 0.0) + s.value
    return Counters(req, prompt, output, tuple(sorted(ttft.items())), tuple(sorted(itl.items())),
                    None if short is None else (short[0], short[1], short[2]))


def in_pool(w: WorkerState, pool: str, aggregated_pool: str | None = None) -> bool:
    """A prefill/decode worker of `pool`, or an aggregated worker of `aggregated_pool`."""
    try:
        role = Role(w.role)
    except ValueError:
        return False
    name = w.metadata.get(POOL_METADATA_KEY) or default_pool(role)
    if role is Role.AGGREGATED and aggregated_pool is not None:
        return name == aggregated_pool
    return name == pool


def decode_kv_usage(resp: router_pb2.ListWorkersResponse, pool: Mapping[str, WorkerState],
                    ) -> tuple[float | None, int]:
    """(KV usage, workers it covers) of the pool's serving decode workers, from the load
    reports ListWorkers relays: blocks used / (used + free) summed over the workers that
    report a cache (the share kvrouter.admission.kv_usage takes per worker); (None, 0)
    when none does."""
    used = total = n = 0
    for w in resp.workers:
        mine = pool.get(w.name)
        if mine is None or mine.role != Role.DECODE.value or mine.status != "up":
            continue
        rep = w.load.reported
        if rep.kv_used_blocks + rep.kv_free_blocks > 0:
            used += rep.kv_used_blocks
            total += rep.kv_used_blocks + rep.kv_free_blocks
            n += 1
    return (used / total, n) if total > 0 else (None, 0)


class RouterTelemetry:
    """One model's pool, read from a running router (gRPC ListWorkers + /metrics).

    `security`: the TLS trust used for an https /metrics URL (the router serves /metrics
    over TLS when it has a certificate); the gRPC client carries its own (the same
    KVROUTER_TLS_* / KVROUTER_TOKEN* settings in `kvrouter planner`). /metrics takes no
    token, so none is sent to it."""

    def __init__(self, client: AsyncRouterClient, metrics_url: str, model: str,
                 pool: str, *, security: ClientSecurity | None = None,
                 aggregated_pool: str = AGGREGATED_POOL) -> None:
        self.client, self.metrics_url, self.model, self.pool = client, metrics_url, model, pool
        self.aggregated_pool = aggregated_pool
        tls = security.tls if security is not None else None
        # httpx's `verify`: the CA (and this process's certificate, for mutual TLS) of the
        # kvrouter TLS settings; system roots when there are none.
        self._verify: Any = tls.client_ssl_context() if tls is not None else True
        self._prev: tuple[float, Counters] | None = None
        self.workers: dict[str, WorkerState] = {}  # the pool's workers at the last read

    async def _counters(self) -> Counters:
        async with httpx.AsyncClient(timeout=5.0, verify=self._verify) as http:
            resp = await http.get(self.metrics_url)
            resp.raise_for_status()
            return parse_counters(resp.text, self.model, self.pool, self.aggregated_pool)

    async def read(self, now: float) -> PoolTelemetry | None:
        """The last interval's telemetry; None on the first read (nothing to difference)
        or after a counter reset (the router restarted)."""
        resp = await self.client.list_workers_pb(self.model)
        self.workers = {w.name: w for w in to_workers(resp)
                        if in_pool(w, self.pool, self.aggregated_pool)}
        kv_usage, kv_workers = decode_kv_usage(resp, self.workers)
        cur = await self._counters()
        prev, self._prev = self._prev, (now, cur)
        if prev is None or now <= prev[0]:
            return None
        d = cur.minus(prev[1])
        if d is None:
            log.warning("router counters went back (restart?): skipping one interval",
                        extra={"model": self.model})
            return None
        n = int(d.requests)
        prefill = [w for w in self.workers.values() if w.role == Role.PREFILL.value]
        k = min(n, int(d.short[0])) if d.short is not None else None
        return PoolTelemetry(
            self.model, self.pool, now, now - prev[0], n,
            d.prompt_tokens / n if n else 0.0, d.output_tokens / n if n else 0.0,
            ttft_p95_s=quantile(d.ttft, 0.95), itl_p95_s=quantile(d.itl, 0.95),
            queue=sum(w.reported_queued for w in self.workers.values()),
            queued_prefill_tokens=sum(max(0, w.prefill_tokens) for w in prefill),
            kv_usage=kv_usage, kv_workers=kv_workers, short_arrivals=k,
            short_prompt_tokens=d.short[1] / k if d.short is not None and k else 0.0,
            short_output_tokens=d.short[2] / k if d.short is not None and k else 0.0)


def merge_views(launched: list[Launched], registered: Mapping[str, WorkerState],
                now: float) -> list[WorkerView]:
    """The planner's view: the actuator's workers, phased by what the router says."""
    out = []
    for w in launched:
        r = registered.get(w.name)
        if r is None or r.status not in ("up", "draining"):
            out.append(WorkerView(w.name, w.role, Phase.STARTING, w.started_at))
        elif r.status == "draining":
            out.append(WorkerView(w.name, w.role, Phase.DRAINING, w.started_at,
                                  r.reserved_requests))
        else:
            out.append(WorkerView(w.name, w.role, Phase.READY, w.started_at,
                                  r.reserved_requests))
    return out


class PlannerLoop:
    def __init__(self, autoscaler: Autoscaler, telemetry: RouterTelemetry, actuator: Actuator,
                 router: AsyncRouterClient, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.autoscaler, self.telemetry, self.actuator = autoscaler, telemetry, actuator
        self.router, self.clock = router, clock
        self.cfg = autoscaler.cfg

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> tuple[bool, Any]:
        """fn() with a timeout, retried with backoff; (ok, result)."""
        backoff = Backoff(0.2, 2.0)
        for attempt in range(1, self.cfg.action_attempts + 1):
            try:
                return True, await asyncio.wait_for(fn(), self.cfg.action_timeout_s)
            except _ERRORS as e:
                err = "timed out" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                log.warning("autoscale call failed", extra={
                    "call": what, "attempt": attempt, "error": err})
                if attempt < self.cfg.action_attempts:
                    await backoff.wait()
        return False, None

    async def _deregister(self, name: str) -> None:
        try:
            await self.router.deregister_worker(self.autoscaler.model, name)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # already gone is what we want
                raise

    async def apply(self, a: Action) -> bool:
        model, name = self.autoscaler.model, a.worker or ""
        if a.kind is ActionKind.START:
            ok, _ = await self._call(f"start {a.role}", lambda: self.actuator.start(a.role))
        elif a.kind is ActionKind.DRAIN:
            ok, _ = await self._call(f"drain {name}",
                                     lambda: self.router.drain_worker(model, name))
        elif a.kind is ActionKind.STOP:
            ok, _ = await self._call(f"stop {name}", lambda: self.actuator.stop(name))
            if ok:
                ok, _ = await self._call(f"deregister {name}", lambda: self._deregister(name))
        else:
            assert a.to_role is not None
            to = a.to_role
            ok, _ = await self._call(f"deregister {name}", lambda: self._deregister(name))
            if ok:
                ok, _ = await self._call(f"set_role {name} {to}",
                                         lambda: self.actuator.set_role(name, to))
        self.autoscaler.action_done(a, ok)
        return ok

    async def tick(self) -> Decision:
        now = self.clock()
        sample: PoolTelemetry | None
        try:
            sample = await asyncio.wait_for(self.telemetry.read(now), self.cfg.action_timeout_s)
        except _ERRORS as e:
            log.warning("telemetry unavailable", extra={"error": f"{type(e).__name__}: {e}"})
            sample = None
        ok, launched = await self._call("list workers", self.actuator.workers)
        if not ok:  # without the fleet nothing can be planned safely
            return self.autoscaler.hold(now, "actuator cannot list its workers")
        decision = self.autoscaler.plan(now, sample,
                                        merge_views(launched, self.telemetry.workers, now))
        for a in decision.actions:
            await self.apply(a)
        return decision

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop` is set."""
        while not stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.interval_s)
            except TimeoutError:
                pass
