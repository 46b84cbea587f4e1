"""RequestGate: the ASGI middleware every HTTP request passes before any handler runs.

In order, each answered in OpenAI's error shape and before the body is read where it can be:
1. the API key (401; constant-time comparison; paths in `open_paths` need none), before more
   than UNAUTHORISED_BYTES of the body is read;
2. Content-Encoding other than identity (415: nothing is decompressed, nothing guessed);
3. the body: a declared Content-Length above `max_bytes` gets 413 without the body being kept
   (what the client sends is read and dropped first, up to DRAIN_BYTES and `body_timeout_s`,
   so that a client still sending reads the answer rather than a reset); a chunked body is
   counted as it arrives (413 past `max_bytes`); a body slower than `body_timeout_s`: 408.
   The body (at most `max_bytes`, which the handler would buffer anyway) is then replayed to
   the app.

After the body it watches the connection: `scope[DISCONNECTED]` is an asyncio.Event set when the
client goes away, which a handler computing a non-streamed answer polls to abort its requests
(the framework's own check does not see through the middleware stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from punica.server.formatting import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCONNECTED = "punica.disconnected"
"""The scope key of the asyncio.Event set when the client has gone."""
UNAUTHORISED_BYTES = 64 << 10
"""What is read (and dropped) of a body sent without the API key, before the 401."""
DRAIN_BYTES = 256 << 20
"""A refused body is read (and dropped) up to this size before the 413 goes out."""

class RequestGate:
    def __init__(self, app: ASGIApp, max_bytes: int, api_key: str | None = None,
                 open_paths: tuple[str, ...] = (), body_timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.open_paths, self.body_timeout_s = open_paths, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope.get("path") not in self.open_paths and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
            # At most a small body is read (and dropped) for a client without the key, so that
            # it reads the 401; a larger one gets the answer and a closed connection.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(receive, UNAUTHORISED_BYTES), 1.0)
            await refuse(send, 401, "invalid or missing API key")
            return
        if headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            await refuse(send, 415, "Content-Encoding: only identity bodies are accepted")
            return
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await refuse(send, 400, "Content-Length: not a number")
            return
        if length is not None and int(length) > self.max_bytes:
            # The server cannot read after it answers: what the client sends is dropped first
            # (bounded in bytes and time), so that it reads the 413 rather than a reset.
            if int(length) <= DRAIN_BYTES:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drain(receive, DRAIN_BYTES),
                                           self.body_timeout_s)
            await refuse(send, 413, f"request body too large: at most {self.max_bytes} bytes")
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout_s)
        except TimeoutError:
            await refuse(send, 408, f"the request body took longer than "
                                    f"{self.body_timeout_s:.0f} s to arrive")
            return
        if isinstance(body, int):
            await refuse(send, 413, f"request body too large: at most {self.max_bytes} bytes")
            return
        await self._run(scope, receive, send, body)

    async def _read(self, receive: Receive) -> bytes | int | None:
        """The body; its size (an int) when it passes the limit; None if the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, DRAIN_BYTES - size)
                return size
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _drain(receive: Receive, limit: int) -> None:
        """Read and drop (the rest of) a refused body, about `limit` bytes at most."""
        size = 0
        while size <= limit:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: bytes | None) -> None:
        replayed = False
        gone = scope[DISCONNECTED] = asyncio.Event()
        if body is None:
            gone.set()

        async def replay() -> Message:
            nonlocal replayed
            if body is not None and not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
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


async def refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
