"""Router configuration: defaults < file (YAML or TOML) < environment (KVROUTER_*) < flags.

    router:
      listen: 127.0.0.1:50051     # gRPC address
      metrics_port: 9400          # Prometheus /metrics over HTTP; 0 = off
      redis_url: null             # null: in-process event plane (embedded default)
      lease_s: 300                # a reservation whose Release never comes expires after this
    models:
      - name: llama-3-8b
        block_size: 16
        vocab_size: 128256        # token ids >= this are rejected
        policy: kv
        weights: {prefill: 1.0, decode: 0.25, queue: 0.0}

Environment: KVROUTER_<ROUTER FIELD> (e.g. KVROUTER_LISTEN, KVROUTER_LEASE_S),
KVROUTER_MODELS (a JSON list of model tables) and KVROUTER_CONFIG (the file).
Every validation error names the offending field (ConfigError).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "KVROUTER_"
DEFAULT_MODEL = "default"

PolicyName = Literal["kv", "prefix_only", "least_loaded", "round_robin", "random"]
POLICIES: tuple[str, ...] = ("kv", "prefix_only", "least_loaded", "round_robin", "random")


class ConfigError(ValueError):
    """Invalid configuration; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Weights(_Strict):
    """Weights of the kv policy's cost (DESIGN §3.3)."""

    prefill: float = Field(default=1.0, ge=0,
                           description="per block of prompt not cached on the worker")
    # A request's decode blocks count for its whole life while its prefill is paid once, so a
    # block of decode load weighs less than a block of prefill: at 1.0 the router gave up
    # cache hits to balance (demo, fleet simulator and real vLLM all measured better at 0.1-0.5).
    decode: float = Field(default=0.25, ge=0, description="per KV block held by active requests")
    queue: float = Field(default=0.0, ge=0, description="per queued request")
    queued_prefill: float | None = Field(
        default=None, ge=0,
        description="per block already queued for prefill on the worker; null = same as prefill")


class SpecialisationConfig(_Strict):
    """Which pool a request goes to by its input and expected output length (kvrouter.planner)."""

    short_input_tokens: int = Field(
        default=1024, ge=0, description="inputs up to this many tokens go to the aggregated pool")
    long_input_tokens: int = Field(
        default=16384, gt=0, description="inputs of at least this many tokens go to the long-context pool")
    agg_output_ratio: float = Field(
        default=1.0, gt=0,
        description="below long_input_tokens, outputs >= ratio * input go to the aggregated pool")


class DisaggConfig(_Strict):
    """Proxy mode (Router.Generate): disaggregated prefill/decode and its fallbacks."""

    mode: Literal["auto", "aggregated", "disaggregated"] = Field(
        default="auto", description="auto: the specialisation step picks the pool per request")
    local_prefill_max_tokens: int = Field(
        default=512, ge=0,
        description="prefill on the decode worker when its uncached prompt part is below this")
    prefill_queue_max_tokens: int = Field(
        default=65536, gt=0,
        description="prefill pool saturated (prefill locally) when every prefill worker has "
                    "more than this many prompt tokens queued")
    transfer_weight: float = Field(
        default=0.05, ge=0,
        description="weight of a KV block to transfer to the decode worker, relative to "
                    "weights.prefill for a block to compute (about link time / compute time "
                    "per token: 128 KiB at 50 GB/s against ~15k prefill tokens/s)")
    max_attempts: int = Field(default=3, ge=1, le=16,
                              description="failed engine calls a request survives (failing over "
                                          "to other workers) before it ends with an error")
    suspect_s: float = Field(default=5.0, ge=0,
                             description="a worker whose call failed is avoided this long")
    specialisation: SpecialisationConfig = Field(default_factory=lambda: SpecialisationConfig())


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    block_size: int = Field(default=16, gt=0, le=1 << 20)
    vocab_size: int | None = Field(default=None, gt=0, le=1 << 32,
                                   description="token ids >= vocab_size are rejected")
    policy: PolicyName = "kv"
    weights: Weights = Field(default_factory=lambda: Weights())
    temperature: float = Field(default=0.0, ge=0,
                               description="> 0 samples by softmax instead of argmin")
    host_credit: float = Field(default=0.5, ge=0, le=1,
                               description="credit of a host-tier cache hit")
    disk_credit: float = Field(default=0.25, ge=0, le=1,
                               description="credit of a disk-tier cache hit")
    seed: int | None = Field(default=None, ge=0,
                             description="seed of random choices (tests, benches)")
    disagg: DisaggConfig = Field(default_factory=lambda: DisaggConfig())

    def scheduler_kwargs(self, lease_s: float, report_ttl_s: float) -> dict[str, object]:
        return {
            "policy": self.policy,
            "prefill_weight": self.weights.prefill,
            "decode_weight": self.weights.decode,
            "queue_weight": self.weights.queue,
            "queued_prefill_weight": self.weights.queued_prefill,
            "temperature": self.temperature,
            "host_credit": self.host_credit,
            "disk_credit": self.disk_credit,
            "lease_s": lease_s,
            "report_ttl_s": report_ttl_s,
            "seed": self.seed,
        }


class RouterConfig(_Strict):
    listen: str = Field(default="127.0.0.1:50051", description="gRPC listen address host:port")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="0 turns /metrics off")
    redis_url: str | None = Field(default=None, description="None: in-process event plane")
    event_plane: dict[str, Any] = Field(default_factory=dict,
                                        description="extra options for the event plane")
    lease_s: float = Field(default=300.0, gt=0, description="reservation lease without Release")
    expire_interval_s: float = Field(default=1.0, gt=0, description="how often leases are checked")
    report_ttl_s: float = Field(default=5.0, gt=0,
                                description="how long an engine load report counts")
    heartbeat_timeout_s: float = Field(
        default=10.0, ge=0,
        description="workers silent this long are removed; 0 = never")
    heartbeat_interval_s: float = Field(default=2.0, gt=0,
                                        description="told to workers at registration")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    log_format: Literal["kv", "json"] = "kv"
    max_message_bytes: int = Field(default=16 << 20, ge=1024, le=1 << 30)
    max_prompt_tokens: int = Field(default=1 << 20, gt=0)
    reflection: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {v!r}")
        return v

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v


class Config(_Strict):
    router: RouterConfig = Field(default_factory=lambda: RouterConfig())
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _default_model(self) -> Config:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate model name(s) {', '.join(dupes)}")
        if not self.models:
            # validate_assignment would recurse into this validator; bypass it.
            object.__setattr__(self, "models", [ModelConfig(name=DEFAULT_MODEL)])
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        loc = loc or "<root>"
        lines.append(f"{loc}: {e['msg']}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {p}: unknown format (use .yaml, .yml or .toml)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {p} does not parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a table/mapping")
    return data


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """KVROUTER_<FIELD> for router fields, KVROUTER_MODELS as JSON. Unknown names are ignored
    (KVROUTER_CONFIG names the file; other tools may share the prefix)."""
    router: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name in RouterConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            value: Any = env[key]
            if name == "event_plane":
                value = _json_env(key, value)
            router[name] = value
    if router:
        out["router"] = router
    if ENV_PREFIX + "MODELS" in env:
        out["models"] = _json_env(ENV_PREFIX + "MODELS", env[ENV_PREFIX + "MODELS"])
    return out


def _json_env(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key} is not valid JSON: {e}") from e


def parse_model_spec(spec: str) -> dict[str, Any]:
    """`name[,key=value...]` from the command line, e.g. `llama,block_size=32,vocab_size=128256`.
    Dotted keys reach nested tables: `weights.decode=2`."""
    name, *pairs = [s.strip() for s in spec.split(",")]
    if not name:
        raise ConfigError(f"--model {spec!r}: model name missing")
    out: dict[str, Any] = {"name": name}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model {spec!r}: expected key=value, got {pair!r}")
        target = out
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration. `overrides` (from flags) wins over `env` (default os.environ),
    which wins over the file (`path`, else $KVROUTER_CONFIG), which wins over defaults."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    data: dict[str, Any] = read_file(path) if path else {}
    data = _merge(data, env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    sources = (f"file {path}, " if path else "") + "environment and flags"
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, sources)) from None
