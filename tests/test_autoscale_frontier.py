"""`kvrouter frontier`: bench/disagg's sweep for one workload, with the planner's split marked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvrouter.autoscale.frontier import FrontierError, _bench_disagg, planner_split
from kvrouter.autoscale.sizing import PerfModel
from kvrouter.cli import main
from kvrouter.engines.sim import EngineConfig, EngineProfile


def test_frontier_writes_points_table_and_plot(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fr"
    rc = main(["frontier", "--workload", "3k_150", "--quick", "--splits", "4,12",
               "--max-users", "32", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "frontier.json").read_text())
    assert set(r["points"]) == {"aggregated", "disaggregated"}
    labels = {p["label"] for p in r["points"]["disaggregated"]}
    assert labels == {"4P:12D", "12P:4D"}
    split = r["planner_split"]
    assert split["prefill"] + split["decode"] == 16
    assert all(f for f in r["frontier"].values())
    text = (out / "frontier.txt").read_text()
    mark = f"{split['prefill']}P:{split['decode']}D"
    marked = [ln for ln in text.splitlines() if ln.rstrip().endswith("*")]
    assert all(mark in ln for ln in marked)
    assert (out / "frontier.png").stat().st_size > 0
    assert "planner's split" in capsys.readouterr().out


def test_planner_split_follows_the_mix() -> None:
    perf = PerfModel(EngineProfile.load(), EngineConfig(max_num_seqs=1024))
    long_in = planner_split(perf, (32768, 200), 16, 0.05)
    long_out = planner_split(perf, (200, 1000), 16, 0.05)
    assert long_in[0] > long_out[0]  # prefill-heavy work gets more prefill GPUs
    assert sum(long_in) == sum(long_out) == 16


def test_frontier_refuses_bad_arguments(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frontier", "--workload", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown workload" in capsys.readouterr().err
    assert main(["frontier", "--workload", "3k_150", "--splits", "0,16",
                 "--out", str(tmp_path)]) == 1
    assert "--splits" in capsys.readouterr().err
    assert not (tmp_path / "frontier.json").exists()


def test_frontier_says_when_bench_is_not_importable(tmp_path: Path) -> None:
    with pytest.raises(FrontierError, match=r"not part of the installed package .*checkout"):
        _bench_disagg(tmp_path)  # an installed package: no bench/ next to it
    # a checkout without the bench extra: a clear message, no traceback, nothing written
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from kvrouter.cli import main\n"
            f"sys.exit(main(['frontier', '--workload', '3k_150', '--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "cannot import bench/disagg.py" in r.stderr and "'.[bench]'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "frontier.json").exists()
