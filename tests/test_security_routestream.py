"""Issue 13 finding 3: one huge RouteStream message (far under the message size limit) must not
freeze the router's event loop: workers keep their liveness and reservations survive while
it is decided (the service decides a message's items in slices, yielding between them)."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc

from kvrouter._proto.v1 import router_pb2, router_pb2_grpc
from kvrouter.client import RouterClient, route_request
from kvrouter.testing.processes import start_router, start_sim_engine
from kvrouter.testing.wait import wait_until

# Items of one message, the finding's size: ~5 s of decisions at once on this loaded 2-core
# machine (it froze the loop ~16 s); their replies fit the default 16 MiB limit.
ITEMS = 350_000


def _lapsed(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    return sum(float(line.rsplit(b" ", 1)[1]) for line in text.splitlines()
               if line.startswith(b"kvrouter_workers_lapsed_total "))


def test_huge_routestream_message_does_not_lapse_workers_or_drop_reservations(
        tmp_path: Path) -> None:
    # A real engine heartbeats every 0.5 s and lapses after 3 s of silence as the router
    # sees it: a loop frozen by the message for longer would lapse it.
    rp = start_router(tmp_path, {"router": {"heartbeat_timeout_s": 3.0,
                                            "heartbeat_interval_s": 0.5}}, metrics=True)
    engine = None
    try:
        engine = start_sim_engine(tmp_path, "e0", router=rp.target)
        with RouterClient(rp.target) as c:
            wait_until(lambda: [w.status for w in c.list_workers()] == ["up"], 30,
                       what="e0 up")
            rid = c.route(list(range(64)), request_id="kept").request_id
        item = router_pb2.RouteStreamItem(route=route_request([1, 2], dry_run=True))
        big = router_pb2.RouteStreamRequest(seq=1, items=[item] * ITEMS)

        async def send() -> router_pb2.RouteStreamResponse:
            async with grpc.aio.insecure_channel(
                    rp.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                call = router_pb2_grpc.RouterStub(ch).RouteStream(timeout=300)
                await call.write(big)
                await call.done_writing()
                return await call.read()  # type: ignore[no-any-return]

        resp = asyncio.run(send())
        assert len(resp.results) == ITEMS
        assert all(r.WhichOneof("result") == "route" for r in resp.results[:10])
        assert _lapsed(rp.metrics_port) == 0
        with RouterClient(rp.target) as c:
            assert [w.status for w in c.list_workers()] == ["up"]
            assert c.release(rid) is True  # the reservation survived
    finally:
        if engine is not None:
            engine.stop()
        rp.stop()
