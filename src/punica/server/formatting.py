"""OpenAI response bodies (completions, chat, streaming chunks, errors) from engine outputs."""

from __future__ import annotations

import time

from punica.engine.outputs import CompletionOutput


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            409: "conflict_error", 429: "rate_limit_error", 503: "overloaded_error"}.get(
                status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _token_text(tokenizer: object | None, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"


def completion_logprobs(tokenizer: object | None, c: CompletionOutput) -> dict | None:
    if c.logprobs is None:
        return None
    tokens = [_token_text(tokenizer, t) for t in c.token_ids]
    return {"tokens": tokens,
            "token_logprobs": [lp.get(t) for t, lp in zip(c.token_ids, c.logprobs, strict=False)],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.items()}
                             for lp in c.logprobs],
            "text_offset": []}


def chat_logprobs(tokenizer: object | None, c: CompletionOutput, top: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for token, lp in zip(c.token_ids, c.logprobs, strict=False):
        ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": _token_text(tokenizer, token), "logprob": lp.get(token),
                        "top_logprobs": [{"token": _token_text(tokenizer, t), "logprob": v}
                                         for t, v in ranked]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict],
             usage_body: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_body is not None:
        body["usage"] = usage_body
    return body
