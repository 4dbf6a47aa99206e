"""A model's tokenizer for the HTTP front: encode prompts, render chat templates, decode
streamed tokens.

The router tokenises once (here), routes on the ids and forwards the ids to the engine,
so router and engine never disagree on the prompt. A model's `tokenizer` setting
(kvrouter.config.ModelConfig) names a directory holding `tokenizer.json` (the `tokenizers`
library's format, as Hugging Face model repositories ship it) and optionally
`tokenizer_config.json` (chat template, special tokens, `model_max_length`), or the
`tokenizer.json` file itself.

Chat templates render the way engines render them (transformers' `apply_chat_template`,
which vLLM and SGLang call): Jinja in an ImmutableSandboxedEnvironment with
trim_blocks/lstrip_blocks and loop controls, `raise_exception`, `strftime_now` and a
`tojson` filter, the special tokens as variables, and the rendered text encoded without
adding special tokens again (the template already wrote them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TokenizerError(ValueError):
    """The tokenizer files cannot be loaded (a configuration error)."""


class TemplateError(ValueError):
    """The chat template failed to render these messages (the client gets a 400)."""


# The chat template of kvrouter's own tokenizers (the simulated engines' and the real-vLLM
# harness's tiny model): a plain role-tagged format with the BOS/EOS tokens.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")


def _token_text(v: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson (which HTML-escapes) with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _pick_template(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {name, template} (the "default" one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        t = named.get("default")
        return t if isinstance(t, str) else None
    return None


@dataclass
class ModelTokenizer:
    """One model's tokenizer; thread-safe for encode/decode (the Rust tokenizer is)."""

    tokenizer: Tokenizer
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None
    model_max_length: int | None = None
    eos_token_id: int | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self._template: jinja2.Template | None = None
        if self.chat_template is not None:
            try:
                self._template = _environment().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"{self.source}: the chat template does not compile: {e}"
                                     ) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelTokenizer:
        p = Path(path)
        tok_file = p / "tokenizer.json" if p.is_dir() else p
        cfg_file = tok_file.parent / "tokenizer_config.json"
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception for unreadable files
            raise TokenizerError(f"cannot load tokenizer {tok_file}: {e}") from None
        cfg: dict[str, Any] = {}
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise TokenizerError(f"cannot read {cfg_file}: {e}") from None
        template = _pick_template(cfg.get("chat_template"))
        jinja_file = tok_file.parent / "chat_template.jinja"  # newer transformers save it apart
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        specials = {k: t for k in _SPECIAL_KEYS if (t := _token_text(cfg.get(k))) is not None}
        max_len = cfg.get("model_max_length")
        # transformers writes a huge sentinel (int(1e30)) when the length is unknown
        limit = int(max_len) if isinstance(max_len, int | float) and 0 < max_len < 1 << 40 else None
        eos = specials.get("eos_token")
        return cls(tokenizer=tok, chat_template=template, special_tokens=specials,
                   model_max_length=limit,
                   eos_token_id=tok.token_to_id(eos) if eos is not None else None,
                   source=str(tok_file))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        if self._template is None:
            raise TemplateError(f"the model's tokenizer ({self.source}) has no chat template")
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **(self.special_tokens or {}), **extra)
        except jinja2.TemplateError as e:  # also SecurityError from the sandbox
            raise TemplateError(f"the chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"the chat template failed to render: "
                                f"{type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        # the template wrote the special tokens: do not add them again (vLLM does the same)
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra),
                           add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def decoder(self) -> Detokenizer:
        return Detokenizer(self.tokenizer)


class Detokenizer:
    """Incremental decoding of one stream of generated tokens (tokenizers' DecodeStream:
    a multi-byte character split over tokens comes out whole, once)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        try:
            out = self._stream.step(self._tok, token_id)
        except Exception:  # an id the vocabulary lacks decodes to nothing, as in engines
            return ""
        return out or ""

    def steps(self, ids: Iterable[int]) -> str:
        """The text of several tokens at once: what `step` gives for each, joined (one call
        per streamed chunk instead of one per token)."""
        step, tok = self._stream.step, self._tok
        out = ""
        for t in ids:
            try:
                piece = step(tok, t)
            except Exception:  # as in step()
                continue
            if piece:
                out += piece
        return out


# --------------------------------------------------------------------------- simulated models

SIM_TOKENIZER_STAMP = "kvrouter-sim-tokenizer-v1"


def _cache_root() -> Path:
    env = os.environ.get("KVROUTER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvrouter"


def build_sim_tokenizer(out: Path, vocab_size: int, model_max_length: int | None = None) -> Path:
    """Train a byte-level BPE on seeded random text so that its vocabulary fills every id
    below vocab_size (a simulated engine emits any of them). The recipe is the real-vLLM
    harness's tiny-model tokenizer (kvrouter.testing.vllm_harness): same corpus, same
    trainer, deterministic. Writes tokenizer.json and tokenizer_config.json into `out`."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))

    corpus = [" ".join(word() for _ in range(64)) for _ in range(4000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() != vocab_size:
        raise TokenizerError(f"the simulated tokenizer has {tok.get_vocab_size()} tokens, "
                             f"expected {vocab_size} (the corpus is too small for this vocabulary)")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                           "pad_token": "<pad>", "chat_template": SIMPLE_CHAT_TEMPLATE,
                           "tokenizer_class": "PreTrainedTokenizerFast"}
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def sim_tokenizer(vocab_size: int = 32000, cache_dir: Path | None = None) -> Path:
    """The simulated models' tokenizer directory, built once into the cache (seconds) and
    reused: no download, the same files on every machine."""
    key = hashlib.sha256(f"{SIM_TOKENIZER_STAMP}:{vocab_size}".encode()).hexdigest()[:12]
    out = (cache_dir or _cache_root()) / f"sim-tokenizer-{vocab_size}-{key}"
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside and rename, so that concurrent builders never see half a directory
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    build_sim_tokenizer(tmp, vocab_size)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
