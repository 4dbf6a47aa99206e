"""bench/routing on a few requests: every variant runs, the JSON carries the per-cell
targets and saturation figures, kv_admission serves every request (nothing shed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

routing = pytest.importorskip("bench.routing")


def test_quick_slice_writes_every_cell(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert routing.main(["--traces", "synthetic", "--limit", "60", "--workers", "2",
                         "--speedups", "1,16", "--scale-sizes", "", "--no-dynamo",
                         "--json", str(out), "--plot-dir", str(tmp_path)]) == 0
    d = json.loads(out.read_text())
    assert d["kv_weights"]["pending_ttl_s"] > 0
    tres = d["results"]["synthetic"]
    pf = tres["prefill_gpu_s_dynamo_capacity"]["2"]
    assert 0 < pf["oracle_hits_gpu_s"] <= pf["no_hits_gpu_s"]
    for sp in ("1", "16"):
        cell = tres["2"][sp]
        util = cell["saturation"]["oracle_prefill_utilisation"]
        assert util == pytest.approx(pf["oracle_hits_gpu_s"] * float(sp)
                                     / (2 * tres["duration_s"]))
        ours = cell["dynamo_default"]
        for run in routing.RUNS:
            assert ours[run]["completed"] == 60, run
        t = d["targets_cells"][f"synthetic/2/{sp}x"]
        assert t["kv_hit_over_oracle"] == ours["kv"]["hit_over_oracle"]
        assert t["past_saturation"] == (util > 1.0)
        assert t["dynamo_ttft_gain"] is None and not t["meets_gain_target"]
