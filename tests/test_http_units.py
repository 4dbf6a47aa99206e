"""Pure pieces of the HTTP front: stop strings over streamed tokens, the status table, the
sandboxed chat template, the simulated models' tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from kvrouter.http.errors import STATUS_TABLE, HttpError
from kvrouter.http.server import _Choice
from kvrouter.http.tokenizer import (
    SIMPLE_CHAT_TEMPLATE,
    ModelTokenizer,
    TemplateError,
    TokenizerError,
    build_sim_tokenizer,
)

VOCAB = 600  # small: trains in a fraction of a second


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sim_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB, 64)


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(tok_dir)


def test_sim_tokenizer_is_deterministic_and_fills_the_vocabulary(
        tmp_path: Path, tok_dir: Path, tok: ModelTokenizer) -> None:
    again = build_sim_tokenizer(tmp_path / "again", VOCAB)
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert tok.vocab_size == VOCAB and tok.model_max_length == 64 and tok.eos_token_id == 2
    text = "hello there general"
    assert tok.decode(tok.encode(text)) == text


def _feed(c: _Choice, tok: ModelTokenizer, text: str) -> list[str]:
    """Feed text token by token as an engine streams it; what the client receives."""
    sent = []
    for t in tok.encode(text):
        c.feed([t])
        piece = c.take(c.finish_reason is not None)
        if piece:
            sent.append(piece)
        if c.finish_reason:
            break
    if c.finish_reason is None:
        sent.append(c.take(True))
    return sent


def test_stop_string_spanning_tokens_ends_the_choice(tok: ModelTokenizer) -> None:
    c = _Choice(0, tok.decoder(), ["xyz qq"])
    sent = _feed(c, tok, "abc def xyz qq ghi jkl")
    assert "".join(sent) == "abc def " == c.text
    assert c.finish_reason == "stop"
    assert c.tokens < len(tok.encode("abc def xyz qq ghi jkl"))  # nothing counted after it


def test_held_back_text_is_released_when_no_stop_matches(tok: ModelTokenizer) -> None:
    c = _Choice(0, tok.decoder(), ["xyzzy"])
    sent = _feed(c, tok, "abc xyz abc")  # "xyz" looks like the stop's start, then is not
    assert "".join(sent) == "abc xyz abc" and c.finish_reason is None


def test_without_a_tokenizer_tokens_are_counted_only() -> None:
    c = _Choice(0, None, [])
    c.feed([1, 2, 3])
    assert c.tokens == 3 and c.text == "" and c.token_ids == [1, 2, 3]


def test_chat_template_renders_like_engines(tok: ModelTokenizer) -> None:
    out = tok.render_chat([{"role": "user", "content": "hi"}])
    assert out == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert tok.render_chat([{"role": "user", "content": "hi"}],
                           add_generation_prompt=False).endswith("</s>\n")
    # the template wrote BOS: encoding adds no second one
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(1) == 1 and ids[0] == 1


def test_template_errors_and_the_sandbox(tmp_path: Path, tok: ModelTokenizer) -> None:
    with pytest.raises(TemplateError, match="unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    sandboxed = ModelTokenizer(tokenizer=tok.tokenizer, chat_template=evil, source="t")
    with pytest.raises(TemplateError):
        sandboxed.render_chat([{"role": "user", "content": "x"}])
    mutating = ModelTokenizer(tokenizer=tok.tokenizer,
                              chat_template="{{ messages.append(1) }}", source="t")
    with pytest.raises(TemplateError):  # immutable: a template cannot change the request
        mutating.render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="does not compile"):
        ModelTokenizer(tokenizer=tok.tokenizer, chat_template="{% for %}", source="t")


def test_tokenizer_config_forms(tmp_path: Path, tok: ModelTokenizer) -> None:
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "model_max_length": int(1e30),  # transformers' "unknown"
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": SIMPLE_CHAT_TEMPLATE}]}))
    t = ModelTokenizer.load(tmp_path)
    assert t.model_max_length is None and t.special_tokens == {"bos_token": "<s>",
                                                               "eos_token": "</s>"}
    assert t.render_chat([{"role": "user", "content": "a"}]).startswith("<s><|user|>")
    with pytest.raises(TokenizerError, match="cannot load"):
        ModelTokenizer.load(tmp_path / "missing")


def test_status_table() -> None:
    want = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503}
    for code, status in want.items():
        assert STATUS_TABLE[code].status == status
    e = HttpError.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    assert e.headers()["Retry-After"] == "1" and e.body()["error"]["type"] == "rate_limit_error"

    class Shed(Exception):  # admission control's error carries a retry hint
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        message = "queue full"
        retry_after_s = 2.2

    e = HttpError.from_exception(Shed())
    assert (e.status, e.headers()["Retry-After"], e.message) == (429, "3", "queue full")
    assert HttpError.from_exception(RuntimeError("x")).status == 500
    assert "Retry-After" not in HttpError.from_status(grpc.StatusCode.UNAVAILABLE, "x").headers()


def test_mid_stream_chunk_bytes_equal_the_dict_encoding() -> None:
    """The streaming hot path writes pre-encoded bytes around the text: they must be the
    very bytes json would give for the chunk's choice (OpenAI's format, key order kept)."""
    from kvrouter.http.server import _dumps, _json_str, _mid_chunk

    for chat in (False, True):
        for i in (0, 7, 63):
            for text in ["", 'h\u00e9llo "x"\n\u2028\x00\\', "a", "\U0001f600 </script>"]:
                item: dict[str, object] = (
                    {"index": i, "delta": {"content": text}, "logprobs": None,
                     "finish_reason": None} if chat else
                    {"index": i, "text": text, "logprobs": None, "finish_reason": None})
                pre, post = _mid_chunk(i, chat)
                assert pre + _json_str(text).encode() + post == _dumps(item)
                assert _dumps(item) == json.dumps(item, separators=(",", ":"),
                                                  ensure_ascii=False).encode()


def test_streamed_choice_sends_what_the_whole_text_holds(tok: ModelTokenizer) -> None:
    """A streamed choice without stop strings keeps only its unsent text; what it sends,
    chunk by chunk (several tokens per engine message), is the whole choice's text, and
    the decoder's batch step equals its token steps."""
    text = "abc def \u00e9t\u00e9 xyz qq \U0001f600 ghi"
    ids = tok.encode(text)
    whole = _Choice(0, tok.decoder(), [])
    streamed = _Choice(0, tok.decoder(), [], stream=True)
    sent = []
    for k in range(0, len(ids), 3):
        whole.feed(ids[k:k + 3])
        streamed.feed(ids[k:k + 3])
        sent.append(streamed.take(False))
        assert len(streamed.text) == 0  # nothing kept once taken
    assert "".join(sent) == whole.text == tok.decode(ids)
    assert streamed.tokens == whole.tokens == len(ids) and streamed.token_ids == ids
    one, batch = tok.decoder(), tok.decoder()
    assert "".join(one.step(t) for t in ids) == batch.steps(ids)
    assert batch.steps([VOCAB + 5]) == ""  # an unknown id decodes to nothing, as step does
