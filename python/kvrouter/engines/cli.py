"""`kvrouter engine KIND ...`: run an engine as a kvrouter worker.

Each engine registers its own subcommand from its package (a `register(subparsers)`
function); a module that cannot be imported adds nothing, so optional engines never
break the command line. Heavy engine libraries are imported only when that engine runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

ENGINE_MODULES: tuple[str, ...] = (
    "kvrouter.engines.trtllm.worker",
    "kvrouter.engines.sim.command",
)

log = logging.getLogger("kvrouter.engines.cli")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("engine", help="run an engine as a kvrouter worker",
                              description="Run an engine that serves the Engine gRPC API and "
                                          "publishes its KV events to the router.")
    sub = p.add_subparsers(dest="engine_kind", metavar="KIND")
    sub.required = True
    for name in ENGINE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            log.debug("engine module not available: module=%s error=%s", name, exc)
            continue
        reg = getattr(mod, "register", None)
        if callable(reg):
            reg(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrouter")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
