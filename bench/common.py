"""Helpers shared by every benchmark: machine description, percentiles, output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvrouter.shared_data import shared_dir

REPO = Path(__file__).resolve().parent.parent
SHARED = shared_dir()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0-100); NaN for no values."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()) if len(arr) else float("nan"), "p50": pct(arr, 50),
            "p90": pct(arr, 90), "p99": pct(arr, 99)}


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")


def table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table for the terminal."""
    body = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


def progress(done: int, total: int, label: str) -> None:
    """A one-line progress indicator on stderr (long work shows progress)."""
    if total <= 0:
        return
    step = max(1, total // 20)
    if done % step == 0 or done == total:
        sys.stderr.write(f"\r{label}: {done}/{total} ({100 * done // total}%)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
