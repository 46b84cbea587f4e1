"""Server state shared by the routes: settings, model-name resolution, prompt handling."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from punica.engine.async_engine import AsyncEngine
from punica.engine.outputs import RequestOutput
from punica.errors import AdapterNotFoundError, InvalidRequestError


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    """The name clients use for the base model."""
    api_key: str | None = None
    """When set, /v1 requests need `Authorization: Bearer <key>`."""
    lora_root: str | None = None
    """load_lora_adapter reads only below this folder (unset: dynamic loading disabled)."""


class Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self._ids = itertools.count()

    def adapter_of(self, model: str) -> str | None:
        if model == self.settings.served_model_name:
            return None
        if model in self.engine.engine.registry:
            return model
        raise AdapterNotFoundError(f"The model `{model}` does not exist.")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: this model has no tokenizer; send token ids")
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"prompt, {max_tokens} in the completion).")

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"


def prompt_list(raw: str | list) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if raw and all(isinstance(t, int) for t in raw):
        return [raw]
    if not raw:
        raise InvalidRequestError("prompt: expected a non-empty prompt")
    return list(raw)


async def _final(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in gen:
        last = out
    return last


def safe_lora_path(root: str | None, path: str) -> Path:
    if root is None:
        raise InvalidRequestError("dynamic adapter loading is disabled (start the server with "
                                  "--lora-root DIR)")
    base = Path(root).resolve()
    target = (base / path).resolve()  # resolves symlinks: an escape shows as a path outside
    if target != base and base not in target.parents:
        raise InvalidRequestError(f"lora_path: expected a folder below the lora root, got "
                                  f"{path!r}")
    return target


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def gather_outputs(gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    return list(await asyncio.gather(*(_final(g) for g in gens)))
