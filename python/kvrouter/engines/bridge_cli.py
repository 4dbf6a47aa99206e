"""`kvrouter bridge vllm|sglang ...`: run the ZMQ -> Redis KV-event bridge beside an engine.

See engines/vllm/README.md for a walk-through; kvrouter.engines.bridge for behaviour.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from kvrouter.engines.bridge import ENGINES
from kvrouter.mainloop import run, stop_on_signals
from kvrouter.registry import Role


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bridge", help="forward a vLLM / SGLang engine's ZMQ KV events to the router's Redis",
        description="Subscribe to an engine's ZMQ KV-event publisher, repair gaps through its "
                    "replay socket, and publish the events, heartbeats and scraped load into "
                    "the router's Redis event plane, as worker --worker-id of --model.")
    sub = p.add_subparsers(dest="engine", metavar="ENGINE")
    sub.required = True
    for engine in ENGINES:
        e = sub.add_parser(engine, help=f"bridge a {engine} server",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_args(e, engine)
        e.set_defaults(func=_cmd_bridge)


def _add_args(p: argparse.ArgumentParser, engine: str) -> None:
    p.add_argument("--zmq", required=True, metavar="ENDPOINT",
                   help="the engine's KV-event publisher, e.g. tcp://10.0.0.5:5557")
    p.add_argument("--zmq-bind", action="store_true",
                   help="bind ENDPOINT instead of connecting: needed when the engine's endpoint "
                        "is a plain host (vLLM then connects to us); with tcp://*:PORT on the "
                        "engine, connect (the default)")
    p.add_argument("--replay", metavar="ENDPOINT", default=None,
                   help="the engine's replay endpoint (vLLM replay_endpoint), used to repair "
                        "sequence gaps; without it a gap makes the worker start over empty")
    p.add_argument("--topic", default="", help="subscription topic prefix ('' = all)")
    p.add_argument("--worker-id", required=True, help="worker name in the router")
    p.add_argument("--model", required=True, help="model name in the router")
    p.add_argument("--redis", required=True, metavar="URL", help="the router's Redis")
    p.add_argument("--namespace", default="kvrouter", help="the router's key namespace")
    p.add_argument("--num-shards", type=int, default=1, help="the router's stream shards")
    p.add_argument("--block-size", type=int, default=None,
                   help="the engine's KV block size (vLLM --block-size, SGLang --page-size); "
                        "default: learnt from the first event")
    p.add_argument("--router-block-size", type=int, default=None,
                   help="the router model's block size: refuse to start when the engine's is "
                        "not a multiple of it")
    p.add_argument("--role", default=Role.AGGREGATED.value, choices=[r.value for r in Role])
    p.add_argument("--http-url", default=None, metavar="URL",
                   help="the engine's HTTP server (OpenAI API, /health), e.g. "
                        "http://127.0.0.1:8000; default: the scheme://host:port of --metrics-url")
    p.add_argument("--address", default="",
                   help="engine address the router proxies to (default: --http-url)")
    p.add_argument("--served-model", default=None,
                   help="the model's name on the engine's OpenAI API (default: --model)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="extra worker metadata for the router (repeatable), e.g. pool=long; "
                        "may override backend (default openai) and served_model")
    p.add_argument("--metrics-url", default=None,
                   help="the engine's Prometheus endpoint, e.g. http://127.0.0.1:8000/metrics")
    p.add_argument("--metrics-interval", type=float, default=1.0, help="scrape period, s")
    p.add_argument("--metrics-label", action="append", default=[], metavar="KEY=VALUE",
                   help="only series with this label (repeatable), e.g. engine=0")
    p.add_argument("--total-blocks", type=int, default=None,
                   help="KV capacity in blocks, when /metrics does not export it")
    p.add_argument("--replay-timeout", type=float, default=2.0, help="seconds per replay reply")
    p.add_argument("--heartbeat-ttl", type=float, default=3.0, help="heartbeat TTL, s")
    p.add_argument("--health-url", default=None, metavar="URL",
                   help="the engine's health endpoint (default: --http-url + /health); while it "
                        "fails for longer than --engine-down-after the worker leaves routing")
    p.add_argument("--health-interval", type=float, default=1.0, help="health probe period, s")
    p.add_argument("--engine-down-after", type=float, default=None, metavar="S",
                   help="seconds of failed health probes before the worker leaves routing "
                        "(default: --heartbeat-ttl)")
    p.add_argument("--no-health-check", action="store_true",
                   help="never probe the engine: the worker stays announced while the bridge runs")
    if engine == "vllm":
        p.add_argument("--group-idx", type=int, default=None,
                       help="KV cache group to index (default: first full-attention group)")
    else:
        p.add_argument("--dp-rank", type=int, default=0,
                       help="attention-DP rank of this publisher (endpoint port + rank)")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")


# Option -> the flag that sets it, so that an error names the flag.
_FLAG_NAMES: dict[tuple[str, ...], str] = {(k,): v for k, v in {
    "zmq_endpoint": "--zmq", "zmq_bind": "--zmq-bind", "replay_endpoint": "--replay",
    "topic": "--topic", "dp_rank": "--dp-rank", "group_idx": "--group-idx",
    "block_size": "--block-size", "router_block_size": "--router-block-size",
    "metrics_url": "--metrics-url", "metrics_interval_s": "--metrics-interval",
    "metrics_labels": "--metrics-label", "total_blocks": "--total-blocks",
    "replay_timeout_s": "--replay-timeout", "http_url": "--http-url",
    "served_model": "--served-model", "meta": "--meta", "health_check": "--no-health-check",
    "health_url": "--health-url", "health_interval_s": "--health-interval",
    "engine_down_after_s": "--engine-down-after"}.items()}


def _cmd_bridge(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from kvrouter.config import ConfigError
    from kvrouter.engines.bridge import BridgeConfig, BridgeConfigError, parse_labels

    values: dict[str, Any] = {
        "engine": args.engine, "zmq_endpoint": args.zmq, "zmq_bind": args.zmq_bind,
        "replay_endpoint": args.replay, "topic": args.topic,
        "dp_rank": getattr(args, "dp_rank", 0), "group_idx": getattr(args, "group_idx", None),
        "block_size": args.block_size, "router_block_size": args.router_block_size,
        "metrics_url": args.metrics_url, "metrics_interval_s": args.metrics_interval,
        "total_blocks": args.total_blocks, "replay_timeout_s": args.replay_timeout,
        "http_url": args.http_url, "served_model": args.served_model or args.model,
        "health_check": not args.no_health_check, "health_url": args.health_url,
        "health_interval_s": args.health_interval, "engine_down_after_s": args.engine_down_after}
    try:
        values["metrics_labels"] = parse_labels(args.metrics_label)
        values["meta"] = parse_labels(args.meta)
        config = BridgeConfig.from_values(values, keys=_FLAG_NAMES)
        config.validate()
    except ConfigError as exc:  # BridgeConfigError is one
        print(f"kvrouter bridge: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except BridgeConfigError as exc:
        print(f"kvrouter bridge: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad names / Redis options from the publisher
        print(f"kvrouter bridge: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, config: Any) -> int:
    from kvrouter.engines.bridge import EngineBridge
    from kvrouter.events.publisher import redis_publisher

    async def main() -> None:
        publisher = redis_publisher(
            args.redis, args.model, args.worker_id, namespace=args.namespace,
            num_shards=args.num_shards, block_size=config.block_size or 0, role=args.role,
            address=args.address or config.http_url or "", heartbeat_ttl_s=args.heartbeat_ttl)
        bridge = EngineBridge(config, publisher)
        stop_on_signals(bridge.stop)
        await bridge.run()

    run(main())
    return 0
