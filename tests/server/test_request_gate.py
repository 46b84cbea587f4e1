"""RequestGate on its own (a stub ASGI app, no server): key before body, 413 by declared
length or as a chunked body arrives, 408 for a body that does not arrive, the body replayed."""

from __future__ import annotations

import asyncio
import json

from punica.server.limits import RequestGate


def call(headers: dict[bytes, bytes], chunks: list[bytes],
         stall: bool = False) -> tuple[int, bytes]:
    """(status, body of the answer); `chunks` arrive one per receive, then a stall if asked."""
    seen: list[bytes] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok:" + message["body"]})

    async def main() -> tuple[int, bytes]:
        pending = list(chunks)
        sent: list[dict] = []

        async def receive() -> dict:
            if pending:
                body = pending.pop(0)
                return {"type": "http.request", "body": body,
                        "more_body": bool(pending) or stall}
            await asyncio.sleep(3600 if stall else 0)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions",
                 "headers": list(headers.items())}
        await RequestGate(app, max_bytes=10, api_key="k", open_paths=("/health",),
                          body_timeout_s=0.2)(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    return asyncio.run(main())


KEY = {b"authorization": b"Bearer k"}


def test_key_checked_before_the_body() -> None:
    status, body = call({}, [b"{}"], stall=True)  # would time out if the body were read
    assert status == 401 and json.loads(body)["error"]["code"] == 401
    assert call({b"authorization": b"Bearer kk"}, [b"{}"])[0] == 401


def test_sizes_timeouts_and_replay() -> None:
    assert call(KEY | {b"content-length": b"11"}, [b"x" * 11])[0] == 413
    assert call(KEY, [b"x" * 6, b"x" * 6])[0] == 413  # chunked: counted as it arrives
    assert call(KEY | {b"content-length": b"abc"}, [b"x"])[0] == 400
    assert call(KEY | {b"content-encoding": b"gzip"}, [b"x"])[0] == 415
    assert call(KEY, [b"12"], stall=True)[0] == 408  # the rest never comes
    assert call(KEY, [b"12", b"34"]) == (200, b"ok:1234")  # replayed whole
