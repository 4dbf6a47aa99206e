"""The router's OpenAI-compatible HTTP front in front of the two real vLLM CPU servers of
the session fleet, with the official `openai` SDK as the client on both sides: what the
front answers is compared with what vLLM itself answers for the same request on the
worker the router chose (prompt length, cached_tokens, greedy text, chat template)."""

from __future__ import annotations

import random
from typing import Any

import openai
import pytest

from kvrouter.http.tokenizer import ModelTokenizer
from kvrouter.testing.vllm_harness import MODEL_NAME, VllmFleet
from tests.vllm_e2e.conftest import VllmFleetDriver

pytestmark = pytest.mark.vllm


def _sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
                    for _ in range(n))


def _worker_url(fleet: VllmFleet, name: str) -> str:
    return next(w.base_url for w in fleet.workers if w.name == name)


def test_completions_text_ids_and_cached_tokens(vllm_fleet: VllmFleet,
                                                driver: VllmFleetDriver) -> None:
    front = _sdk(vllm_fleet.router_http_url)
    assert vllm_fleet.model_dir is not None
    tok = ModelTokenizer.load(vllm_fleet.model_dir)
    text = _words(1, 40)
    ids = tok.encode(text)
    assert 64 < len(ids) < 200  # several engine blocks (32 tokens), under max_model_len
    raw = front.completions.with_raw_response.create(model=MODEL_NAME, prompt=text,
                                                     max_tokens=4, temperature=0)
    first = raw.parse()
    worker = raw.headers["x-kvrouter-worker"]
    assert first.usage is not None and first.usage.prompt_tokens == len(ids)
    driver.settle(worker)  # the stored blocks reached the router: the next call goes there
    raw = front.completions.with_raw_response.create(model=MODEL_NAME, prompt=ids,
                                                     max_tokens=4, temperature=0)
    again = raw.parse()
    assert raw.headers["x-kvrouter-worker"] == worker
    direct = _sdk(_worker_url(vllm_fleet, worker)).completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert again.usage is not None and direct.usage is not None
    assert again.usage.prompt_tokens == direct.usage.prompt_tokens == len(ids)
    ours, theirs = again.usage.prompt_tokens_details, direct.usage.prompt_tokens_details
    assert ours is not None and theirs is not None
    assert ours.cached_tokens == theirs.cached_tokens  # what vLLM itself reports
    assert ours.cached_tokens is not None and ours.cached_tokens >= 32
    assert again.choices[0].text == direct.choices[0].text  # greedy, same prompt ids


def test_chat_with_the_tiny_models_template(vllm_fleet: VllmFleet,
                                            driver: VllmFleetDriver) -> None:
    front = _sdk(vllm_fleet.router_http_url)
    msgs: list[Any] = [{"role": "system", "content": _words(2, 5)},
                       {"role": "user", "content": _words(3, 25)}]
    raw = front.chat.completions.with_raw_response.create(model=MODEL_NAME, messages=msgs,
                                                          max_tokens=6, temperature=0)
    ours = raw.parse()
    worker = raw.headers["x-kvrouter-worker"]
    # vLLM renders the same template (tokenizer_config.json) for the same messages
    theirs = _sdk(_worker_url(vllm_fleet, worker)).chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0)
    assert ours.usage is not None and theirs.usage is not None
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason
    driver.settle(worker)
    chunks = list(front.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ours.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == theirs.usage.prompt_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens  # the prompt's blocks were cached


def test_bad_input_against_real_engines(vllm_fleet: VllmFleet, driver: VllmFleetDriver) -> None:
    front = _sdk(vllm_fleet.router_http_url)
    with pytest.raises(openai.NotFoundError):
        front.completions.create(model="not-" + MODEL_NAME, prompt="abc", max_tokens=1)
    # over vLLM's --max-model-len (256; the tokenizer allows more): vLLM refuses, the
    # router passes its 400 on, and nothing stays reserved
    with pytest.raises(openai.BadRequestError):
        front.completions.create(model=MODEL_NAME, prompt=[5] * 300, max_tokens=4)
    assert not any(w.reserved_requests for w in driver.router.list_workers(MODEL_NAME))
