"""Stopping background asyncio tasks: the one helper every loop owner uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("kvrouter.events.tasks")


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel the tasks, then wait for each to finish. A task that had already died
    with an exception is logged (its loop stopped early), never re-raised: stopping
    must not fail halfway and leave the other tasks running."""
    pending = list(tasks)
    for t in pending:
        t.cancel()
    for t in pending:
        try:
            await t
        except asyncio.CancelledError:
            pass
        except Exception:
            log.warning("background task had failed: task=%s", _name(t), exc_info=True)


def _name(t: asyncio.Future[Any]) -> str:
    return t.get_name() if isinstance(t, asyncio.Task) else repr(t)
