"""BodyLimit: an ASGI middleware that answers 413 (OpenAI's error shape) to a request whose
body passes `max_bytes`, by its Content-Length or, for a chunked body, as it arrives. It reads the
body (at most `max_bytes`, which the handler would buffer anyway) before the app runs and replays
it to the app, so no handler ever parses more than the limit.

It also watches the connection once the body is read: `scope[DISCONNECTED]` is an asyncio.Event
set when the client goes away, which a handler still computing a non-streamed answer polls to
abort its requests (the framework's own check does not see through the middleware stack)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


DISCONNECTED = "punica.disconnected"
"""The scope key of the asyncio.Event set when the client has gone."""
DRAIN_BYTES = 256 << 20
"""A refused body is read (and dropped) up to this size before the 413 goes out."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._refuse(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                # Read on (discarding) so that the client, still sending, reads the answer
                # rather than a reset; a body past DRAIN_BYTES gets the answer and a close.
                while message.get("more_body", False) and size <= DRAIN_BYTES:
                    message = await receive()
                    size += len(message.get("body", b""))
                await self._refuse(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False
        gone = scope[DISCONNECTED] = asyncio.Event()
        if chunks is None:
            gone.set()

        async def replay() -> Message:
            nonlocal replayed
            if chunks is not None and not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            message = await receive()  # after the body: waits for the disconnect
            if message["type"] == "http.disconnect":
                gone.set()
            return message

        async def watch() -> None:
            while not gone.is_set():
                if (await receive())["type"] == "http.disconnect":
                    gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": {
            "message": f"request body too large: at most {self.max_bytes} bytes",
            "type": "invalid_request_error", "param": None, "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
