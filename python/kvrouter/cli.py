"""`kvrouter` command line: serve (the router), route (one decision, explained), workers (list).

Other parts of the project add subcommands through modules that expose
`register(subparsers) -> None`; they are imported only when named on the command
line. A subcommand whose module fails to import is an error that names the module
and the cause, never a silently missing command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

EXTERNAL_COMMANDS: dict[str, str] = {
    "engine": "kvrouter.engines.commands",
    "bridge": "kvrouter.engines.bridge_cli",
    "demo": "kvrouter.demo",
    "planner": "kvrouter.autoscale.command",
    "frontier": "kvrouter.autoscale.frontier",
}

DEFAULT_TARGET = "127.0.0.1:50051"


def _target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("KVROUTER_TARGET", DEFAULT_TARGET),
                   help="router gRPC address (env KVROUTER_TARGET; default %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="RPC timeout in seconds")


# ---------------------------------------------------------------------- serve
def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the router (gRPC + /metrics)",
        description="Run the router. Settings come from flags > KVROUTER_* environment > "
                    "--config file (YAML or TOML) > defaults; see --print-config.")
    p.add_argument("--config", metavar="PATH", help="YAML or TOML file (env KVROUTER_CONFIG)")
    p.add_argument("--listen", help="gRPC host:port (default 127.0.0.1:50051)")
    p.add_argument("--metrics-host", help="address of /metrics (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="port of /metrics, 0 = off (default 9400)")
    p.add_argument("--redis-url", help="Redis event plane; unset: in-process (default)")
    p.add_argument("--ext-proc", metavar="HOST:PORT", dest="ext_proc",
                   help="serve the Gateway API endpoint picker (Envoy ext_proc) here "
                        "(default: off; docs/gateway.md)")
    p.add_argument("--lease-s", type=float, help="reservation lease in seconds (default 300)")
    p.add_argument("--expire-interval-s", type=float, help="lease check period (default 1)")
    p.add_argument("--heartbeat-timeout-s", type=float,
                   help="workers silent this long are removed, 0 = never (default 10)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default) or ERROR")
    p.add_argument("--log-format", help="kv (default) or json")
    p.add_argument("--max-message-bytes", type=int, help="gRPC message limit (default 16 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest accepted prompt")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the OpenAI-compatible HTTP front here (default: off)")
    p.add_argument("--model", action="append", metavar="SPEC", default=None,
                   help="a model: NAME[,key=value...] e.g. llama,block_size=32,vocab_size=128256"
                        ",policy=kv,weights.decode=2 (repeat for several; replaces the file's "
                        "models)")
    # Security (docs/security.md); environment KVROUTER_TLS_CERT, KVROUTER_AUTH_FILE, ...
    p.add_argument("--tls-cert", help="TLS certificate (PEM) of the gRPC and /metrics listeners")
    p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-ca", help="CA bundle that verifies client certificates")
    p.add_argument("--tls-client-auth", action="store_true", default=None,
                   help="require client certificates signed by --tls-ca (mutual TLS)")
    p.add_argument("--auth-file", help="principals: tokens / certificate identities and roles")
    p.add_argument("--admin-listen", help="serve admin RPCs (DrainWorker, DeregisterWorker) "
                                          "only on this host:port")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow a listener reachable from other machines without TLS and "
                        "authentication (logged and exported as kvrouter_insecure_listener)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration as YAML and exit")
    p.set_defaults(func=_cmd_serve)


_SERVE_FIELDS = ("listen", "metrics_host", "metrics_port", "redis_url", "lease_s",
                 "expire_interval_s", "heartbeat_timeout_s", "log_level", "log_format",
                 "max_message_bytes", "max_prompt_tokens", "http", "tls_cert", "tls_key",
                 "tls_ca", "tls_client_auth", "auth_file", "admin_listen", "insecure")


def _cmd_serve(args: argparse.Namespace) -> int:
    import yaml

    from kvrouter.config import ConfigError, load_config, parse_model_spec

    overrides: dict[str, Any] = {}
    router = {k: getattr(args, k) for k in _SERVE_FIELDS if getattr(args, k) is not None}
    if args.ext_proc is not None:  # the endpoint picker (server/ext_proc.py)
        router["ext_proc"] = args.ext_proc
    if router:
        overrides["router"] = router
    # Errors in a flag's value name the flag.
    names: dict[tuple[str, ...], str] = {("router", k): "--" + k.replace("_", "-") for k in router}
    try:
        if args.model:
            overrides["models"] = [parse_model_spec(s) for s in args.model]
            names[("models",)] = "--model"
        config = load_config(args.config, overrides=overrides, flag_names=names)
    except ConfigError as e:
        print(f"kvrouter serve: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0

    companions: list[Any] = []
    if any(m.planner.enabled for m in config.models):  # the autoscaling planner, in here
        from pydantic import ValidationError

        from kvrouter.autoscale.embedded import settings, start_for

        try:
            settings(config)
        except ValidationError as e:
            print(f"kvrouter serve: planner.settings: {e}", file=sys.stderr)
            return 2
        companions.append(start_for)

    from kvrouter.logs import setup_logging

    setup_logging(config.router.log_level, config.router.log_format)
    from kvrouter.mainloop import run_command
    from kvrouter.server.app import serve

    return run_command("kvrouter serve", serve(config, companions), failures=(RuntimeError,))


# ---------------------------------------------------------------------- route
def _add_route(sub: Any) -> None:
    p = sub.add_parser(
        "route", help="ask a running router for one decision and print the explain table",
        description="One routing decision against a running router, with the per-candidate "
                    "breakdown. A dry run unless --reserve is given.")
    _target_arg(p)
    p.add_argument("--model", default="", help="model name (default: the router's 'default')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="token ids, comma or space separated")
    src.add_argument("--tokens-file", metavar="PATH",
                     help="file of token ids: a JSON list or whitespace/comma separated")
    src.add_argument("--random", type=int, metavar="N", help="N random token ids")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    p.add_argument("--vocab", type=int, default=32000, help="token id range of --random")
    p.add_argument("--extra-key", help="LoRA name / cache salt folded into the hash")
    p.add_argument("--policy", default="", help="override the model's policy")
    p.add_argument("--role", default="", choices=["", "aggregated", "prefill", "decode"])
    p.add_argument("--candidates", default="", help="comma separated worker names")
    p.add_argument("--expected-output-tokens", type=int, default=0)
    p.add_argument("--reserve", action="store_true",
                   help="reserve load like a real request (release it with the printed id)")
    p.add_argument("--request-id", default="", help="request id of the reservation")
    p.add_argument("--session-id", default="", help="session key: shows what session affinity "
                                                    "does (docs/gateway.md)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_route)


def _read_tokens(args: argparse.Namespace) -> list[int]:
    if args.random is not None:
        rng = random.Random(args.seed)
        return [rng.randrange(args.vocab) for _ in range(args.random)]
    text = args.tokens if args.tokens is not None else Path(args.tokens_file).read_text()
    text = text.strip()
    if text.startswith("["):
        return [int(t) for t in json.loads(text)]
    return [int(t) for t in text.replace(",", " ").split()]


def printable(text: object) -> str:
    """`text` safe for a terminal: control and other non-printable characters (ESC, NUL,
    newlines, bidi overrides) are shown as repr-style escapes. Names, metadata and error
    details come from whoever registered a worker, so they must not drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def format_decision(d: Any) -> str:
    rid = printable(d.request_id)
    lines = [
        f"model {printable(d.model)}  policy {printable(d.policy)}  prompt {d.prompt_tokens} "
        f"tokens = {d.prompt_blocks} blocks of {d.block_size}",
        f"chosen {printable(d.worker)}  overlap {d.overlap_blocks}/{d.prompt_blocks} blocks "
        f"({100 * d.overlap_ratio:.0f}%)" + (f"  request_id {rid}" if d.request_id
                                            else "  (dry run)"),
    ]
    if getattr(d, "affinity", ""):  # session affinity: kept (it decided) / moved / new
        lines.append(f"session affinity: {d.affinity}")
    if d.candidates:
        head = ("", "worker", "gpu", "host", "disk", "new_prefill", "decode", "queue", "cost")
        rows = [head] + [
            ("*" if c.chosen else "", c.worker, str(c.gpu_blocks), str(c.host_blocks),
             str(c.disk_blocks), str(c.new_prefill_tokens), str(c.decode_blocks), str(c.queue),
             f"{c.cost:.3f}")
            for c in sorted(d.candidates, key=lambda c: (c.cost, c.worker))
        ]
        lines.append("")
        lines += _table(rows)
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.ljust(w) if i <= 1 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                    strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def _rpc_error(cmd: str, e: Any) -> int:
    print(f"kvrouter {cmd}: {e.code().name}: {printable(e.details())}", file=sys.stderr)
    return 1


def _cmd_route(args: argparse.Namespace) -> int:
    import grpc

    from kvrouter.client import RouterClient

    try:
        tokens = _read_tokens(args)
    except (OSError, ValueError) as e:
        print(f"kvrouter route: cannot read tokens: {e}", file=sys.stderr)
        return 2
    candidates = [c for c in args.candidates.split(",") if c]
    with RouterClient(args.target, timeout=args.timeout) as client:
        try:
            d = client.route(tokens, args.model, request_id=args.request_id,
                             extra_key=args.extra_key, policy=args.policy, role=args.role,
                             candidates=candidates,
                             expected_output_tokens=args.expected_output_tokens, explain=True,
                             dry_run=not args.reserve, session_id=args.session_id)
        except grpc.RpcError as e:
            return _rpc_error("route", e)
        except ValueError as e:
            print(f"kvrouter route: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(asdict(d), indent=2))
    else:
        print(format_decision(d))
    return 0


# ---------------------------------------------------------------------- workers
def _add_workers(sub: Any) -> None:
    p = sub.add_parser("workers", help="list the workers of a running router with load",
                       description="Workers known to a running router, their status and load.")
    _target_arg(p)
    p.add_argument("--model", default="", help="only this model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_workers)


def _cmd_workers(args: argparse.Namespace) -> int:
    import grpc

    from kvrouter.client import RouterClient, to_workers

    with RouterClient(args.target, timeout=args.timeout) as client:
        try:
            resp = client.list_workers_pb(args.model)  # every page
            workers = to_workers(resp)
        except grpc.RpcError as e:
            return _rpc_error("workers", e)
    if args.json:
        print(json.dumps([{**asdict(w), "metadata": dict(w.metadata)} for w in workers],
                         indent=2))
        return 0
    if not workers:
        print("no workers")
        return 0
    head = ("model", "worker", "role", "status", "cached", "prefill_tok", "decode_blk",
            "requests", "queue", "seen_s", "address")
    rows = [head] + [
        (w.model, w.name, w.role, w.status + ("" if not w.status_reason else "*"),
         str(w.cached_blocks), str(w.prefill_tokens), str(w.decode_blocks),
         str(w.reserved_requests), str(w.queue), f"{w.last_seen_age_s:.1f}", w.address or "-")
        for w in workers
    ]
    for line in _table(rows):
        print(line)
    reasons = [printable(f"* {w.model}/{w.name}: {w.status_reason}")
               for w in workers if w.status_reason]
    if reasons:
        print("\n" + "\n".join(reasons))
    queues = [_admission_line(a) for a in resp.admission if a.enabled]
    if queues:
        print("\n" + "\n".join(queues))
    return 0


def _admission_line(a: Any) -> str:
    """One model's admission queue (docs/admission.md) under the workers table."""
    per_class = ", ".join(f"{c.name} {c.queued}" for c in a.classes)
    return printable(
        f"admission {a.model}: {'saturated' if a.saturated else 'not saturated'}, "
        f"{a.queued}/{a.max_queue} queued ({per_class}); admitted {a.admitted}, "
        f"dispatched {a.dispatched}, rejected {a.rejected}, expired {a.expired}; "
        f"retry-after {a.retry_after_s:.0f} s")


# ---------------------------------------------------------------------- main
class CommandUnavailable(RuntimeError):
    """A subcommand's module could not be imported (a missing dependency, a broken install)."""


def _add_external(sub: Any, argv: Sequence[str]) -> None:
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in EXTERNAL_COMMANDS.items():
        if wanted != name:
            # Not asked for: list it in --help without importing it (imports may be heavy).
            sub.add_parser(name, help=f"(see kvrouter {name} --help)", add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise CommandUnavailable(f"kvrouter {name}: cannot load its module {module}: "
                                     f"{type(e).__name__}: {e}") from e
        register = getattr(mod, "register", None)
        if not callable(register):
            raise CommandUnavailable(f"kvrouter {name}: module {module} has no register()")
        register(sub)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrouter", description="KV-cache-aware router for LLM inference fleets")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_serve(sub)
    _add_route(sub)
    _add_workers(sub)
    _add_external(sub, argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except CommandUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:  # an external command listed for --help only
        parser.parse_args([args.command, "--help"])
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
