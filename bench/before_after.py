"""Before/after in one run: a benchmark on a baseline revision and on this tree, interleaved.

A refactor must not slow the hot paths. This builds the baseline revision's extension
in a throwaway worktree (or reuses one given with --baseline-dir), then runs each
named benchmark alternately on the baseline and on the working tree (`--rounds`
times each, so machine noise hits both sides alike) and reports per metric the
median of each side and their ratio (after / before).

    python -m bench.before_after --baseline-rev HEAD~20 --benches "indexer service:--quick" \
        --json bench/results/before-after.json --after-dir bench/results

A benchmark's own arguments follow its name after a colon, comma-separated
(`service:--quick`). With --after-dir, each benchmark's last run on this tree is
also written there as its usual result file (`service-quick.json`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.common import REPO, SHARED, machine, table, write_json

# The figures a person compares per benchmark (dotted JSON paths; * matches one level).
HEADLINES: dict[str, list[str]] = {
    "indexer": ["runs.*.kvrouter.ingest_blocks_per_s", "runs.*.kvrouter.query_p50_us",
                "runs.*.kvrouter.query_p99_us", "runs.*.kvrouter.bytes_per_block"],
    "service": ["inproc.route_p*", "grpc.unary_rps", "grpc.unary_p99_ms_at_half_load",
                "grpc.stream_rps", "grpc.stream_rps_unbatched"],
    "events": ["ingest_blocks_per_s", "ingest_blocks_per_s_tokens", "lag_p50_ms", "lag_p99_ms",
               "cold_start_s_1m_blocks"],
}
# Lower is better where the metric's name holds one of these; higher for the rest (throughputs).
LOWER_IS_BETTER = ("_us", "_ms", "bytes_per", "cold_start")


def build_baseline(rev: str, workdir: Path) -> Path:
    """A worktree of `rev` with its extension built into python/kvrouter (release)."""
    tree = workdir / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), rev],
                   check=True, capture_output=True)
    wheels = workdir / "wheels"
    print(f"before_after: building the extension of {rev} (release; a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "maturin", "build", "--release", "-q", "-o", str(wheels)],
                   cwd=tree, check=True)
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if n.startswith("kvrouter/_core"))
        (tree / "python" / "kvrouter" / Path(so).name).write_bytes(z.read(so))
    return tree


def run_bench(name: str, tree: Path | None, extra: list[str], out: Path) -> dict[str, Any]:
    """One run of bench.<name>: on the baseline tree (its own bench code and package) or here."""
    env = dict(os.environ)
    cwd = REPO
    if tree is not None:
        # The baseline is not installed: its package and benches come from its worktree.
        env["PYTHONPATH"] = f"{tree / 'python'}{os.pathsep}{tree}"
        env.setdefault("KVROUTER_SHARED", str(SHARED))  # the worktree has no ../shared beside it
        cwd = tree
    subprocess.run([sys.executable, "-m", f"bench.{name}", *extra, "--json", str(out)],
                   cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix] = float(d)
    return out


def headline_keys(name: str, keys: list[str]) -> list[str]:
    pats = HEADLINES.get(name, ["*"])
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in pats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--baseline-rev", help="git revision to compare against (built here)")
    src.add_argument("--baseline-dir", type=Path,
                     help="a checkout whose python/kvrouter already holds its built extension")
    ap.add_argument("--benches", default="indexer service:--quick",
                    help="benchmarks to run, separated by spaces or ';': NAME[:ARG,ARG...]")
    ap.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--after-dir", type=Path, default=None,
                    help="also write each benchmark's last after-run result here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "before_after", "machine": machine(), "rounds": args.rounds,
                              "benches": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.baseline_rev:
            tree = build_baseline(args.baseline_rev, tmp)
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline_rev],
                                 capture_output=True, text=True, check=True).stdout.strip()
        else:
            tree = args.baseline_dir.resolve()
            rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, check=False).stdout.strip() or "unknown"
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        result.update({"baseline": rev, "after": head + (" (+ working tree)" if subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet"], check=False).returncode else "")})
        specs = [b for b in args.benches.replace(";", " ").split() if b]
        try:
            for spec in specs:
                name, _, argstr = spec.partition(":")
                extra = [a for a in argstr.split(",") if a]
                sides: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
                for i in range(args.rounds):
                    for side, t in (("before", tree), ("after", None)):
                        print(f"before_after: {name} {side} round {i + 1}/{args.rounds}",
                              file=sys.stderr, flush=True)
                        sides[side].append(flatten(run_bench(name, t, extra, tmp / f"{name}-{side}-{i}.json")))
                if args.after_dir is not None:
                    args.after_dir.mkdir(parents=True, exist_ok=True)
                    last = tmp / f"{name}-after-{args.rounds - 1}.json"
                    suffix = "-quick" if "--quick" in extra else ""
                    (args.after_dir / f"{name}{suffix}.json").write_text(last.read_text())
                common = sorted(set(sides["before"][0]) & set(sides["after"][0]))
                rows, per_key = [], {}
                for k in headline_keys(name, common):
                    b = statistics.median(r[k] for r in sides["before"] if k in r)
                    a = statistics.median(r[k] for r in sides["after"] if k in r)
                    ratio = a / b if b else float("nan")
                    lower = any(t in k.rsplit(".", 1)[-1] for t in LOWER_IS_BETTER)
                    better = ratio <= 1.0 if lower else ratio >= 1.0
                    per_key[k] = {"before": b, "after": a, "after_over_before": ratio}
                    rows.append([k, b, a, ratio, "better" if better else "worse"])
                result["benches"][name] = {"args": extra, "headlines": per_key, "raw": sides}
                print(f"\n{name}: median of {args.rounds} interleaved runs per side")
                print(table(rows, ["metric", "before", "after", "after/before", ""]))
        finally:
            if args.baseline_rev:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               check=False, capture_output=True)
    result["wall_s"] = time.perf_counter() - t0
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
