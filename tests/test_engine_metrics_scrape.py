"""Prometheus load scrapes of vLLM and SGLang, on sample /metrics texts in the
engines' exposition format."""

from __future__ import annotations

import pytest

from kvrouter.engines.vllm.metrics_scrape import (
    BridgedEngine,
    EngineLoad,
    ScrapeError,
    parse_load,
    scrape_to_load_report,
)
from kvrouter.events.model import LoadReport

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 5.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="tiny"} 0.75
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="12"} 1.0
vllm:cache_config_info{block_size="32",engine="1",num_gpu_blocks="12"} 1.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 1234.0
"""

VLLM_OLD = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""

SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 7.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 2.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",tp_rank="0"} 0.5
# HELP sglang:max_total_num_tokens Maximum total number of tokens.
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="qwen",tp_rank="0"} 8192.0
"""


def test_vllm_one_engine_by_label() -> None:
    load = parse_load(VLLM, BridgedEngine.VLLM, labels={"engine": "0"})
    assert load == EngineLoad(running=3, queued=5, kv_usage=0.25, total_blocks=12)
    assert load.to_load_report() == LoadReport(running=3, queued=5, kv_used_blocks=3,
                                               kv_free_blocks=9, kv_capacity_blocks=12)


def test_vllm_all_engines_add_up() -> None:
    report = scrape_to_load_report(VLLM, "vllm")
    # 4 running, 5 waiting; usage averaged (0.5) over 24 blocks in all.
    assert report == LoadReport(running=4, queued=5, kv_used_blocks=12, kv_free_blocks=12,
                                kv_capacity_blocks=24)


def test_vllm_older_usage_name_and_unknown_total() -> None:
    load = parse_load(VLLM_OLD, BridgedEngine.VLLM)
    assert load == EngineLoad(running=2, queued=1, kv_usage=0.5, total_blocks=None)
    # No total: block counts unknown (0), never guessed.
    assert load.to_load_report() == LoadReport(running=2, queued=1)
    assert scrape_to_load_report(VLLM_OLD, BridgedEngine.VLLM, total_blocks=100) == LoadReport(
        running=2, queued=1, kv_used_blocks=50, kv_free_blocks=50, kv_capacity_blocks=100)


def test_sglang() -> None:
    load = parse_load(SGLANG, BridgedEngine.SGLANG, block_size=16)
    assert load == EngineLoad(running=7, queued=2, kv_usage=0.5, total_blocks=512)
    assert load.to_load_report() == LoadReport(running=7, queued=2, kv_used_blocks=256,
                                               kv_free_blocks=256, kv_capacity_blocks=512)
    # Without the block size the total is unknown.
    assert parse_load(SGLANG, BridgedEngine.SGLANG).total_blocks is None


@pytest.mark.parametrize(
    ("text", "engine", "labels", "match"),
    [
        (SGLANG, BridgedEngine.VLLM, None, "vllm metrics lack vllm:num_requests_running"),
        (VLLM, BridgedEngine.SGLANG, None, "sglang metrics lack sglang:num_running_reqs"),
        (VLLM, BridgedEngine.VLLM, {"engine": "7"}, "for labels"),
        ("vllm:num_requests_running{engine= 3 4\n", BridgedEngine.VLLM, None, "not Prometheus"),
        (VLLM_OLD.replace("0.5", "1.5"), BridgedEngine.VLLM, None, "not a fraction"),
        (VLLM_OLD.replace("2.0", "-2.0"), BridgedEngine.VLLM, None, "expected a count"),
        (VLLM_OLD.replace("2.0", "NaN"), BridgedEngine.VLLM, None, "expected a count"),
    ],
)
def test_bad_scrapes(text: str, engine: BridgedEngine, labels: dict[str, str] | None,
                     match: str) -> None:
    with pytest.raises(ScrapeError, match=match):
        parse_load(text, engine, labels=labels)


def test_unknown_engine_name() -> None:
    with pytest.raises(ValueError):
        parse_load(VLLM, "tgi")
