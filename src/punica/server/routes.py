"""The completion and chat handlers: validate, submit one engine request per prompt, and answer
with one body or a server-sent-event stream (a closed stream aborts its requests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import Response, StreamingResponse

from punica.engine.async_engine import OverloadedError
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import InvalidRequestError, RequestTooLargeError
from punica.server import formatting as fmt
from punica.server.protocol import ChatCompletionRequest, CompletionRequest
from punica.server.state import Server, gather_outputs, prompt_list, sse


def _open(srv: Server, prompts: list[list[int]], params: SamplingParams, adapter: str | None,
          max_tokens: int, body: CompletionRequest | ChatCompletionRequest
          ) -> list[AsyncIterator[RequestOutput]]:
    """Check and submit every prompt before any response starts (its status is still ours to
    set); a failure closes the ones already opened. Each prompt counts n in flight."""
    limits = srv.settings
    if params.n > limits.max_n:
        raise RequestTooLargeError(f"n: at most {limits.max_n} completions per request, got "
                                   f"{params.n}")
    if srv.engine.in_flight + len(prompts) * params.n > srv.engine.max_in_flight:
        raise OverloadedError(f"server overloaded: {srv.engine.in_flight} sequences in flight")
    for p in prompts:
        srv.check_length(p, max_tokens)
    priority, tenant = srv.schedule_as(body.priority, body.user)
    who = tenant if tenant is not None else (adapter or "")
    srv.check_in_flight(who, len(prompts) * params.n)
    tokens = sum(len(p) + max_tokens for p in prompts) * params.n
    srv.charge_tokens(who, tokens)  # before anything reaches the engine
    rids: list[str] = []
    try:
        for p in prompts:
            rids.append(srv.engine.open(p, params, adapter, priority, tenant))
    except Exception:
        srv.refund_tokens(who, tokens)  # a refused request costs its tenant nothing
        for rid in rids:
            srv.engine.cancel(rid)
        raise
    return [srv.engine.stream(rid) for rid in rids]


async def _merged(gens: list[AsyncIterator[RequestOutput]]
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, update) from several request streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await queue.put((i, out))
        except Exception as err:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, err))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    open_streams = len(tasks)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


Disconnected = Callable[[], Awaitable[bool]]
CLIENT_GONE = 499
"""The status logged for a request whose client left before its answer (no one reads it)."""


async def run_completion(srv: Server, body: CompletionRequest,
                         disconnected: Disconnected | None = None) -> object:
    adapter = srv.adapter_of(body.model)
    texts = prompt_list(body.prompt)
    if len(texts) > srv.settings.max_prompts:
        raise RequestTooLargeError(f"prompt: at most {srv.settings.max_prompts} prompts per "
                                   f"request, got {len(texts)}")
    for text in texts:
        if isinstance(text, str):
            srv.check_chars([text], "prompt")
    prompts = await srv.off_loop(lambda: [srv.encode(p) for p in texts])
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    params = body.sampling_params(max_tokens, body.logprobs)
    gens = _open(srv, prompts, params, adapter, max_tokens, body)
    rid = srv.next_id("cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(srv, "text_completion", rid, body.model, gens, params,
                                         sum(map(len, prompts)), include_usage, chat=False),
                                 media_type="text/event-stream")
    outs = await gather_outputs(gens, disconnected)
    if outs is None:
        return Response(status_code=CLIENT_GONE)
    choices = [{"index": i * params.n + c.index, "text": c.text,
                "logprobs": fmt.completion_logprobs(srv.tokenizer, c),
                "finish_reason": c.finish_reason}
               for i, out in enumerate(outs) for c in out.outputs]
    completion = sum(len(c.token_ids) for out in outs for c in out.outputs)
    return fmt.envelope("text_completion", rid, body.model, choices,
                        fmt.usage(sum(map(len, prompts)), completion))


def chat_prompt(srv: Server, body: ChatCompletionRequest) -> list[int]:
    tok = srv.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                for m in body.messages]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - a template's own check (roles, order) failed
        raise InvalidRequestError(f"messages: the model's chat template refused them "
                                  f"({type(err).__name__}: {err})") from err
    return list(tok.encode(text, add_special_tokens=False))


async def run_chat(srv: Server, body: ChatCompletionRequest,
                   disconnected: Disconnected | None = None) -> object:
    adapter = srv.adapter_of(body.model)
    srv.check_chars([m.text() for m in body.messages], "messages")
    prompt = await srv.off_loop(lambda: chat_prompt(srv, body))
    max_tokens = body.max_completion_tokens or body.max_tokens or max(
        1, srv.max_model_len - len(prompt))
    top = body.top_logprobs or 0
    params = body.sampling_params(max_tokens, top if body.logprobs else None)
    gens = _open(srv, [prompt], params, adapter, max_tokens, body)
    rid = srv.next_id("chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(srv, "chat.completion.chunk", rid, body.model, gens,
                                         params, len(prompt), include_usage, chat=True),
                                 media_type="text/event-stream")
    outs = await gather_outputs(gens, disconnected)
    if outs is None:
        return Response(status_code=CLIENT_GONE)
    (out,) = outs
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": fmt.chat_logprobs(srv.tokenizer, c, top),
                "finish_reason": c.finish_reason} for c in out.outputs]
    completion = sum(len(c.token_ids) for c in out.outputs)
    return fmt.envelope("chat.completion", rid, body.model, choices,
                        fmt.usage(len(prompt), completion))


def _new_logprobs(srv: Server, c: object, new_tokens: int, params: SamplingParams,
                  chat: bool) -> dict | None:
    """The logprobs of a chunk's new tokens (the last `new_tokens` of the completion)."""
    from punica.engine.outputs import CompletionOutput

    start = len(c.token_ids) - new_tokens
    part = CompletionOutput(c.index, c.token_ids[start:], c.text, c.finish_reason,
                            c.logprobs[start:])
    if chat:
        return fmt.chat_logprobs(srv.tokenizer, part, params.logprobs or 0)
    return fmt.completion_logprobs(srv.tokenizer, part)


async def _stream(srv: Server, kind: str, rid: str, model: str,
                  gens: list[AsyncIterator[RequestOutput]], params: SamplingParams,
                  prompt_tokens: int, include_usage: bool, chat: bool) -> AsyncIterator[str]:
    sent: dict[int, int] = {}
    tokens: dict[int, int] = {}
    if chat:
        yield sse(fmt.envelope(kind, rid, model, [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(params.n)]))
    try:
        async for i, out in _merged(gens):
            choices = []
            for c in out.outputs:
                index = i * params.n + c.index
                delta = c.text[sent.get(index, 0):]
                sent[index] = len(c.text)
                new_tokens = len(c.token_ids) - tokens.get(index, 0)
                tokens[index] = len(c.token_ids)
                # A chunk per step that produced tokens, even when their text is still held
                # back (a partial character) or absent (a model without a tokenizer): clients
                # time tokens by chunks.
                if not delta and not new_tokens and c.finish_reason is None:
                    continue
                choice = {"index": index, "finish_reason": c.finish_reason}
                choice.update({"delta": {"content": delta}} if chat else {"text": delta})
                if c.logprobs is not None:
                    choice["logprobs"] = _new_logprobs(srv, c, new_tokens, params, chat)
                choices.append(choice)
            if choices:
                yield sse(fmt.envelope(kind, rid, model, choices))
    except Exception as err:  # noqa: BLE001 - the status is sent already: report in-band
        yield sse(fmt.error_body(str(err), getattr(err, "status", 500)))
    if include_usage:
        yield sse(fmt.envelope(kind, rid, model, [], fmt.usage(prompt_tokens,
                                                               sum(tokens.values()))))
    yield sse("[DONE]")
