"""`kvrouter engine KIND ...`: run an engine as a kvrouter worker.

Each engine registers its own subcommand from its package (a `register(subparsers)`
function). Heavy engine libraries (tensorrt_llm) are imported only when that engine
runs, so every module here imports with the core dependencies; one that fails to
import is an error naming it, never a silently missing command.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

ENGINE_MODULES: tuple[str, ...] = (
    "kvrouter.engines.trtllm.worker",
    "kvrouter.engines.sim.command",
)

def register(subparsers: Any) -> None:
    p = subparsers.add_parser("engine", help="run an engine as a kvrouter worker",
                              description="Run an engine that serves the Engine gRPC API and "
                                          "publishes its KV events to the router.")
    sub = p.add_subparsers(dest="engine_kind", metavar="KIND")
    sub.required = True
    for name in ENGINE_MODULES:
        importlib.import_module(name).register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrouter")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
