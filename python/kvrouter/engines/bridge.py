"""Bridge from a vLLM / SGLang engine's ZMQ KV-event stream into kvrouter's event plane.

An existing vLLM or SGLang server keeps running unchanged; this bridge runs
beside it as a sidecar (docs/design.md §4) and makes it a routing target:

    engine PUB --ZMQ--> bridge --EventPublisher--> Redis stream --> every router

* Decoding is kvrouter.engines.vllm.wire (VllmDecoder / SglangDecoder): one
  decoder, no second parser here.
* Order: engine batches carry a per-process sequence number (SeqTracker). A gap
  is repaired through the engine's replay socket (a DEALER asking the ROUTER for
  every buffered batch from the first missing one; replies end at seq -1). A gap
  the replay buffer no longer covers cannot be repaired: the bridge forgets the
  engine's blocks (a new epoch starting with AllCleared) rather than keep blocks
  whose removal it may have missed. The router then under-claims until the
  engine stores blocks again; it never claims a hit the engine cannot serve.
* Restart: seq back to 0 means a new engine process with an empty cache: a new
  publisher epoch, starting empty.
* Full dumps: routers that lost track of this worker ask for its whole block
  set; the bridge answers from a BlockMirror (kvrouter.engines.block_mirror), its
  own copy of the blocks the engine holds, kept from the events it has applied.
* Load: the engine's Prometheus endpoint is scraped periodically
  (kvrouter.engines.vllm.metrics_scrape) and sent as load reports.
* Engine liveness: the bridge's heartbeats must speak for the engine, not for
  itself. With an HTTP address (--http-url, or the base of --metrics-url) the
  bridge probes the engine's /health; once it has failed for longer than the
  heartbeat TTL the bridge tells routers the worker is leaving (they drop it and
  its blocks) and stops heartbeating. When /health answers again the worker
  rejoins with a new epoch holding only what the engine stored since.
  Heartbeats start only after the first successful probe.
* Proxy mode: the heartbeat metadata says how the router reaches the engine
  (backend=openai, served_model; the address is the engine's HTTP URL), the keys
  kvrouter.backends.dispatch reads, plus any --meta KEY=VALUE.
* Block size: the engine's block size is published in the heartbeat; routers
  mark the worker MISMATCH when their model's block size does not divide it.
  When the bridge is told the router's block size it refuses to start on an
  incompatible configuration, and it flags (log line, metric, heartbeat
  metadata) events whose block size differs from what it was told.

The bridge owns its publisher's lifecycle and runs everything on one event loop,
so a dump taken by the publisher always matches the events published before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge
from pydantic import Field, model_validator

from kvrouter.config import ConfigError, LayeredSettings
from kvrouter.counters import Counters
from kvrouter.engines.block_mirror import BlockMirror
from kvrouter.engines.sglang.wire import SglangDecoder
from kvrouter.engines.vllm.metrics_scrape import BridgedEngine, ScrapeError, scrape_to_load_report
from kvrouter.engines.vllm.wire import (
    DecodedBatch,
    ReplayItem,
    SeqStatus,
    SeqTracker,
    VllmDecoder,
    WireError,
    decode_seq,
    parse_replay_reply,
    replay_request,
)
from kvrouter.events.model import BlockStored, LoadReport
from kvrouter.events.publisher import EventPublisher
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.protocol import BACKEND_METADATA_KEY, SERVED_MODEL_METADATA_KEY, check_block_size

log = logging.getLogger("kvrouter.engines.bridge")

ENGINES: tuple[str, ...] = tuple(e.value for e in BridgedEngine)

BATCHES = Counter("kvrouter_bridge_batches_total",
                  "Engine event batches seen by the bridge, by outcome", ["worker", "outcome"])
# outcome: applied | replayed | duplicate | malformed
GAPS = Counter("kvrouter_bridge_gaps_total",
               "Engine sequence gaps, by how they ended", ["worker", "repair"])  # replay | lost
RESTARTS = Counter("kvrouter_bridge_engine_restarts_total",
                   "Engine restarts seen (sequence back to 0): each starts a new epoch", ["worker"])
DROPPED = Counter("kvrouter_bridge_dropped_events_total",
                  "Engine events not forwarded, by reason", ["worker", "reason"])
MISMATCH = Gauge("kvrouter_bridge_block_size_mismatch",
                 "1 while the engine's block size is incompatible with the router's "
                 "(or differs from --block-size)", ["worker"])
ENGINE_UP = Gauge("kvrouter_bridge_engine_up",
                  "1 while the engine's health check passes (the worker is announced), 0 while "
                  "it has failed for longer than the heartbeat TTL", ["worker"])
ENGINE_DOWNS = Counter("kvrouter_bridge_engine_down_total",
                       "Times the engine was declared down and the worker left routing",
                       ["worker"])
SCRAPE_ERRORS = Counter("kvrouter_bridge_scrape_errors_total",
                        "Failed scrapes of the engine's Prometheus endpoint", ["worker"])
MIRROR_BLOCKS = Gauge("kvrouter_bridge_mirror_blocks",
                      "Blocks the bridge believes the engine holds", ["worker"])


class BridgeConfigError(ConfigError):
    """A bridge configuration that cannot work (the message says why)."""


# --------------------------------------------------------------------------- config


class BridgeConfig(LayeredSettings):
    """The bridge's options, validated like every option type (kvrouter.config); `validate`
    adds the checks that span several options."""

    engine: str = Field(description='"vllm" or "sglang"')
    zmq_endpoint: str
    zmq_bind: bool = Field(
        default=False,
        description="bind the SUB socket (the engine's endpoint is a plain host, so the "
                    "engine connects)")
    replay_endpoint: str | None = None
    topic: str = Field(default="", description='subscription prefix ("" = every topic)')
    dp_rank: int = Field(default=0, ge=0,
                         description="SGLang attention-DP rank of this publisher (its endpoint "
                                     "is port + rank)")
    group_idx: int | None = Field(
        default=None, description="vLLM KV cache group to index (default: the first "
                                  "full-attention group)")
    block_size: int | None = Field(
        default=None, gt=0,
        description="the engine's block size (vLLM --block-size, SGLang --page-size); None: "
                    "learnt from the first stored event")
    router_block_size: int | None = Field(
        default=None, gt=0,
        description="the router model's block size, when known: an incompatible engine is "
                    "refused")
    metrics_url: str | None = None
    metrics_interval_s: float = Field(default=1.0, gt=0)
    metrics_labels: dict[str, str] = Field(default_factory=dict)
    total_blocks: int | None = Field(
        default=None, description="KV capacity in blocks when /metrics does not say (SGLang "
                                  "without max tokens)")
    replay_timeout_s: float = Field(default=2.0, gt=0)
    max_mirror_blocks: int = Field(default=1 << 21, gt=0)
    http_url: str | None = Field(
        default=None, description="the engine's HTTP server (OpenAI API, /health), e.g. "
                                  "http://10.0.0.5:8000; default: scheme://host:port of "
                                  "metrics_url")
    served_model: str | None = Field(
        default=None, description="the model's name on the engine's OpenAI API; default: the "
                                  "router's model name")
    meta: dict[str, str] = Field(
        default_factory=dict, description="extra heartbeat metadata (e.g. pool=...); may "
                                          "override backend and served_model")
    health_check: bool = Field(
        default=True, description="probe the engine's health (needs health_url or an HTTP URL "
                                  "to derive it from)")
    health_url: str | None = Field(default=None, description="default: http_url + /health")
    health_interval_s: float = Field(default=1.0, gt=0)
    engine_down_after_s: float | None = Field(
        default=None, gt=0,
        description="how long the health check must fail before the worker leaves routing; "
                    "default: the publisher's heartbeat TTL")

    @model_validator(mode="before")
    @classmethod
    def _derive_urls(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        http = data.get("http_url")
        if http is None and data.get("metrics_url"):
            http = base_url(data["metrics_url"])
        if http:
            data["http_url"] = http = http.rstrip("/")
        if data.get("health_url") is None and http:
            data["health_url"] = f"{http}/health"
        return data

    @property
    def health_enabled(self) -> bool:
        return self.health_check and bool(self.health_url)

    def validate(self) -> None:  # type: ignore[override]  # BaseModel.validate is deprecated
        """The checks that span options (each option is valid on its own already)."""
        if self.engine not in ENGINES:
            raise BridgeConfigError(f"engine must be one of {', '.join(ENGINES)}, "
                                    f"got {self.engine!r}")
        for name, ep in (("--zmq", self.zmq_endpoint), ("--replay", self.replay_endpoint)):
            if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise BridgeConfigError(f"{name} endpoint {ep!r} must start with tcp://, "
                                        "ipc:// or inproc://")
        if self.block_size is not None and self.router_block_size is not None:
            why = check_block_size(self.block_size, self.router_block_size)
            if why is not None:
                raise BridgeConfigError(f"engine and router block sizes are incompatible: {why}")
        for name, url in (("--http-url", self.http_url), ("--health-url", self.health_url),
                          ("--metrics-url", self.metrics_url)):
            if url and not url.startswith(("http://", "https://")):
                raise BridgeConfigError(f"{name} {url!r} must start with http:// or https://")
        reserved = sorted(set(self.meta) & RESERVED_META)
        if reserved:
            raise BridgeConfigError(f"--meta cannot set {', '.join(reserved)}: the bridge "
                                    "publishes these itself")


RESERVED_META = frozenset({"engine", "zmq", "bridge", "engine_block_size", "router_block_size",
                           "mismatch", "block_size", "http_url"})
"""Heartbeat metadata keys the bridge owns (--meta may not set them)."""


def base_url(url: str) -> str:
    """scheme://host[:port] of an http(s) URL (the engine's HTTP server from its /metrics URL)."""
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise BridgeConfigError(f"{url!r} is not an http(s) URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise BridgeConfigError(f"{url!r} is not an http(s) URL")
    return f"{parts.scheme}://{parts.netloc.decode('ascii')}"


# --------------------------------------------------------------------------- bridge


@dataclass
class BridgeStats(Counters):
    batches: int = 0
    replayed: int = 0
    duplicates: int = 0
    malformed: int = 0
    gaps_repaired: int = 0
    gaps_lost: int = 0
    restarts: int = 0
    epochs: int = 0
    events: int = 0
    scrapes: int = 0
    scrape_errors: int = 0
    engine_downs: int = 0


class EngineBridge:
    """One engine publisher (one routing target) -> one kvrouter worker.

    `run()` starts the publisher, subscribes, and forwards until `stop()`.
    """

    def __init__(self, config: BridgeConfig, publisher: EventPublisher) -> None:
        config.validate()
        self.config = config
        self.publisher = publisher
        self.worker = publisher.worker
        self.mirror = BlockMirror(config.max_mirror_blocks)
        self.decoder: VllmDecoder = (SglangDecoder(config.dp_rank) if config.engine == "sglang"
                                     else VllmDecoder(group_idx=config.group_idx))
        self.tracker = SeqTracker()
        self.stats = BridgeStats()
        self.engine_block_size: int | None = config.block_size
        self.mismatch: str | None = None
        self.engine_up: bool | None = None
        """Health as last decided: None before the first probe (or without checks)."""
        self.down_after_s = config.engine_down_after_s or publisher.heartbeat_ttl_s
        self._stop = asyncio.Event()
        self._ctx = zmq.asyncio.Context.instance()
        self._sub: zmq.asyncio.Socket | None = None
        # The engine's /health and /metrics: one pooled client, opened by run().
        self._http: httpx.AsyncClient | None = None
        self._publisher_key = config.zmq_endpoint
        publisher.dump = self.mirror.dump
        if config.block_size is not None:
            publisher.block_size = config.block_size
        if not publisher.address and config.http_url:
            publisher.address = config.http_url  # where the router's proxy sends requests
        publisher.extra_meta.update(self._meta())
        MISMATCH.labels(self.worker).set(0)

    def _meta(self) -> dict[str, str]:
        # the keys kvrouter.backends.dispatch picks the router's proxy backend by
        meta = {BACKEND_METADATA_KEY: "openai",
                SERVED_MODEL_METADATA_KEY: self.config.served_model or self.publisher.model,
                **self.config.meta,
                "engine": self.config.engine, "zmq": self.config.zmq_endpoint,
                "bridge": "kvrouter"}
        if self.config.http_url:
            meta["http_url"] = self.config.http_url
        if self.engine_block_size is not None:
            meta["engine_block_size"] = str(self.engine_block_size)
        if self.config.router_block_size is not None:
            meta["router_block_size"] = str(self.config.router_block_size)
        if self.mismatch:
            meta["mismatch"] = self.mismatch
        return meta

    # lifecycle ----------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: gaps cost a replay
        sub.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode())
        try:
            if self.config.zmq_bind:
                sub.bind(self.config.zmq_endpoint)
            else:
                sub.connect(self.config.zmq_endpoint)
        except zmq.ZMQError as exc:
            sub.close(0)
            raise BridgeConfigError(f"cannot {'bind' if self.config.zmq_bind else 'connect'} "
                                    f"{self.config.zmq_endpoint}: {exc}") from exc
        self._sub = sub
        if self.config.health_enabled:
            # Not announced until the engine is seen healthy: no routing to an engine
            # that is still loading (or was never there).
            self.publisher.suspend()
            ENGINE_UP.labels(self.worker).set(0)
        await self.publisher.start()
        log.info("bridge started: worker=%s engine=%s zmq=%s mode=%s replay=%s", self.worker,
                 self.config.engine, self.config.zmq_endpoint,
                 "bind" if self.config.zmq_bind else "connect", self.config.replay_endpoint)
        tasks = [asyncio.create_task(self._sub_loop(sub), name=f"bridge-sub-{self.worker}")]
        if self.config.metrics_url:
            tasks.append(asyncio.create_task(self._scrape_loop(),
                                             name=f"bridge-scrape-{self.worker}"))
        if self.config.health_enabled:
            tasks.append(asyncio.create_task(self._health_loop(),
                                             name=f"bridge-health-{self.worker}"))
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop_wait and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            await cancel_and_wait([*tasks, stop_wait])
            sub.close(0)
            self._sub = None
            if self._http is not None:
                await self._http.aclose()
                self._http = None
            await self.publisher.stop()
            log.info("bridge stopped: worker=%s stats=%s", self.worker, self.stats.as_dict())

    # live stream --------------------------------------------------------------------
    async def _sub_loop(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            await self.handle_message(frames)

    async def handle_message(self, frames: Sequence[bytes]) -> None:
        """One PUB message [topic, seq, payload]: order, repair, apply."""
        if len(frames) != 3:
            self._malformed(f"message has {len(frames)} frames (expected 3)")
            return
        try:
            seq = decode_seq(bytes(frames[1]))
        except WireError as exc:
            self._malformed(str(exc))
            return
        key = self._publisher_key
        obs = self.tracker.observe(key, seq)
        if obs.status is SeqStatus.DUPLICATE:
            self.stats.duplicates += 1
            BATCHES.labels(self.worker, "duplicate").inc()
            return
        if obs.status is SeqStatus.RESTART:
            self._restart(seq)
        if obs.first_missing is not None:
            late_join = obs.status is not SeqStatus.GAP
            await self._repair(obs.first_missing, seq, late_join)
            last = self.tracker.last(key)
            if last is not None and last >= seq:
                return  # the replay delivered this batch already
            self.tracker.resync(key, seq)
        self._apply_frames(frames, seq)

    def _apply_frames(self, frames: Sequence[bytes], seq: int) -> None:
        try:
            batch = self.decoder.decode_message(frames)
        except WireError as exc:
            # The sequence is consumed: the batch is lost either way. Its effect is
            # unknown, so the mirror can no longer be trusted: start over.
            self._malformed(str(exc))
            self._lose(f"malformed batch seq={seq}")
            return
        self._apply(batch, "applied")

    def _apply(self, batch: DecodedBatch, outcome: str) -> None:
        self.stats.batches += 1
        BATCHES.labels(self.worker, outcome).inc()
        for reason, n in batch.dropped.items():
            DROPPED.labels(self.worker, reason).inc(n)
        if not batch.events:
            return
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._check_event_block_size(ev.block_size)
        self.mirror.apply(batch.events)
        self.publisher.publish(batch.events)
        self.stats.events += len(batch.events)
        MIRROR_BLOCKS.labels(self.worker).set(len(self.mirror))

    def _malformed(self, why: str) -> None:
        self.stats.malformed += 1
        BATCHES.labels(self.worker, "malformed").inc()
        if self.stats.malformed == 1 or log.isEnabledFor(logging.DEBUG):
            log.warning("malformed engine message dropped: worker=%s error=%r (further ones are "
                        "counted in kvrouter_bridge_batches_total)", self.worker, why)

    # sequence repair ---------------------------------------------------------------
    async def _repair(self, first_missing: int, seq: int, late_join: bool) -> None:
        """Apply batches first_missing.. from the replay socket, in order, stopping at a hole."""
        key = self._publisher_key
        items = await self._replay(first_missing) if self.config.replay_endpoint else None
        expected = first_missing
        applied = 0
        if items:
            if late_join and items[0].seq > first_missing:
                expected = items[0].seq  # joined late; the buffer starts later: take what it has
            for item in items:
                if item.seq < expected:
                    continue
                if item.seq > expected:
                    break
                try:
                    batch = self.decoder.decode_replay(item)
                except WireError as exc:
                    self._malformed(str(exc))
                    break
                self.tracker.resync(key, item.seq)
                self._apply(batch, "replayed")
                self.stats.replayed += 1
                applied += 1
                expected += 1
        if expected >= seq:
            if not late_join:
                self.stats.gaps_repaired += 1
                GAPS.labels(self.worker, "replay").inc()
                log.debug("gap repaired by replay: worker=%s seqs=%d..%d", self.worker,
                          first_missing, seq - 1)
            return
        if late_join and applied == 0 and len(self.mirror) == 0:
            # Nothing known yet and nothing recoverable: start from here. The blocks the
            # engine cached before are unknown (never claimed) until it stores them again.
            log.warning("bridge joined the engine's stream mid-way, history not replayable: "
                        "worker=%s first_seq=%d replay=%s", self.worker, seq,
                        self.config.replay_endpoint or "none")
            return
        self.stats.gaps_lost += 1
        GAPS.labels(self.worker, "lost").inc()
        how = ("the replay buffer no longer has them" if self.config.replay_endpoint
               else "no --replay endpoint to ask")
        self._lose(f"batches {expected}..{seq - 1} lost ({how})")

    async def _replay(self, start: int) -> list[ReplayItem] | None:
        """Every buffered batch >= start from the engine's replay ROUTER (None on failure)."""
        assert self.config.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        items: list[ReplayItem] = []
        try:
            sock.connect(self.config.replay_endpoint)
            await sock.send_multipart(replay_request(start))
            while True:
                if not await sock.poll(int(self.config.replay_timeout_s * 1000)):
                    log.warning("replay timed out: worker=%s endpoint=%s start=%d received=%d",
                                self.worker, self.config.replay_endpoint, start, len(items))
                    return items or None
                frames = await sock.recv_multipart()
                item = parse_replay_reply(frames)
                if item is None:
                    return items
                items.append(item)
        except (zmq.ZMQError, WireError) as exc:
            log.warning("replay failed: worker=%s endpoint=%s error=%s", self.worker,
                        self.config.replay_endpoint, exc)
            return items or None
        finally:
            sock.close(0)

    def _lose(self, why: str) -> None:
        """The engine's block set is no longer known: forget it (new epoch, empty)."""
        log.warning("engine events lost, worker restarts empty: worker=%s reason=%s",
                    self.worker, why)
        self.mirror.clear()
        self._new_epoch("events lost")

    def _restart(self, seq: int) -> None:
        self.stats.restarts += 1
        RESTARTS.labels(self.worker).inc()
        log.info("engine restarted (sequence back to %d): worker=%s, new epoch", seq, self.worker)
        self.mirror.clear()
        self._new_epoch("engine restart")

    def _new_epoch(self, reason: str) -> None:
        self.stats.epochs += 1
        MIRROR_BLOCKS.labels(self.worker).set(len(self.mirror))
        self.publisher.request_resync(reason)

    # engine health -------------------------------------------------------------------
    async def _health_loop(self) -> None:
        assert self.config.health_url is not None
        url = self.config.health_url
        timeout = max(0.5, min(5.0, self.down_after_s / 2))
        failing_since: float | None = None
        while True:
            why = await self._probe(url, timeout)
            now = time.monotonic()
            if why is None:
                failing_since = None
                if self.engine_up is not True:
                    await self.engine_healthy()
            else:
                if failing_since is None:
                    failing_since = now
                    log.debug("engine health check failed: worker=%s url=%s error=%s",
                              self.worker, url, why)
                if self.engine_up is not False and now - failing_since > self.down_after_s:
                    self.engine_unhealthy(f"{why} (failing for {now - failing_since:.1f}s)")
            await asyncio.sleep(self.config.health_interval_s)

    def engine_unhealthy(self, why: str) -> None:
        """The engine is down: leave routing, forget its blocks (a process that comes
        back has lost them; one that only hung replays what it still has)."""
        first = self.engine_up is None
        self.engine_up = False
        ENGINE_UP.labels(self.worker).set(0)
        if first:
            log.warning("engine not healthy, worker not announced yet: worker=%s url=%s error=%s",
                        self.worker, self.config.health_url, why)
            return
        self.stats.engine_downs += 1
        ENGINE_DOWNS.labels(self.worker).inc()
        log.warning("engine down, worker leaves routing: worker=%s url=%s error=%s",
                    self.worker, self.config.health_url, why)
        self.mirror.clear()
        self.tracker.forget(self._publisher_key)
        MIRROR_BLOCKS.labels(self.worker).set(0)
        self.publisher.suspend()

    async def engine_healthy(self) -> None:
        """The engine answers (again): announce the worker; after a down period, first
        write a new epoch holding only what the engine stored since it came back."""
        back = self.engine_up is False and self.stats.engine_downs > 0
        self.engine_up = True
        ENGINE_UP.labels(self.worker).set(1)
        if back:
            log.info("engine healthy again, worker rejoins with a new epoch: worker=%s",
                     self.worker)
            self._new_epoch("engine back")
            # Routers hear from this worker again only once the new epoch is written, so
            # they never rebuild it from the old epoch's entries in the stream.
            await self.publisher.flush(self.down_after_s)
        else:
            log.debug("engine healthy: worker=%s", self.worker)
        self.publisher.resume()

    # block size --------------------------------------------------------------------
    def _check_event_block_size(self, bs: int) -> None:
        if self.engine_block_size == bs and self.mismatch is None:
            return
        if self.engine_block_size is None:
            self.engine_block_size = bs
            self.publisher.block_size = bs
            log.debug("engine block size learnt: worker=%s block_size=%d", self.worker, bs)
        why: str | None = None
        if bs != self.engine_block_size:
            why = (f"engine events have block size {bs} but --block-size is "
                   f"{self.engine_block_size}")
            # The events are the truth: publish what the engine really uses so routers
            # compare the right number.
            self.engine_block_size = bs
            self.publisher.block_size = bs
        if why is None and self.config.router_block_size is not None:
            why = check_block_size(bs, self.config.router_block_size)
        if why is not None and why != self.mismatch:
            log.error("block size mismatch: worker=%s %s; routers will mark this worker "
                      "mismatched instead of matching its blocks", self.worker, why)
        self.mismatch = why
        MISMATCH.labels(self.worker).set(1 if why else 0)
        self.publisher.extra_meta.pop("mismatch", None)
        self.publisher.extra_meta.update(self._meta())

    # engine HTTP ----------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:  # opened on first use, closed when run() ends
            self._http = httpx.AsyncClient(follow_redirects=True)
        return self._http

    async def _probe(self, url: str, timeout: float) -> str | None:
        """None when GET url answers 200, else why not."""
        try:
            resp = await self._client().get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            return str(exc) or type(exc).__name__
        return None if resp.status_code == 200 else f"HTTP {resp.status_code}"

    async def _get_text(self, url: str, timeout: float) -> str:
        resp = await self._client().get(url, timeout=timeout)
        resp.raise_for_status()
        return resp.text

    # load ------------------------------------------------------------------------
    def _in_router_blocks(self, report: LoadReport) -> LoadReport:
        """Block counts in the router's blocks (the unit of its index and reservations:
        the cache-pressure term compares the capacity with indexed blocks); unchanged when
        the router's block size is not known or does not divide the engine's."""
        ebs, rbs = self.engine_block_size, self.config.router_block_size
        if not ebs or not rbs or ebs % rbs or ebs == rbs:
            return report
        k = ebs // rbs
        return dataclasses.replace(
            report, kv_used_blocks=report.kv_used_blocks * k,
            kv_free_blocks=report.kv_free_blocks * k,
            kv_capacity_blocks=report.kv_capacity_blocks * k,
            kv_cached_blocks=report.kv_cached_blocks * k)

    async def _scrape_loop(self) -> None:
        assert self.config.metrics_url is not None
        failing = False
        while True:
            try:
                text = await self._get_text(self.config.metrics_url,
                                            min(5.0, self.config.metrics_interval_s * 2))
                report = scrape_to_load_report(
                    text, self.config.engine, self.config.metrics_labels,
                    total_blocks=self.config.total_blocks, block_size=self.engine_block_size)
                self.publisher.report_load(self._in_router_blocks(report))
                self.stats.scrapes += 1
                if failing:
                    log.info("engine metrics scrape recovered: worker=%s", self.worker)
                    failing = False
            except (httpx.HTTPError, ScrapeError, ValueError) as exc:
                self.stats.scrape_errors += 1
                SCRAPE_ERRORS.labels(self.worker).inc()
                if not failing:
                    log.warning("engine metrics scrape failed: worker=%s url=%s error=%s",
                                self.worker, self.config.metrics_url, exc)
                    failing = True
            await asyncio.sleep(self.config.metrics_interval_s)


def parse_labels(specs: Sequence[str]) -> dict[str, str]:
    """["k=v", ...] -> {k: v} (BridgeConfigError on a spec without '=')."""
    out: dict[str, str] = {}
    for spec in specs:
        k, sep, v = spec.partition("=")
        if not sep or not k:
            raise BridgeConfigError(f"{spec!r} is not KEY=VALUE")
        out[k] = v
    return out


def describe(bridge: EngineBridge) -> Mapping[str, Any]:
    """Status of a bridge for logs and tests."""
    return {"worker": bridge.worker, "engine_block_size": bridge.engine_block_size,
            "mismatch": bridge.mismatch, "mirror_blocks": len(bridge.mirror),
            "epoch": bridge.publisher.epoch, "stats": bridge.stats.as_dict(),
            "t": time.time()}
