"""`kvrouter engine sim`: the command line of the simulated engine worker.

See kvrouter.engines.sim.process for what the process does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from kvrouter.config import ConfigError
from kvrouter.engines.sim.process import (
    DEFAULT_REDIS_BLOCK_SIZE,
    DEFAULT_ROUTER,
    SetupError,
    SimOptions,
    run_worker,
)
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION
from kvrouter.mainloop import run_command
from kvrouter.registry import Role


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-id", required=True, help="worker name, unique per model")
    p.add_argument("--model", default="default", help="model name at the router (default %(default)s)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--router", metavar="HOST:PORT",
                      help="register with this router and send it events over gRPC "
                           f"(default {DEFAULT_ROUTER} unless --redis is given)")
    dest.add_argument("--redis", metavar="URL", help="publish events and heartbeats to Redis instead")
    p.add_argument("--namespace", default="kvrouter", help="Redis key namespace (with --redis)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="Engine gRPC address; port 0 picks a free one (default %(default)s)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="address given to the router (default: the listen address)")
    p.add_argument("--profile", default=str(DEFAULT_CALIBRATION),
                   help="calibration file of the cost model (default %(default)s)")
    p.add_argument("--kv-capacity-tokens", type=int,
                   help="KV cache size in tokens (default: what fits on the profile's GPU)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second: 1 = real time, 0.1 = 10x faster")
    p.add_argument("--block-size", type=int,
                   help="KV block size in tokens (default: the router model's block size; "
                        f"{DEFAULT_REDIS_BLOCK_SIZE} with --redis)")
    p.add_argument("--role", choices=[r.value for r in Role], default=Role.AGGREGATED.value)
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="token ids must be below this; generated ids are drawn from it")
    p.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="token budget of one engine step (chunked prefill)")
    p.add_argument("--link-gbps", type=float, default=50.0,
                   help="bandwidth of the KV link from context workers, GB/s: a generation-only "
                        "request waits prompt tokens x KV bytes per token / this before "
                        "decoding (default %(default)s, NVLink-class; 25 for RDMA)")
    p.add_argument("--host-kv-capacity-tokens", type=int,
                   help="host KV tier for Offload/Reload, in tokens (default: 4x the GPU KV "
                        "capacity; 0: no host tier, Offload/Reload answer UNIMPLEMENTED)")
    p.add_argument("--h2d-gbps", type=float,
                   help="host <-> GPU copy bandwidth of the host tier, GB/s (default: the "
                        "profile's measured copy, 54.9 on the H100 calibration)")
    p.add_argument("--session-ttl-s", type=float,
                   help="simulated seconds after which an idle session's pin or host copy is "
                        "dropped (default 600)")
    p.add_argument("--pool", default="",
                   help="router pool of this worker (registry metadata 'pool'; default: "
                        "'aggregated' for aggregated workers, 'disaggregated' otherwise)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write the engine address here once serving (for scripts)")
    p.add_argument("--log-level", default=os.environ.get("KVROUTER_LOG_LEVEL", "WARNING"),
                   help="DEBUG, INFO, WARNING (default) or ERROR")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """The options, validated (kvrouter.config.ConfigError names the bad flag)."""
    values = {name: getattr(args, name) for name in SimOptions.model_fields
              if getattr(args, name, None) is not None}
    return SimOptions.from_values(
        values, keys={(name,): "--" + name.replace("_", "-") for name in values})


def _cmd_sim(args: argparse.Namespace) -> int:
    from kvrouter.logs import setup_logging

    setup_logging(args.log_level.upper())
    try:
        opts = options_from_args(args)
    except ConfigError as e:
        print(f"kvrouter engine sim: {e}", file=sys.stderr)
        return 2
    return run_command("kvrouter engine sim", run_worker(opts), failures=(SetupError,))


def register(subparsers: Any) -> None:
    """Add `sim` to the `kvrouter engine` subcommands."""
    p = subparsers.add_parser(
        "sim", help="run a simulated engine (calibrated cost model) as a worker",
        description="A simulated engine serving the Engine gRPC API in scaled wall time, "
                    "reporting KV events and load to a router (gRPC) or to Redis.")
    add_arguments(p)
    p.set_defaults(func=_cmd_sim)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrouter engine sim")
    add_arguments(parser)
    return _cmd_sim(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
