"""Engine profile: a calibration file turned into a step cost model.

The calibration files in ../shared/calibration hold raw timings of one model
shape on one GPU: single-prompt and batched prefill, prefill on top of a cached
prefix, decode steps over a (batch, context) grid, and host<->device copies.
The profile keeps those raw points and answers "how long does this engine step
take" by interpolating them:

* prefill of n new tokens with nothing cached: piecewise-linear interpolation of
  the batch-1 points in n (exact at every raw point, linear extrapolation past
  the last one);
* attention over earlier context (a cached prefix or previous chunks): an extra
  ``k * n * context`` term, with ``k`` fitted by least squares to the
  prefix-prefill points (their residuals are kept for inspection);
* decode: for each measured context length a piecewise-linear curve in batch,
  then linear interpolation between context levels (exact at raw points);
* copies: bytes over the measured bandwidth.

Another profile is another file (``EngineProfile.load(path)``).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GiB = 1 << 30

# Total device memory as CUDA reports it (torch.cuda.mem_get_info), by device name
# fragment. Used only to derive a default KV capacity; override with gpu_mem_bytes.
_DEVICE_MEMORY = (
    ("H200", 150_110_011_392),
    ("H100", 85_029_158_912),
    ("A100-SXM4-80GB", 85_097_971_712),
    ("A100", 42_297_524_224),
)

# The measured GPU timings ship with the package (copied from ../shared/calibration) so
# the simulated engine runs on a fresh machine; any other profile file drops in by path.
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_CALIBRATION = PROFILES_DIR / "h100-llama3-8b-shape.json"


class ProfileError(ValueError):
    """The calibration file is missing or does not hold what the cost model needs."""


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), xs ascending; linear extrapolation at both ends."""
    n = len(xs)
    if n == 1:
        return ys[0]
    i = bisect.bisect_right(xs, x)
    if i <= 0:
        i = 1
    elif i >= n:
        i = n - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class RawPoint:
    kind: str  # "prefill" | "prefill_prefix" | "decode"
    batch: int
    new_tokens: int
    cached_tokens: int
    context: int
    seconds: float


@dataclass
class EngineProfile:
    """Cost model of one model on one GPU, built from a calibration file."""

    name: str
    device: str
    kv_bytes_per_token: int
    weight_bytes: int
    gpu_mem_bytes: int
    h2d_bytes_per_s: float
    raw: list[RawPoint]
    source: str = ""
    # fitted / derived, filled by __post_init__
    _pf_x: list[float] = field(default_factory=list, repr=False)
    _pf_y: list[float] = field(default_factory=list, repr=False)
    attn_s_per_token_pair: float = 0.0
    _dec_ctx: list[float] = field(default_factory=list, repr=False)
    _dec_curves: list[tuple[list[float], list[float]]] = field(default_factory=list, repr=False)
    decode_floor_s: float = 0.0

    def __post_init__(self) -> None:
        single = sorted(
            (p for p in self.raw if p.kind == "prefill" and p.batch == 1 and p.cached_tokens == 0),
            key=lambda p: p.new_tokens,
        )
        if len(single) < 2:
            raise ProfileError(f"{self.source}: need >= 2 batch-1 prefill points")
        self._pf_x = [float(p.new_tokens) for p in single]
        self._pf_y = [p.seconds for p in single]
        # Least-squares k for t = t0(n) + k * n * cached over the prefix points (one
        # parameter, closed form). Without prefix points, no context cost is modelled.
        num = den = 0.0
        for p in self.raw:
            if p.kind == "prefill_prefix" and p.cached_tokens > 0:
                x = p.new_tokens * p.cached_tokens
                num += x * (p.seconds - self._prefill0(p.new_tokens))
                den += x * x
        self.attn_s_per_token_pair = max(0.0, num / den) if den else 0.0
        by_ctx: dict[int, list[RawPoint]] = {}
        for p in self.raw:
            if p.kind == "decode":
                by_ctx.setdefault(p.context, []).append(p)
        if not by_ctx:
            raise ProfileError(f"{self.source}: no decode points")
        for ctx in sorted(by_ctx):
            pts = sorted(by_ctx[ctx], key=lambda p: p.batch)
            self._dec_ctx.append(float(ctx))
            self._dec_curves.append(([float(p.batch) for p in pts], [p.seconds for p in pts]))
        self.decode_floor_s = min(p.seconds for p in self.raw if p.kind == "decode")

    # -- loading --------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path = DEFAULT_CALIBRATION,
        gpu_mem_bytes: int | None = None,
        params: float | None = None,
    ) -> EngineProfile:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ProfileError(f"cannot read calibration file {p}: {exc}") from exc
        return cls.from_dict(data, source=str(p), gpu_mem_bytes=gpu_mem_bytes, params=params)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        source: str = "<dict>",
        gpu_mem_bytes: int | None = None,
        params: float | None = None,
    ) -> EngineProfile:
        try:
            name = str(data["model"])
            device = str(data.get("device", "unknown"))
            kv = int(data["kv_bytes_per_token"])
            raw: list[RawPoint] = []
            for r in data.get("prefill", []):
                raw.append(RawPoint("prefill", int(r.get("batch", 1)), int(r["new_tokens"]),
                                    int(r.get("cached_tokens", 0)), 0, float(r["s"])))
            for r in data.get("prefill_prefix", []):
                raw.append(RawPoint("prefill_prefix", int(r.get("batch", 1)), int(r["new_tokens"]),
                                    int(r["cached_tokens"]), 0, float(r["s"])))
            for r in data.get("decode", []):
                raw.append(RawPoint("decode", int(r["batch"]), 0, 0, int(r["context"]),
                                    float(r["s"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{source}: malformed calibration data: {exc!r}") from exc
        if kv <= 0:
            raise ProfileError(f"{source}: kv_bytes_per_token must be > 0")
        if any(p.seconds <= 0 for p in raw):
            raise ProfileError(f"{source}: non-positive timing in calibration data")
        if params is None:
            params = cls._params_of(data, source)
        if gpu_mem_bytes is None:
            gpu_mem_bytes = cls._device_memory(device, source)
        copy = data.get("copy") or {}
        # Without a copy measurement (the 49B file has none), assume a PCIe-5-class link.
        h2d = float(copy.get("h2d_GBps", 50.0)) * 1e9
        return cls(name=name, device=device, kv_bytes_per_token=kv,
                   weight_bytes=int(params * 2),  # bf16 weights
                   gpu_mem_bytes=int(gpu_mem_bytes), h2d_bytes_per_s=h2d,
                   raw=raw, source=source)

    @staticmethod
    def _params_of(data: dict[str, Any], source: str) -> float:
        if "params_B" in data:
            return float(data["params_B"]) * 1e9
        # The H100 file has no parameter count; the model name carries the size.
        m = re.search(r"(\d+(?:\.\d+)?)b", str(data.get("model", "")).lower())
        if not m:
            raise ProfileError(f"{source}: no params_B and no size in the model name")
        return float(m.group(1)) * 1e9

    @staticmethod
    def _device_memory(device: str, source: str) -> int:
        for frag, mem in _DEVICE_MEMORY:
            if frag in device:
                return mem
        raise ProfileError(f"{source}: unknown device {device!r}; pass gpu_mem_bytes")

    # -- capacity ---------------------------------------------------------------
    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """Tokens of KV that fit beside the weights in the usable share of GPU memory."""
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        free = self.gpu_mem_bytes * gpu_memory_utilization - self.weight_bytes
        if free <= 0:
            raise ValueError(f"{self.name} weights do not fit on {self.device}")
        return int(free // self.kv_bytes_per_token)

    # -- timings ----------------------------------------------------------------
    def _prefill0(self, new_tokens: float) -> float:
        return _interp(self._pf_x, self._pf_y, new_tokens)

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One prompt (or chunk) of new_tokens on top of cached_tokens of context."""
        if new_tokens <= 0:
            return 0.0
        return self._prefill0(new_tokens) + self.attn_s_per_token_pair * new_tokens * cached_tokens

    def decode_time(self, batch: int, context: float) -> float:
        """One decode step of `batch` sequences of mean context length `context`."""
        if batch <= 0:
            return 0.0
        vals = [_interp(bx, by, batch) for bx, by in self._dec_curves]
        t = _interp(self._dec_ctx, vals, context)
        return max(t, self.decode_floor_s)

    def step_time(self, prefill_tokens: int, prefill_context_pairs: float, decode_batch: int,
                  decode_context: float) -> float:
        """A mixed step: prefill chunks (total new tokens, sum of new*context) plus decodes.

        The decode part adds only what it costs above the fixed per-step floor, since a
        mixed step is one forward pass (the floor is already paid by the prefill).
        """
        if prefill_tokens <= 0:
            return self.decode_time(decode_batch, decode_context)
        t = self._prefill0(prefill_tokens) + self.attn_s_per_token_pair * prefill_context_pairs
        if decode_batch > 0:
            t += max(0.0, self.decode_time(decode_batch, decode_context) - self.decode_floor_s)
        return t

    def h2d_time(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.h2d_bytes_per_s

    def transfer_time(self, tokens: int, link_bytes_per_s: float) -> float:
        """KV of `tokens` over a link (disaggregated prefill -> decode)."""
        if link_bytes_per_s <= 0:
            raise ValueError("link bandwidth must be > 0")
        return tokens * self.kv_bytes_per_token / link_bytes_per_s

    def predict(self, p: RawPoint) -> float:
        """The model's time for a raw calibration point."""
        if p.kind == "decode":
            return self.decode_time(p.batch, p.context)
        if p.batch > 1:
            # b identical prompts in one step: GEMMs see all tokens, attention is per prompt.
            n = p.new_tokens * p.batch
            return self.step_time(n, p.batch * p.new_tokens * p.cached_tokens, 0, 0.0)
        return self.prefill_time(p.new_tokens, p.cached_tokens)

    def residuals(self) -> list[dict[str, float | int | str]]:
        """Every raw point with the model's prediction and relative error."""
        out: list[dict[str, float | int | str]] = []
        for p in self.raw:
            pred = self.predict(p)
            out.append({"kind": p.kind, "batch": p.batch, "new_tokens": p.new_tokens,
                        "cached_tokens": p.cached_tokens, "context": p.context,
                        "measured_s": p.seconds, "model_s": pred,
                        "rel_err": (pred - p.seconds) / p.seconds})
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "source": self.source,
                "kv_bytes_per_token": self.kv_bytes_per_token, "weight_bytes": self.weight_bytes,
                "gpu_mem_bytes": self.gpu_mem_bytes,
                "kv_capacity_tokens": self.kv_capacity_tokens(),
                "attn_s_per_token_pair": self.attn_s_per_token_pair,
                "max_abs_rel_err": max(abs(float(r["rel_err"])) for r in self.residuals())}
