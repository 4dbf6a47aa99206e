"""What an in-process publisher delivers into: the sink protocol.

The publisher (kvrouter.events.publisher) owns this protocol and the in-process
plane (kvrouter.events.inprocess) implements it, so the publisher never imports a
plane: the dependency points from the plane down to the publisher.
"""

from __future__ import annotations

from typing import Protocol

from kvrouter.events.wire import DumpRequest


class EventSink(Protocol):
    """Takes one worker's entries and heartbeats, and hands back its dump requests."""

    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        """Accept one entry (one batch of events at `seq` of `epoch`); raises ValueError
        on bad input, changing nothing."""

    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        """Accept heartbeat hash fields (kvrouter.events.wire H_*)."""

    async def wait_dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        """The worker's pending dump requests; waits up to `timeout_s` for a first one."""
