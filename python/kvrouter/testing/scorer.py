"""A reference Scorer service (proto/kvrouter/v1/scorer.proto) for tests, the demo and the
scaling bench: it stands in for a verifier or reward model.

    python -m kvrouter.testing.scorer --listen 127.0.0.1:0 --ready-file F [--delay-s S]

Score of a candidate: the mean of its token ids (0 for an empty one), so a test can check
the router's choice from the returned tokens alone. ``--delay-s`` makes every answer that
slow (the router's timeout and fallback); ``--broken`` answers one score too few.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

from kvrouter._proto.v1 import scorer_pb2, scorer_pb2_grpc
from kvrouter.grpc_server import GrpcServer, ListenError
from kvrouter.mainloop import run_command, stop_on_signals

SERVICE = "kvrouter.v1.Scorer"


def mean_token_score(token_ids: list[int]) -> float:
    return sum(token_ids) / len(token_ids) if token_ids else 0.0


class MeanTokenScorer(scorer_pb2_grpc.ScorerServicer):
    def __init__(self, delay_s: float = 0.0, broken: bool = False) -> None:
        self.delay_s = delay_s
        self.broken = broken
        self.calls = 0

    async def Score(self, request: scorer_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> scorer_pb2.ScoreResponse:
        self.calls += 1
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        scores = [mean_token_score(list(c.token_ids)) for c in request.candidates]
        if self.broken:
            scores = scores[:-1]
        return scorer_pb2.ScoreResponse(scores=scores)


async def serve(listen: str, ready_file: Path | None, delay_s: float, broken: bool) -> None:
    srv = GrpcServer(listen, [SERVICE])
    scorer_pb2_grpc.add_ScorerServicer_to_server(MeanTokenScorer(delay_s, broken), srv.server)
    await srv.start()
    await srv.set_serving()
    host = listen.rsplit(":", 1)[0]
    if ready_file is not None:
        ready_file.write_text(f"{host}:{srv.port}\n")
    stop = asyncio.Event()
    stop_on_signals(stop.set)
    await stop.wait()
    await srv.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvrouter-test-scorer", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--ready-file", type=Path, help="write host:port here once serving")
    p.add_argument("--delay-s", type=float, default=0.0, help="answer this late")
    p.add_argument("--broken", action="store_true", help="answer one score too few")
    a = p.parse_args(argv)
    return run_command("kvrouter-test-scorer", serve(a.listen, a.ready_file, a.delay_s, a.broken),
                       failures=(ListenError,))


if __name__ == "__main__":
    sys.exit(main())
