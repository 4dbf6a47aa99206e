"""Configuration: defaults, YAML/TOML files, environment and flags precedence, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from kvrouter.config import (
    DEFAULT_MODEL,
    ConfigError,
    Layer,
    LayeredSettings,
    load_config,
    parse_model_spec,
)


def test_defaults_serve_one_default_model() -> None:
    cfg = load_config(env={})
    assert cfg.router.listen == "127.0.0.1:50051"
    assert cfg.router.metrics_port == 9400
    assert cfg.router.redis_url is None
    assert [(m.name, m.block_size, m.policy) for m in cfg.models] == [(DEFAULT_MODEL, 16, "kv")]


def test_yaml_and_toml_files(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("router:\n  lease_s: 12\nmodels:\n  - name: llama\n    block_size: 32\n"
                 "    vocab_size: 128256\n    weights: {decode: 2.5}\n")
    t = tmp_path / "c.toml"
    t.write_text('[router]\nlease_s = 12\n[[models]]\nname = "llama"\nblock_size = 32\n'
                 'vocab_size = 128256\nweights = { decode = 2.5 }\n')
    for path in (y, t):
        cfg = load_config(path, env={})
        assert cfg.router.lease_s == 12
        (m,) = cfg.models
        assert (m.name, m.block_size, m.vocab_size, m.weights.decode, m.weights.prefill) == (
            "llama", 32, 128256, 2.5, 1.0)
        kw = m.scheduler_kwargs(cfg.router.lease_s, cfg.router.report_ttl_s)
        assert kw["decode_weight"] == 2.5 and kw["lease_s"] == 12


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("router:\n  lease_s: 10\n  listen: 0.0.0.0:1\n  insecure: true\n  metrics_port: 1\n")
    env = {"KVROUTER_CONFIG": str(f), "KVROUTER_LEASE_S": "20", "KVROUTER_METRICS_PORT": "2",
           "KVROUTER_MODELS": '[{"name": "envmodel", "block_size": 8}]'}
    cfg = load_config(env=env, overrides={"router": {"metrics_port": 3}})
    assert cfg.router.listen == "0.0.0.0:1"  # file
    assert cfg.router.lease_s == 20  # env over file
    assert cfg.router.metrics_port == 3  # flag over env
    assert [m.name for m in cfg.models] == ["envmodel"]
    cfg = load_config(env=env, overrides={"models": [parse_model_spec("flagmodel,block_size=64")]})
    assert [(m.name, m.block_size) for m in cfg.models] == [("flagmodel", 64)]


@pytest.mark.parametrize(("data", "needles"), [
    ("router:\n  lease_s: 0\n", ["router.lease_s", "greater than 0"]),
    ("router:\n  listen: nowhere\n", ["router.listen", "host:port"]),
    ("router:\n  lease: 3\n", ["router.lease", "Extra inputs"]),
    ("models:\n  - name: a\n  - name: b\n    block_size: -4\n", ["models[1].block_size"]),
    ("models:\n  - name: a\n    policy: fastest\n", ["models[0].policy"]),
    ("models:\n  - name: a\n  - name: a\n", ["duplicate model name", "a"]),
    ("models:\n  - block_size: 16\n", ["models[0].name", "required"]),
    ("models:\n  - name: a\n    host_credit: 2\n", ["models[0].host_credit"]),
])
def test_errors_name_the_field(tmp_path: Path, data: str, needles: list[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(data)
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    for needle in needles:
        assert needle in str(e.value)


def test_env_and_flag_errors_are_named() -> None:
    with pytest.raises(ConfigError, match=r"router\.metrics_port"):
        load_config(env={"KVROUTER_METRICS_PORT": "lots"})
    with pytest.raises(ConfigError, match="KVROUTER_MODELS"):
        load_config(env={"KVROUTER_MODELS": "[not json"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_model_spec("m,block_size")


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})
    ini = tmp_path / "c.ini"
    ini.write_text("[router]\n")
    with pytest.raises(ConfigError, match="unknown format"):
        load_config(ini, env={})
    broken = tmp_path / "c.toml"
    broken.write_text("router = [\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(broken, env={})


def test_env_beats_file_and_flags_beat_env_deeply(tmp_path: Path) -> None:
    """Tables merge key by key across layers (event_plane here); lists (models) replace."""
    f = tmp_path / "c.json"
    f.write_text('{"router": {"event_plane": {"namespace": "file", "num_shards": 2},'
                 ' "lease_s": 10}, "models": [{"name": "filemodel"}]}')
    env = {"KVROUTER_EVENT_PLANE": '{"namespace": "env"}', "KVROUTER_LEASE_S": "20"}
    cfg = load_config(f, env=env)
    assert cfg.router.event_plane == {"namespace": "env", "num_shards": 2}
    assert cfg.router.lease_s == 20
    assert [m.name for m in cfg.models] == ["filemodel"]
    cfg = load_config(f, env=env, overrides={"router": {"lease_s": 30,
                                                         "event_plane": {"num_shards": 4}}})
    assert cfg.router.event_plane == {"namespace": "env", "num_shards": 4}
    assert cfg.router.lease_s == 30


def test_a_bad_value_names_its_source(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("router:\n  lease_s: 0\n  metrics_port: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert f"router.lease_s: Input should be greater than 0 (from file {f})" in str(e.value)

    # The environment's value replaces the file's: the error is the environment's.
    with pytest.raises(ConfigError) as e:
        load_config(f, env={"KVROUTER_LEASE_S": "-1"})
    assert "router.lease_s" in str(e.value) and "(from environment: KVROUTER_LEASE_S)" in str(e.value)
    with pytest.raises(ConfigError, match=r"models\[0\]\.policy.*from environment: KVROUTER_MODELS"):
        load_config(env={"KVROUTER_MODELS": '[{"name": "m", "policy": "fastest"}]'})

    # A flag's value replaces both, and is named by the flag when the caller says which.
    with pytest.raises(ConfigError) as e:
        load_config(f, env={"KVROUTER_LEASE_S": "5"}, overrides={"router": {"lease_s": -2}},
                    flag_names={("router", "lease_s"): "--lease-s"})
    assert "(from flags: --lease-s)" in str(e.value)
    # Only the bad value is reported, with its own source.
    assert "metrics_port" not in str(e.value)


def test_serve_names_the_bad_flag(kvrouter_cli: Any) -> None:
    r = kvrouter_cli("serve", "--lease-s", "0", "--model", "m,block_size=0", "--print-config")
    assert r.returncode == 2
    assert "router.lease_s" in r.stderr and "(from flags: --lease-s)" in r.stderr
    assert "models[0].block_size" in r.stderr and "(from flags: --model)" in r.stderr


class _Options(LayeredSettings):
    size: int = Field(default=1, gt=0)
    name: str = "x"


def test_other_option_types_validate_by_the_same_path() -> None:
    assert _Options.from_values({"size": 3}).size == 3
    assert _Options(size=2).size == 2  # plain keywords validate too (and read no environment)
    with pytest.raises(ConfigError, match=r"size: Input should be greater than 0 \(from flags: --size\)"):
        _Options.from_values({"size": 0}, keys={("size",): "--size"})
    with pytest.raises(ConfigError, match=r"colour: Extra inputs are not permitted \(from flags\)"):
        _Options.from_values({"colour": "red"})
    with pytest.raises(ConfigError, match=r"size.*from environment"):
        _Options.from_layers(Layer("file f", {"size": 2}), Layer("environment", {"size": -1}))
