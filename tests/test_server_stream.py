"""RouteStream under concurrency, through a real `kvrouter serve`."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kvrouter.client import AsyncRouterClient, RouteResult, StreamItemError, route_request

BS = 4
MODEL = "m"
PROMPT = list(range(100, 132))


def test_route_stream_concurrent_sessions(router_server: Any, store_blocks: Any) -> None:
    rp = router_server({"router": {"heartbeat_timeout_s": 0},
                        "models": [{"name": MODEL, "block_size": BS}]})

    async def main() -> None:
        async with AsyncRouterClient(rp.target) as c:
            for w in ("w0", "w1", "w2"):
                await c.register_worker(MODEL, w, block_size=BS)

            async def one_by_one(session: Any, k: int) -> list[RouteResult]:
                return [await session.route(PROMPT[: 8 + (i % 24)], MODEL,
                                            expected_output_tokens=16)
                        for i in range(40)]

            async def batched(session: Any, k: int) -> list[RouteResult]:
                out: list[RouteResult] = []
                for b in range(4):
                    reqs = [route_request([k, b, i, *PROMPT], MODEL) for i in range(10)]
                    for r in await session.route_many(reqs):
                        assert isinstance(r, RouteResult), r
                        out.append(r)
                return out

            async with c.stream() as s1, c.stream() as s2:
                jobs = [one_by_one(s1, k) for k in range(4)] + [batched(s2, k) for k in range(4)]
                jobs += [one_by_one(s2, k) for k in range(2)] + [batched(s1, k) for k in range(2)]
                results = [r for rs in await asyncio.gather(*jobs) for r in rs]
                expected = 6 * 40 + 6 * 40
                assert len(results) == expected
                ids = [r.request_id for r in results]
                assert len(set(ids)) == expected and all(ids)
                assert {r.worker for r in results} <= {"w0", "w1", "w2"}

                workers = await c.list_workers(MODEL)
                assert sum(w.reserved_requests for w in workers) == expected

                # A bad item fails alone; the rest of its message and the stream go on.
                mixed = [route_request(PROMPT, MODEL, dry_run=True),
                         route_request(PROMPT, "no-such-model"),
                         route_request([], MODEL),
                         route_request(PROMPT, MODEL, dry_run=True)]
                out = await s1.route_many(mixed)
                assert isinstance(out[0], RouteResult) and isinstance(out[3], RouteResult)
                assert isinstance(out[1], StreamItemError)
                assert out[1].code == grpc.StatusCode.NOT_FOUND
                assert "no-such-model" in out[1].message
                assert isinstance(out[2], StreamItemError)
                assert out[2].code == grpc.StatusCode.INVALID_ARGUMENT

                # Release everything through the streams, concurrently.
                half = len(ids) // 2
                rel = await asyncio.gather(s1.release_many(ids[:half], MODEL),
                                           s2.release_many(ids[half:], MODEL))
                assert all(r is True for part in rel for r in part)
                again = await s1.release_many(ids[:3], MODEL)
                assert again == [False, False, False]

            workers = await c.list_workers(MODEL)
            assert sum(w.reserved_requests for w in workers) == 0
            assert sum(w.reserved_prefill_tokens + w.reserved_decode_blocks
                       for w in workers) == 0

    asyncio.run(main())
