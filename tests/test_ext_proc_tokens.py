"""The endpoint picker tokenises OpenAI bodies with the model's tokenizer (the HTTP front's
kvrouter.http.tokenizer: text prompts, chat templates), so it routes on the same token ids the
front and the engine see. Message sequences as in tests/test_ext_proc.py (its docstring cites
the protocol documents)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvrouter.client import RouterClient
from kvrouter.http.tokenizer import ModelTokenizer, build_sim_tokenizer
from kvrouter.testing.processes import free_port
from kvrouter.testing.wait import wait_until
from tests.ext_proc_helpers import (
    BS,
    ENDPOINTS,
    Envoy,
    body_chunks,
    header_value,
    idle,
    request_headers,
)

VOCAB = 4000
WORDS = "the router sends every session to the worker that holds its prefix cache " * 20


@pytest.fixture(scope="module")
def setup(module_router_server: Callable[..., Any], block_store_class: type,
          tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[tuple[RouterClient, str, ModelTokenizer, Any]]:
    tok_dir = build_sim_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB, 8192)
    port = free_port()
    cfg = {"router": {"heartbeat_timeout_s": 0},
           "models": [{"name": "default", "block_size": BS, "vocab_size": VOCAB,
                       "tokenizer": str(tok_dir)}]}
    router = module_router_server(cfg, args=("--ext-proc", f"127.0.0.1:{port}"))
    client = RouterClient(router.target)
    for name, ep in ENDPOINTS.items():
        client.register_worker("default", name, address=f"http://{ep}/v1", block_size=BS)
    yield client, f"127.0.0.1:{port}", ModelTokenizer.load(tok_dir), block_store_class()
    client.close()


def pick(target: str, body: dict[str, Any]) -> Any:
    env = Envoy(target)
    try:
        env.send(request_headers(path="/v1/chat/completions" if "messages" in body
                                 else "/v1/completions"))
        env.send(body_chunks(json.dumps(body).encode(), 1 << 20)[0])
        return env.recv()
    finally:
        env.close()


def test_chat_messages_route_on_the_templates_tokens(setup: Any) -> None:
    client, target, tok, blocks = setup
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": WORDS}]
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    assert len(ids) >= 4 * BS
    blocks(client, "default", "w3", ids, BS)  # only the rendered template's ids match these
    r = pick(target, {"model": "default", "messages": messages, "max_tokens": 4})
    dest = header_value(r.request_headers.response, "x-gateway-destination-endpoint")
    # the worker's endpoint is its registered URL's host:port
    assert dest is not None and dest.split(",")[0] == ENDPOINTS["w3"]
    wait_until(lambda: idle(client), 10, what="reservation released")


def test_text_prompt_routes_on_its_tokens(setup: Any) -> None:
    client, target, tok, blocks = setup
    text = "prefix " + WORDS
    blocks(client, "default", "w2", tok.encode(text, add_special_tokens=True), BS)
    r = pick(target, {"model": "default", "prompt": text, "max_tokens": 4})
    dest = header_value(r.request_headers.response, "x-gateway-destination-endpoint")
    assert dest is not None and dest.split(",")[0] == ENDPOINTS["w2"]
    wait_until(lambda: idle(client), 10, what="reservation released")


@pytest.mark.parametrize(("body", "says"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
    ({"messages": "hi"}, "messages must be"),
    ({"messages": []}, "messages must be"),
    ({"prompt": ["a", "b"]}, "batched"),
    ({"prompt": {"text": "a"}}, "prompt"),
])
def test_bodies_that_do_not_tokenise_are_400(setup: Any, body: dict[str, Any],
                                             says: str) -> None:
    client, target, _, _ = setup
    r = pick(target, {"model": "default", **body})
    assert r.immediate_response.status.code == 400
    assert says in json.loads(r.immediate_response.body)["error"]["message"]
    assert idle(client)


def test_token_id_prompts_need_no_tokenizer(setup: Any) -> None:
    client, target, _, _ = setup
    r = pick(target, {"model": "default", "prompt": [5, 6, 7], "max_tokens": 2})
    assert header_value(r.request_headers.response, "x-gateway-destination-endpoint")
    wait_until(lambda: idle(client), 10, what="reservation released")
