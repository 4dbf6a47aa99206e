"""Prometheus metrics of the event plane (ingest, liveness, snapshots, publisher).

Kept apart from the service's kvrouter/metrics.py. Everything here lives in
prometheus_client's default registry (what a process that only publishes exports)
and is listed in `ALL`, which the router's own registry (kvrouter.metrics.RouterMetrics)
registers too, so the router's /metrics serves it. The objects are process-wide: two
routers in one process (tests) export the same, summed, values.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.registry import Collector

EVENTS_APPLIED = Counter(
    "kvrouter_events_applied_total", "Stream entries (event batches) applied to the index", ["model"]
)
BLOCKS = Counter(
    "kvrouter_events_blocks_total",
    "Blocks changed by applied events, by operation",
    ["op"],  # stored | duplicate | removed | unknown_removal | cleared
)
ORPHANS = Counter(
    "kvrouter_events_orphans_total", "Stored events whose parent block the index did not know"
)
MALFORMED = Counter(
    "kvrouter_events_malformed_total",
    "Stream entries skipped as malformed",
    ["reason"],  # envelope | payload | oversize
)
DUPLICATES = Counter(
    "kvrouter_events_duplicate_entries_total", "Entries skipped because their seq was already applied"
)
GAPS = Counter(
    "kvrouter_event_gaps_total", "Per-worker sequence gaps, by how they were repaired", ["repair"]
)
EPOCH_RESETS = Counter(
    "kvrouter_event_epoch_resets_total", "Workers cleared because a new epoch started"
)
DUMPS_REQUESTED = Counter("kvrouter_event_dumps_requested_total", "Full-dump requests sent to workers")
INGEST_LAG = Histogram(
    "kvrouter_ingest_lag_seconds",
    "Publish-to-index lag of applied entries (publisher clock to router clock)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
APPLY_SECONDS = Histogram(
    "kvrouter_ingest_apply_seconds",
    "Time of one batched apply call into the index",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
WORKERS_LAPSED = Counter("kvrouter_workers_lapsed_total", "Workers removed after their heartbeat lapsed")
WORKERS_LIVE = Gauge("kvrouter_workers_live", "Workers with a live heartbeat or recent events", ["model"])
REDIS_ERRORS = Counter(
    "kvrouter_events_redis_errors_total", "Redis errors seen by the event plane, by component", ["component"]
)
REDIS_DATA_LOSS = Counter(
    "kvrouter_events_redis_data_loss_total", "Times a stream marker changed: Redis lost its data"
)
SNAPSHOTS_WRITTEN = Counter("kvrouter_snapshots_written_total", "Index snapshots written to Redis")
SNAPSHOT_BYTES = Gauge("kvrouter_snapshot_bytes", "Size of the last index snapshot written", ["model"])
SNAPSHOT_LOAD_SECONDS = Gauge(
    "kvrouter_snapshot_load_seconds", "Time to fetch and load the snapshot at start", ["model"]
)
STREAM_TRIMMED = Counter("kvrouter_stream_trimmed_entries_total", "Stream entries trimmed behind snapshots")
RESERVATION_SYNC_ERRORS = Counter(
    "kvrouter_reservation_sync_errors_total", "Failed rounds of sharing reservations between replicas"
)

PUB_ENTRIES = Counter("kvrouter_publisher_entries_total", "Stream entries written by publishers")
PUB_EVENTS = Counter("kvrouter_publisher_events_total", "KV events accepted by publishers")
PUB_DROPPED = Counter(
    "kvrouter_publisher_dropped_events_total", "Events dropped when a publisher's buffer overflowed"
)
PUB_RESYNCS = Counter(
    "kvrouter_publisher_resyncs_total", "Full resyncs (new epoch) published, by reason", ["reason"]
)
PUB_BUFFERED = Gauge("kvrouter_publisher_buffered_events", "Events waiting in publisher buffers")

ALL: tuple[Collector, ...] = (
    EVENTS_APPLIED, BLOCKS, ORPHANS, MALFORMED, DUPLICATES, GAPS, EPOCH_RESETS, DUMPS_REQUESTED,
    INGEST_LAG, APPLY_SECONDS, WORKERS_LAPSED, WORKERS_LIVE, REDIS_ERRORS, REDIS_DATA_LOSS,
    SNAPSHOTS_WRITTEN, SNAPSHOT_BYTES, SNAPSHOT_LOAD_SECONDS, STREAM_TRIMMED,
    RESERVATION_SYNC_ERRORS, PUB_ENTRIES, PUB_EVENTS, PUB_DROPPED, PUB_RESYNCS, PUB_BUFFERED,
)
"""Every metric of the event plane, for registries other than the default one."""
