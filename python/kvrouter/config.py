"""Router configuration: defaults < file (YAML, JSON or TOML) < environment (KVROUTER_*) < flags.

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
Every validation error names the offending field and the layer its value came from
(ConfigError). The layering is pydantic-settings' (LayeredSettings, a custom source
order); the bridge, event-plane and sim-engine options validate through the same path.
"""

from __future__ import annotations

import contextvars
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from kvrouter._core import DEFAULT_POLICY, DEFAULT_WEIGHTS, POLICIES

ENV_PREFIX = "KVROUTER_"
DEFAULT_MODEL = "default"

# The policy names and every scoring default are the core's (rust/src/scoring.rs); the
# static type comes from the stub, the runtime one (pydantic validates with it) from the core.
if TYPE_CHECKING:
    from kvrouter._core import PolicyName
else:
    PolicyName = Literal[POLICIES]  # Literal[("a", "b")] is Literal["a", "b"]
_D = DEFAULT_WEIGHTS


class ConfigError(ValueError):
    """Invalid configuration; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Weights(_Strict):
    """Weights of the kv policy's cost (docs/design.md §3.3)."""

    prefill: float = Field(default=_D["prefill_weight"], ge=0,
                           description="per block of prompt not cached on the worker")
    # A request's decode blocks count for its whole life while its prefill is paid once, so a
    # block of decode load weighs less than a block of prefill: at 1.0 the router gave up
    # cache hits to balance. The defaults (the core's) were tuned on the synthetic trace (bench.tune_weights).
    decode: float = Field(default=_D["decode_weight"], ge=0,
                          description="per KV block held by active requests")
    queue: float = Field(default=_D["queue_weight"], ge=0, description="per queued request")
    queued_prefill: float = Field(default=_D["queued_prefill_weight"], ge=0,
                                  description="per block already queued for prefill on the worker")
    pressure: float = Field(default=_D["pressure_weight"], ge=0,
                            description="per cached block the request would evict on a full "
                                        "worker, times its reuse likelihood (off for a worker "
                                        "reporting no KV capacity)")


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


MAX_SAMPLES = 64  # the most parallel samples of one request anywhere (sim engine, router)


class NSampleConfig(_Strict):
    """Router-side n samples (Router.Generate with sampling.n > 1; kvrouter.server.nsample,
    docs/inference-scaling.md): limits, the vote's answer regex and the scorers."""

    max_n: int = Field(default=16, ge=1, le=MAX_SAMPLES,
                       description="sampling.n above this is refused (INVALID_ARGUMENT)")
    answer_regex: str = Field(
        default=r"(\d+)\D*$",
        description="vote: the answer is the last match (group 1 if any) of this regex on a "
                    "sample's text (decoded with the model's tokenizer; without one, its "
                    "token ids as space-separated decimals); default: the last number")
    early_stop: bool = Field(default=True,
                             description="vote: cancel the outstanding samples once the "
                                         "majority cannot change")
    scorers: dict[str, str] = Field(default_factory=dict,
                                    description="Scorer gRPC services by name: host:port")
    scorer: str = Field(default="", description="the scorer of requests naming none")
    scorer_timeout_s: float = Field(default=2.0, gt=0, le=600,
                                    description="a scorer slower than this is given up on "
                                                "(fallback: vote)")
    stagger_calls: bool = Field(
        default=False,
        description="a backend without n (OpenAI-compatible servers): start a worker's further "
                    "per-sample calls only once its first call produced output, for servers "
                    "that do not share a prompt another request is computing; off: all at once "
                    "(vLLM v1 caches a prompt's blocks when it schedules them, and SGLang's "
                    "cache-aware policies hold back requests sharing a prefix in a batch)")

    @model_validator(mode="after")
    def _consistent(self) -> NSampleConfig:
        import re  # only here: the regex is compiled again per request

        try:
            re.compile(self.answer_regex)
        except re.error as e:
            raise ValueError(f"nsample.answer_regex does not compile: {e}") from None
        if self.scorer and self.scorer not in self.scorers:
            raise ValueError(f"nsample.scorer {self.scorer!r} is not one of the scorers "
                             f"{sorted(self.scorers)}")
        return self


class AffinityConfig(_Strict):
    """Session affinity (kvrouter.server.affinity): a request with a session key goes to the
    session's last worker unless that worker is overloaded; shared through Redis when the
    router runs the Redis event plane."""

    enabled: bool = Field(default=True, description="honour session keys")
    ttl_s: float = Field(default=600.0, gt=0,
                         description="a session forgets its worker this long after its last request")
    overload_prefill_tokens: int = Field(
        default=32768, ge=0,
        description="the session moves when its worker has more prompt tokens waiting for "
                    "prefill than this (0: no limit)")
    overload_queue: int = Field(
        default=0, ge=0,
        description="the session moves when its worker has more queued requests than this "
                    "(0: no limit)")


class AdmissionConfig(_Strict):
    """Admission control (kvrouter.admission, docs/admission.md): when every eligible worker
    is past a saturation point, requests wait in a router-side queue (priority classes,
    weighted fair sharing across tenants, deadlines) instead of queueing on an engine."""

    enabled: bool = Field(default=False, description="queue requests when the fleet is saturated")
    max_queued_prefill_tokens: int = Field(
        default=16384, gt=0,
        description="a worker is saturated with this many prompt tokens waiting for prefill")
    max_kv_usage: float = Field(
        default=0.95, gt=0, le=1,
        description="... or with this share of its KV blocks in use (from its load reports)")
    max_running_requests: int = Field(
        default=256, gt=0, description="... or with this many requests in flight")
    max_queue: int = Field(default=1024, ge=0,
                           description="queued requests per model; beyond: RESOURCE_EXHAUSTED")
    max_wait_s: float = Field(default=60.0, gt=0,
                              description="a request without a deadline waits at most this long")
    classes: list[str] = Field(default_factory=lambda: ["high", "normal", "low"], min_length=1,
                               description="priority classes, highest first")
    default_class: str = Field(default="normal",
                               description="class of requests naming none or an unknown one")
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="fair-share weight per tenant within a class")
    default_tenant_weight: float = Field(default=1.0, gt=0, le=1e6,
                                         description="weight of tenants not listed")

    @model_validator(mode="after")
    def _consistent(self) -> AdmissionConfig:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("admission.classes: duplicate class names")
        if self.default_class not in self.classes:
            raise ValueError(f"admission.default_class {self.default_class!r} is not one of "
                             f"the classes {self.classes}")
        bad = [t for t, w in self.tenant_weights.items() if not 0 < w <= 1e6]
        if bad:
            raise ValueError(f"admission.tenant_weights must be in (0, 1e6]: {bad}")
        return self


class PlannerConfig(_Strict):
    """The autoscaling planner inside `kvrouter serve` (kvrouter.autoscale.embedded,
    docs/autoscale.md): the loop `kvrouter planner` runs, against this router."""

    enabled: bool = False
    pool: str = Field(default="disaggregated", min_length=1,
                      description="the prefill/decode pool it sizes (aggregated workers: the "
                                  "aggregated pool)")
    actuator: Literal["local", "kubernetes"] = "local"
    command: list[str] | None = Field(
        default=None, description="local: engine command template ({name} {role} {pool} "
                                  "{model} {router}); None: a simulated engine")
    workdir: Path | None = Field(default=None, description="local: engine logs (None: a temp dir)")
    namespace: str = Field(default="kvrouter", description="kubernetes: namespace")
    instance: str = Field(default="kvrouter",
                          description="kubernetes: Deployments <instance>-<role>")
    calibration: Path | None = Field(default=None,
                                     description="the engines' calibration (None: the sim's)")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="kvrouter.autoscale.AutoscaleConfig fields (SLO, limits, timing; "
                    "checked by `kvrouter serve` before the router starts)")


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    block_size: int = Field(default=16, gt=0, le=1 << 20)
    vocab_size: int | None = Field(default=None, gt=0, le=1 << 32,
                                   description="token ids >= vocab_size are rejected")
    tokenizer: str | None = Field(
        default=None, description="directory with tokenizer.json (and tokenizer_config.json) "
                                  "for the HTTP front; None: token-id prompts only")
    policy: PolicyName = DEFAULT_POLICY
    weights: Weights = Field(default_factory=lambda: Weights())
    temperature: float = Field(default=_D["temperature"], ge=0,
                               description="> 0 samples by softmax instead of argmin")
    host_credit: float = Field(default=_D["host_credit"], ge=0, le=1,
                               description="credit of a host-tier cache hit")
    disk_credit: float = Field(default=_D["disk_credit"], ge=0, le=1,
                               description="credit of a disk-tier cache hit")
    approx_ttl_s: float = Field(default=_D["approx_ttl_s"], ge=0,
                                description="approximate mode: seconds a block routed to a "
                                            "worker that publishes no KV events is assumed held")
    pending_ttl_s: float = Field(default=_D["pending_ttl_s"], ge=0,
                                 description="in-flight prefixes: seconds a routed request's "
                                             "prompt counts as being computed on its worker at "
                                             "most (ended by its prefill or release); 0: off")
    seed: int | None = Field(default=None, ge=0,
                             description="seed of random choices (tests, benches)")
    nsample: NSampleConfig = Field(default_factory=lambda: NSampleConfig())
    disagg: DisaggConfig = Field(default_factory=lambda: DisaggConfig())
    admission: AdmissionConfig = Field(default_factory=lambda: AdmissionConfig())
    affinity: AffinityConfig = Field(default_factory=lambda: AffinityConfig())
    planner: PlannerConfig = Field(default_factory=lambda: PlannerConfig())

    def scheduler_kwargs(self, lease_s: float, report_ttl_s: float) -> dict[str, object]:
        return {
            "policy": self.policy,
            "prefill_weight": self.weights.prefill,
            "decode_weight": self.weights.decode,
            "queue_weight": self.weights.queue,
            "queued_prefill_weight": self.weights.queued_prefill,
            "pressure_weight": self.weights.pressure,
            "approx_ttl_s": self.approx_ttl_s,
            "pending_ttl_s": self.pending_ttl_s,
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
    lease_s: float = Field(default=_D["lease_s"], gt=0,
                           description="reservation lease without Release")
    expire_interval_s: float = Field(default=1.0, gt=0, description="how often leases are checked")
    report_ttl_s: float = Field(default=_D["report_ttl_s"], gt=0,
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
    http: str | None = Field(default=None,
                             description="host:port of the OpenAI-compatible HTTP front; None: off")
    ext_proc: str | None = Field(
        default=None,
        description="host:port of the Envoy ext_proc endpoint picker (Gateway API Inference "
                    "Extension, docs/gateway.md); None: off")
    ext_proc_body_mode: Literal["full_duplex_streamed", "buffered"] = Field(
        default="full_duplex_streamed",
        description="the gateway's request body mode when its first message does not say "
                    "(Envoy before protocol_config)")
    ext_proc_tls: bool = Field(
        default=False,
        description="serve the endpoint picker over TLS with tls_cert/tls_key (no client "
                    "certificate asked: gateways connect without one)")
    # Security (kvrouter.security, docs/security.md). The TLS fields' environment names
    # (KVROUTER_TLS_CERT ...) are the ones every kvrouter client and engine reads too.
    tls_cert: Path | None = Field(default=None, description="TLS certificate (PEM) of the listeners")
    tls_key: Path | None = Field(default=None, description="its private key (PEM)")
    tls_ca: Path | None = Field(default=None, description="CA bundle that verifies client certificates")
    tls_client_auth: bool = Field(default=False, description="require client certificates (mTLS)")
    metrics_tls: bool = Field(default=True, description="/metrics over TLS when tls_cert is set")
    auth_file: Path | None = Field(default=None, description="principals, tokens and roles (YAML/JSON)")
    admin_listen: str | None = Field(default=None, description="host:port of a separate admin port")
    insecure: bool = Field(default=False, description="allow a reachable listener without TLS and auth")

    @model_validator(mode="after")
    def _secure_listeners(self) -> Self:
        from kvrouter.security.listeners import check_router  # keeps config import-light

        if self.admin_listen is not None:
            self._host_port(self.admin_listen)
            if self.admin_listen == self.listen:
                raise ValueError("admin_listen must differ from listen")
        check_router(self)
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("listen", "ext_proc", "http")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {v!r}")
        return v

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v


# ---------------------------------------------------------------------- layering


class Layer(NamedTuple):
    """One source of settings: where they come from (named in errors) and what it says.
    `keys` maps a field path to the name the user wrote (KVROUTER_LEASE_S, --lease-s)."""

    source: str
    data: Mapping[str, Any]
    keys: Mapping[tuple[str, ...], str] = {}


# The layers of the settings object being built (BaseSettings builds from sources it asks
# its class for, so they travel beside the call rather than through __init__).
_LAYERS: contextvars.ContextVar[tuple[Layer, ...]] = contextvars.ContextVar("kvrouter_layers")


class _LayerSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], layer: Layer) -> None:
        super().__init__(settings_cls)
        self.layer = layer

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.layer.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.layer.data)


class LayeredSettings(BaseSettings):
    """Base of every option type (router, bridge, event plane, sim engine): built from
    layers, lowest first, that pydantic-settings merges deeply (file < KVROUTER_*
    environment < flags for the router) and validated once, by `from_layers`, whose
    ConfigError names each bad field and the layer its value came from. Constructed
    directly with keywords, it validates them like any pydantic model and reads nothing
    else (no environment)."""

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True,
                                      validate_default=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        layers = _LAYERS.get(())
        # Highest priority first: keywords, then the layers from the last to the first.
        return (init_settings, *(_LayerSource(settings_cls, layer) for layer in reversed(layers)))

    @classmethod
    def from_layers(cls, *layers: Layer, what: str = "configuration") -> Self:
        token = _LAYERS.set(layers)
        try:
            return cls()
        except ValidationError as e:
            raise ConfigError(_format_error(e, layers, what)) from None
        finally:
            _LAYERS.reset(token)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: str = "flags",
                    keys: Mapping[tuple[str, ...], str] | None = None,
                    what: str = "options") -> Self:
        """Options from one layer (a command line's flags); `keys` names the flags."""
        return cls.from_layers(Layer(source, values, keys or {}), what=what)


def _lookup(data: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    cur: Any = data
    for part in loc:
        if isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur):
            cur = cur[part]
        elif isinstance(part, str) and isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return False
    return True


def _origin(loc: tuple[str | int, ...], layers: tuple[Layer, ...]) -> str:
    """The highest layer that set the value at `loc` (or a part of the path to it)."""
    for n in range(len(loc), 0, -1):
        for layer in reversed(layers):
            if _lookup(layer.data, loc[:n]):
                key = next((layer.keys[k] for k in (tuple(str(p) for p in loc[:m])
                                                     for m in range(n, 0, -1))
                            if k in layer.keys), None)
                return f"{layer.source}: {key}" if key else layer.source
    return "default"


def _format_error(err: ValidationError, layers: tuple[Layer, ...], what: str) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        lines.append(f"{loc or '<root>'}: {e['msg']} (from {_origin(tuple(e['loc']), layers)})")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


class Config(LayeredSettings):
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


def file_layer(path: str | os.PathLike[str]) -> Layer:
    """A YAML, JSON or TOML file as a layer, read by pydantic-settings' file sources."""
    p = Path(path)
    try:
        with p.open("rb"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
    sources: dict[str, Callable[[], PydanticBaseSettingsSource]] = {
        ".toml": lambda: TomlConfigSettingsSource(Config, toml_file=p),
        ".yaml": lambda: YamlConfigSettingsSource(Config, yaml_file=p),
        ".yml": lambda: YamlConfigSettingsSource(Config, yaml_file=p),
        ".json": lambda: JsonConfigSettingsSource(Config, json_file=p),
    }
    make = sources.get(p.suffix.lower())
    if make is None:
        raise ConfigError(f"config file {p}: unknown format (use .yaml, .yml, .json or .toml)")
    try:
        data = make()()  # the sources read and parse the file when built
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {p} does not parse: {e}") from e
    except (TypeError, ValueError, AttributeError) as e:  # a list or scalar at the top
        raise ConfigError(f"config file {p}: top level must be a table/mapping ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: top level must be a table/mapping")
    return Layer(f"file {p}", data)


def env_layer(env: Mapping[str, str]) -> Layer:
    """KVROUTER_<FIELD> for router fields, KVROUTER_MODELS as JSON. Unknown names are ignored
    (KVROUTER_CONFIG names the file; other tools may share the prefix)."""
    router: dict[str, Any] = {}
    out: dict[str, Any] = {}
    keys: dict[tuple[str, ...], str] = {}
    for name in RouterConfig.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            value: Any = env[key]
            if name == "event_plane":
                value = _json_env(key, value)
            router[name] = value
            keys[("router", name)] = key
    if router:
        out["router"] = router
    if ENV_PREFIX + "MODELS" in env:
        out["models"] = _json_env(ENV_PREFIX + "MODELS", env[ENV_PREFIX + "MODELS"])
        keys[("models",)] = ENV_PREFIX + "MODELS"
    return Layer("environment", out, keys)


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


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flag_names: Mapping[tuple[str, ...], str] | None = None,
) -> Config:
    """Build the configuration. `overrides` (from flags, named in errors by `flag_names`)
    wins over `env` (default os.environ), which wins over the file (`path`, else
    $KVROUTER_CONFIG), which wins over defaults."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    layers = [file_layer(path)] if path else []
    layers += [env_layer(env), Layer("flags", overrides or {}, flag_names or {})]
    return Config.from_layers(*layers)
