"""The router's Prometheus registry serves the event plane's metrics and the workers by
status (MISMATCH included), with several routers and planes built in one process."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvrouter.events.codec import encode_payload
from kvrouter.events.inprocess import InProcessPlane
from kvrouter.events.model import BlockStored
from kvrouter.events.plane import make_event_plane
from kvrouter.registry import Registry
from kvrouter.server.metrics import RouterMetrics, WorkerSample

BS = 4


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(metrics: RouterMetrics) -> str:
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    finally:
        metrics.stop()


def test_router_metrics_endpoint_exports_event_plane_metrics() -> None:
    first, second = RouterMetrics(), RouterMetrics()  # two routers in one process
    before = samples(scrape(second), "kvrouter_events_malformed_total")
    before_applied = samples(scrape(second), "kvrouter_events_applied_total")

    async def run() -> None:
        reg = Registry()
        reg.add_model("mx", BS)
        plane = make_event_plane(reg, None)
        assert isinstance(plane, InProcessPlane)
        await plane.start()
        ok = encode_payload([BlockStored(hashes=(1,), parent=None, token_ids=(1, 2, 3, 4),
                                         block_size=BS)])
        plane.submit("mx", "w", "e1", 0, ok)
        plane.submit("mx", "w", "e1", 1, b"\xc1 not msgpack")
        deadline = asyncio.get_running_loop().time() + 10
        while plane.stats()["malformed_total"] < 1:
            assert asyncio.get_running_loop().time() < deadline, plane.stats()
            await asyncio.sleep(0.02)
        await plane.stop()

    asyncio.run(run())
    text = scrape(second)
    malformed = samples(text, "kvrouter_events_malformed_total")
    key = (("reason", "payload"),)
    assert malformed[key] == before.get(key, 0.0) + 1
    applied = samples(text, "kvrouter_events_applied_total")
    assert applied[(("model", "mx"),)] == before_applied.get((("model", "mx"),), 0.0) + 1
    families = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"kvrouter_event_epoch_resets", "kvrouter_event_gaps", "kvrouter_ingest_lag_seconds",
            "kvrouter_workers_lapsed", "kvrouter_decisions", "kvrouter_workers"} <= families
    # The first router's registry serves the same process-wide objects.
    assert samples(scrape(first), "kvrouter_events_malformed_total")[key] == malformed[key]


def test_workers_by_status_include_mismatch() -> None:
    metrics = RouterMetrics()
    metrics.workers.set([
        WorkerSample("m", "a", "up", 0, 0, 0, 3),
        WorkerSample("m", "b", "mismatch", 0, 0, 0, 0),
        WorkerSample("m", "c", "mismatch", 0, 0, 0, 0),
    ], ["m"])
    by_status = {dict(k)["status"]: v for k, v in
                 samples(scrape(metrics), "kvrouter_workers").items()}
    assert by_status == {"up": 1.0, "draining": 0.0, "down": 0.0, "mismatch": 2.0}
