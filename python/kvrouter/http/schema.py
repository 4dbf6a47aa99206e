"""OpenAI request bodies the HTTP front accepts (completions and chat completions).

Known fields are type-checked strictly (a string where a number belongs is a 400, as
OpenAI answers); unknown fields are ignored, as OpenAI-compatible servers do. Fields the
router cannot honour (logprobs, echo, penalties, tools, ...) are refused with a 400 when
set to anything but their default, rather than silently dropped. vLLM's extensions
top_k, stop_token_ids, ignore_eos and return_token_ids are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 32)]], Field(min_length=1)]


class _Sampling(_Body):
    model: StrictStr = ""
    # bounded by the proto fields they fill (int64 max_tokens, int32 top_k): a larger value
    # is the client's 400, not a ValueError (a 500) when the gRPC request is built
    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None  # 0: the default
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    seed: Annotated[int, Field(ge=0, lt=1 << 64)] | None = None
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    presence_penalty: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    logit_bias: dict[str, Any] | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=1 << 32)]] | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False
    # kvrouter extensions (docs/inference-scaling.md): how n > 1 samples become the reply
    # ("" / "all": n choices; vote, best_logprob, scorer: one choice, the chosen sample)
    aggregator: StrictStr = ""
    answer_regex: StrictStr = ""
    scorer: StrictStr = ""
    # kvrouter extensions (docs/kv-offload.md): this turn ends in a tool call and the session
    # (x-session-id, else user) comes back after about tool_pause_s seconds; the router keeps,
    # offloads or drops its KV meanwhile (tool_kv_action overrides the decision)
    tool_pause_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    tool_kv_action: StrictStr = ""

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for the fields set to something the router cannot do."""
        out = []
        if self.presence_penalty:
            out.append(("presence_penalty", "penalties are not supported"))
        if self.frequency_penalty:
            out.append(("frequency_penalty", "penalties are not supported"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out

    def stops(self) -> list[str]:
        s = self.stop
        stops = [s] if isinstance(s, str) else list(s or [])
        return [x[:MAX_STOP_LENGTH] for x in stops if x]


class CompletionRequest(_Sampling):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    add_special_tokens: StrictBool = True

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.logprobs is not None:
            out.append(("logprobs", "logprobs are not supported"))
        if self.best_of is not None and self.best_of != self.n:
            out.append(("best_of", "best_of other than n is not supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    # extra fields (name, tool_call_id, ...) travel to the template as they came
    model_config = ConfigDict(strict=True, extra="allow")

    role: StrictStr = Field(min_length=1)
    content: StrictStr | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=False)
        if isinstance(self.content, list):  # text parts join as vLLM's "string" format does
            d["content"] = "\n".join(p.text for p in self.content)
        elif self.content is None:
            d["content"] = ""
        return d


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "logprobs are not supported"))
        if self.tools:
            out.append(("tools", "tool calling is not supported"))
        if self.tool_choice not in (None, "none", "auto"):
            out.append(("tool_choice", "tool calling is not supported"))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            out.append(("response_format", "structured output is not supported"))
        return out

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
