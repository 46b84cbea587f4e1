"""Server state shared by the routes: settings, model-name resolution, prompt handling."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from punica.engine.async_engine import AsyncEngine
from punica.engine.outputs import RequestOutput
from punica.errors import AdapterNotFoundError, InvalidRequestError, RateLimitedError
from punica.lora.registry import jit_path
from punica.server.tenant_limits import TokenWindows


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    """The name clients use for the base model."""
    api_key: str | None = None
    """When set, /v1 requests need `Authorization: Bearer <key>`."""
    lora_root: str | None = None
    """load_lora_adapter reads only below this folder (unset: dynamic loading disabled)."""
    max_n: int = 16
    """Most completions (n) one request may ask for."""
    max_prompts: int = 64
    """Most prompts in one completions request."""
    max_body_bytes: int = 8 << 20
    """Largest request body (413 above it)."""
    retry_after_s: int = 1
    """Retry-After of 429/503 answers."""
    scheduling_policy: str = "fcfs"
    """The engine's (a request's `priority` other than 0 is refused unless it is priority)."""
    tenant_from: str = "adapter"
    """Whose service a request counts as under the fair policy: its adapter, or its `user`."""
    tenant_max_in_flight: int | None = None
    """Most sequences one tenant may have in flight (429 past it; None: no limit)."""
    tenant_tokens_per_minute: int | None = None
    """Most tokens (prompt + max_tokens, per completion) one tenant may be admitted per minute
    (429 past it, with Retry-After; None: no limit)."""


T = TypeVar("T")


class Server:
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings
        tpm = settings.tenant_tokens_per_minute
        self.token_windows = TokenWindows(tpm) if tpm is not None else None
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self._ids = itertools.count()
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="punica-tokenize")
        """Tokenising and chat templates run here, one at a time, off the event loop."""
        self.max_prompt_chars = _max_prompt_chars(self.tokenizer, self.max_model_len)
        """Longer text cannot fit max_model_len whatever it tokenises to: refused before the
        tokenizer spends time on it (a flood of huge prompts would stall everyone's)."""

    def check_chars(self, texts: list[str], param: str) -> None:
        total = sum(len(t) for t in texts)
        if total > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{param}: {total} characters cannot fit this model's maximum context length "
                f"of {self.max_model_len} tokens")

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """fn() on the tokenizer thread (the event loop keeps serving meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    @property
    def jit_root(self) -> str | None:
        """The folder of just-in-time adapters requests may name (None: none)."""
        return getattr(self.engine.engine, "jit_root", None)

    def adapter_of(self, model: str) -> str | None:
        if model == self.settings.served_model_name:
            return None
        if model in self.engine.engine.registry or jit_path(self.jit_root, model):
            return model
        raise AdapterNotFoundError(f"The model `{model}` does not exist.")

    def check_in_flight(self, tenant: str, sequences: int) -> None:
        """RateLimitedError (429) when `sequences` more would put the tenant past its limit."""
        cap = self.settings.tenant_max_in_flight
        if cap is not None:
            now = self.engine.in_flight_of(tenant)
            if now + sequences > cap:
                raise RateLimitedError(f"tenant {tenant or 'base'!r} has {now} sequences in "
                                       f"flight, its limit is {cap}",
                                       self.settings.retry_after_s)

    def charge_tokens(self, tenant: str, tokens: int) -> None:
        """Charge a request's possible tokens (RateLimitedError past the limit)."""
        if self.token_windows is not None:
            self.token_windows.charge(tenant, tokens)

    def refund_tokens(self, tenant: str, tokens: int) -> None:
        if self.token_windows is not None:
            self.token_windows.refund(tenant, tokens)

    def schedule_as(self, priority: int, user: str | None) -> tuple[int, str | None]:
        """(priority, tenant) for the engine; tenant None: the adapter's name."""
        if priority != 0 and self.settings.scheduling_policy != "priority":
            raise InvalidRequestError(
                f"priority: this server schedules with {self.settings.scheduling_policy!r}; "
                "request priorities need --scheduling-policy priority")
        return priority, (user or "") if self.settings.tenant_from == "user" else None

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


def _max_prompt_chars(tokenizer: object | None, max_model_len: int) -> int:
    """4 x max_model_len x the longest token's text. Text longer than max_model_len x longest
    cannot fit in max_model_len tokens (a token's string is at least as long as the text it
    decodes to), unless the tokenizer drops characters (whitespace); the factor 4 leaves room
    for that, and still bounds what one request makes the tokenizer do."""
    if tokenizer is None:
        return 1 << 62
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except (AttributeError, TypeError, ValueError):
        return 1 << 62
    return 4 * max_model_len * max(longest, 1)


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
    if "\0" in path or not path or any(len(p.encode("utf-8", "replace")) > 255
                                        for p in path.split("/")):
        raise InvalidRequestError("lora_path: expected a folder name below the lora root (no "
                                  "NUL byte, parts of at most 255 bytes)")
    base = Path(root).resolve()
    try:
        target = (base / path).resolve()  # resolves symlinks: an escape shows as outside
    except (OSError, RuntimeError, ValueError) as err:
        raise InvalidRequestError(f"lora_path: cannot be resolved ({type(err).__name__})") \
            from err
    if target != base and base not in target.parents:
        raise InvalidRequestError(f"lora_path: expected a folder below the lora root, got "
                                  f"{path!r}")
    return target


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def gather_outputs(gens: list[AsyncIterator[RequestOutput]],
                         disconnected: Callable[[], Awaitable[bool]] | None = None,
                         poll_s: float = 0.25) -> list[RequestOutput] | None:
    """The final output of every stream; None if `disconnected()` turned true first (then
    every stream is closed, which aborts its request: a client that left stops costing)."""
    task = asyncio.ensure_future(asyncio.gather(*(_final(g) for g in gens)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return list(task.result())
            if disconnected is not None and await disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
