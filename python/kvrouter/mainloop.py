"""Process entry for the package's long-running commands (router, engines, bridge, event
plane, demo): one event-loop runner and one stop-on-signal rule, written once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def freeze_heap() -> int:
    """Collect once, then leave every object alive now out of later GC passes; returns
    how many. A full pass walks every tracked object, and a serving process holds ~90K
    from its imports alone (grpc, protobuf, pydantic, numpy, jinja2): one pass stopped the
    router's event loop for 55-180 ms under load on the 2-core VM (gc callbacks), which
    every request then waiting sees. Frozen objects are still freed when their last
    reference goes; only cycles among them would stay, and a command's modules, classes
    and configuration live until it exits anyway."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop where it is installed, else on asyncio's loop,
    with the heap the imports built frozen first (`freeze_heap`)."""
    freeze_heap()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    return uvloop.run(main)


def stop_on_signals(stop: Callable[[], object]) -> None:
    """Call `stop` on SIGINT / SIGTERM in the running loop. Where the loop cannot take
    signal handlers (Windows, or not the main thread: a test running the coroutine in a
    thread) the default handlers stay."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


def run_command(prog: str, main: Coroutine[Any, Any, object], *,
                failures: tuple[type[Exception], ...]) -> int:
    """Run a command's coroutine and return its exit status: 0, also after Ctrl-C; 1 with
    `prog: message` on stderr for a startup failure of a type in `failures` (port in use,
    bad profile, ...), which is reported, not traced. The heap the command's imports built
    is frozen first (by `run`)."""
    try:
        run(main)
    except failures as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
