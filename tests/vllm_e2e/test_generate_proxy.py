"""Router.Generate in proxy mode in front of real vLLM servers: the router picks the
worker, forwards the prompt token ids over vLLM's OpenAI completions API, streams the
tokens back, and reserves and releases load around the call."""

from __future__ import annotations

from kvrouter._proto.v1 import common_pb2, router_pb2
from kvrouter.testing.vllm_harness import MODEL_NAME
from tests.vllm_e2e.conftest import VllmFleetDriver


def _generate(driver: VllmFleetDriver, prompt: list[int], max_tokens: int) -> tuple[list[int], dict[str, str]]:
    req = router_pb2.RouterGenerateRequest(
        model=MODEL_NAME, token_ids=prompt, mode=router_pb2.GENERATE_MODE_AGGREGATED,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    call = driver.router.stub.Generate(req, timeout=120)
    tokens: list[int] = []
    finished = False
    for resp in call:
        tokens += list(resp.token_ids)
        finished = finished or resp.finished
    assert finished, "the stream ended without a finished response"
    return tokens, dict(call.trailing_metadata() or ())


def test_generate_streams_from_real_vllm_and_releases_load(driver: VllmFleetDriver) -> None:
    prompt = driver.tokens(100)  # 6 full router blocks of 16
    tokens, meta = _generate(driver, prompt, max_tokens=8)
    assert len(tokens) == 8
    assert meta["kvrouter-path"] == "aggregated"
    worker = meta["kvrouter-worker"]
    assert worker in {w.name for w in driver.fleet.workers}
    # The same prompt sent straight to that engine gives the same greedy tokens.
    direct = driver.complete(worker, prompt, max_tokens=8)
    assert direct.output == tokens
    # Nothing stays reserved once the stream is over.
    for w in driver.router.list_workers(MODEL_NAME):
        assert w.reserved_requests == 0, w
    # The engine cached the prompt, the router indexed it, and the next request with
    # this prefix goes to the same worker through the proxy.
    driver.wait_for("prompt indexed", lambda: driver.overlap(worker, prompt) >= 3)
    _, again = _generate(driver, prompt + driver.tokens(20), max_tokens=2)
    assert again["kvrouter-worker"] == worker
