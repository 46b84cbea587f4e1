"""Request bodies of the OpenAI API that Punica serves, and their translation to SamplingParams.

Unknown fields are ignored (clients send vendor extras), but OpenAI fields that change what a
request means and that Punica does not implement (tools, logit_bias, response formats, ...) are
refused with 400 when set: nothing is silently dropped. Types are strict (no "3" for 3, no true
for 1, no 2.0 for an integer). Strings must be valid Unicode (a lone surrogate is refused here,
before any tokenizer sees it).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from punica.engine.sampling_params import SamplingParams
from punica.errors import InvalidRequestError

UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "functions", "function_call",
               "parallel_tool_calls", "suffix", "audio", "modalities", "prediction",
               "web_search_options", "guided_json", "guided_regex", "guided_choice")
"""OpenAI (and vLLM) request fields Punica refuses when set to anything but null."""

MAX_STOP = 16
"""Most stop strings per request."""
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")
"""What an adapter name may be: 1-128 characters, a letter or digit first."""


def check_text(value: str, param: str) -> str:
    """`value` if it is encodable UTF-8 (no lone surrogates), else InvalidRequestError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(f"{param}: not valid Unicode ({err.reason} at position "
                                  f"{err.start})") from err
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Extensions (vLLM's names)
    top_k: int = Field(-1, ge=-1, lt=2**31)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default_factory=list,
                                                                       max_length=64)
    priority: int = Field(0, ge=-(2**31), lt=2**31)
    """Lower is admitted first (--scheduling-policy priority; refused otherwise unless 0)."""

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Sampling:
        extra = self.model_extra or {}
        for key in UNSUPPORTED:
            if extra.get(key) is not None:
                raise InvalidRequestError(f"{key}: not supported by this server")
        fmt = extra.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise InvalidRequestError("response_format: only {\"type\": \"text\"} is supported")
        if extra.get("echo"):
            raise InvalidRequestError("echo: not supported by this server")
        best_of = extra.get("best_of")
        if best_of is not None and best_of != self.n:
            raise InvalidRequestError("best_of: not supported (use n)")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options: only allowed when stream is true")
        return self

    @field_validator("model", "user")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return value if value is None else check_text(value, "model/user")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise InvalidRequestError(f"stop: at most {MAX_STOP} stop strings, got {len(value)}")
        for s in [value] if isinstance(value, str) else value or []:
            check_text(s, "stop")
            if not s or len(s) > 256:
                raise InvalidRequestError("stop: expected strings of 1 to 256 characters")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed,
            stop=tuple(self.stop_list()), stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: object) -> object:
        for p in [value] if isinstance(value, str) else value:
            if isinstance(p, str):
                check_text(p, "prompt")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = Field(None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if isinstance(value, dict):
            for key in ("tool_calls", "tool_call_id", "function_call", "audio"):
                if value.get(key) is not None:
                    raise InvalidRequestError(f"messages: {key} is not supported by this server")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: object) -> object:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise InvalidRequestError(f"content: part type {kind!r} is not supported "
                                              "(only text parts)")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined by newlines."""
        if isinstance(self.content, str):
            return check_text(self.content, "messages.content")
        return check_text("\n".join(p.text for p in self.content), "messages.content")


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str
    lora_path: str = Field(max_length=4096)
    replace: bool = False
    """Replace an adapter already loaded under this name (only while no request uses it)."""

    @field_validator("lora_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return valid_adapter_name(value)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(max_length=128)
    lora_path: str | None = None


def valid_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.fullmatch(name):
        raise InvalidRequestError("lora_name: expected 1-128 characters of letters, digits and "
                                  "._:@+/-, starting with a letter or digit")
    return name
