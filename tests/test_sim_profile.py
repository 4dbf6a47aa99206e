"""Cost model of the simulated engine against the raw calibration points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile, ProfileError

CAL_DIR = DEFAULT_CALIBRATION.parent


@pytest.fixture(scope="module")
def profile() -> EngineProfile:
    return EngineProfile.load(DEFAULT_CALIBRATION)


def test_exact_at_single_prompt_and_decode_points(profile: EngineProfile) -> None:
    raw = json.loads(DEFAULT_CALIBRATION.read_text())
    for p in raw["prefill"]:
        if p["batch"] == 1 and p["cached_tokens"] == 0:
            assert profile.prefill_time(p["new_tokens"]) == pytest.approx(p["s"], rel=1e-9)
    for p in raw["decode"]:
        assert profile.decode_time(p["batch"], p["context"]) == pytest.approx(p["s"], rel=1e-9)


def test_prefix_and_batched_points_within_tolerance(profile: EngineProfile) -> None:
    res = profile.residuals()
    assert len(res) == len(profile.raw)  # every raw point is kept and checked
    for r in res:
        assert abs(float(r["rel_err"])) < 0.2, r


def test_interpolates_between_points_and_is_monotone(profile: EngineProfile) -> None:
    a, b = profile.prefill_time(4096), profile.prefill_time(8192)
    mid = profile.prefill_time(6144)
    assert a < mid < b
    assert mid == pytest.approx((a + b) / 2)
    # cached context makes new tokens more expensive, but far cheaper than recomputing it
    assert profile.prefill_time(1024) < profile.prefill_time(1024, 4096) < profile.prefill_time(5120)
    # decode grows with batch and with context, also beyond the measured range
    assert profile.decode_time(8, 1024) < profile.decode_time(64, 1024) < profile.decode_time(512, 1024)
    assert profile.decode_time(8, 1024) < profile.decode_time(8, 8192) < profile.decode_time(8, 32768)


def test_step_time_mixes_prefill_and_decode(profile: EngineProfile) -> None:
    pf = profile.step_time(2048, 0.0, 0, 0.0)
    assert pf == pytest.approx(profile.prefill_time(2048))
    mixed = profile.step_time(2048, 0.0, 64, 4096)
    assert pf < mixed < pf + profile.decode_time(64, 4096)
    assert profile.step_time(0, 0.0, 64, 4096) == profile.decode_time(64, 4096)


def test_capacity_and_copies(profile: EngineProfile) -> None:
    free = profile.gpu_mem_bytes * 0.9 - profile.weight_bytes
    assert profile.kv_capacity_tokens() == int(free // 131072)
    assert profile.kv_capacity_tokens(1.0) > profile.kv_capacity_tokens(0.5)
    # 1 GiB at the measured ~54 GB/s
    assert profile.h2d_time(8192) == pytest.approx(8192 * 131072 / profile.h2d_bytes_per_s)
    assert 0.015 < profile.h2d_time(8192) < 0.025
    with pytest.raises(ValueError):
        profile.kv_capacity_tokens(0.0)


@pytest.mark.parametrize("name", ["h200-llama3-8b-shape.json", "h200-llama-49b-shape.json"])
def test_other_profiles_drop_in(name: str) -> None:
    p = EngineProfile.load(CAL_DIR / name)
    assert p.kv_capacity_tokens() > 0
    assert max(abs(float(r["rel_err"])) for r in p.residuals()) < 0.25


def test_bad_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ProfileError):
        EngineProfile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError):
        EngineProfile.load(bad)
    data = json.loads(DEFAULT_CALIBRATION.read_text())
    del data["decode"]
    no_decode = tmp_path / "nodecode.json"
    no_decode.write_text(json.dumps(data))
    with pytest.raises(ProfileError):
        EngineProfile.load(no_decode)
    data = json.loads(DEFAULT_CALIBRATION.read_text())
    data["device"] = "Mystery GPU"
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(data))
    with pytest.raises(ProfileError):
        EngineProfile.load(odd)
    assert EngineProfile.load(odd, gpu_mem_bytes=80 << 30).gpu_mem_bytes == 80 << 30
