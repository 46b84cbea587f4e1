"""The FastAPI app: OpenAI completions and chat (plain and streamed), models, adapter loading,
the listing of the just-in-time root, health and version. `model` names the served base model or
a loaded adapter.

Every error answer has OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), the
framework's own (unknown route, wrong method, unparsable body) and unexpected ones (500, logged
with a traceback) included; 429/503 carry Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import punica
from punica.engine.async_engine import AsyncEngine
from punica.errors import AdapterLoadError, InvalidRequestError, PunicaError
from punica.server import formatting as fmt
from punica.server.limits import DISCONNECTED, RequestGate
from punica.server.lora_listing import RootLister
from punica.server.metrics import Metrics
from punica.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from punica.server.routes import run_chat, run_completion
from punica.server.state import Server, ServerSettings, safe_lora_path

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/version")
"""Paths that answer without the API key (when one is set)."""


def error_response(message: str, status: int, param: str | None = None,
                   retry_after_s: int = 1, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """OpenAI's error body; text a client sent (a lone surrogate in a name, say) is escaped so
    that the answer can always be encoded."""
    headers = dict(headers or {})
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after_s)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(fmt.error_body(message, status, param), status_code=status,
                        headers=headers or None)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None
    if tuple(first.get("loc", ())) == ("body",):
        return "the body must be a JSON object (Content-Type: application/json)", None
    loc = [str(p) for p in first.get("loc", ())[1:]]
    where = ".".join(loc) or None
    msg = str(first.get("msg", err)).removeprefix("Value error, ")
    if isinstance(first.get("ctx", {}).get("error"), InvalidRequestError):
        return msg, where  # our own check: its message names the field already
    return (f"{where}: {msg}" if where else msg), where


def create_app(engine: AsyncEngine, settings: ServerSettings,
               metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="Punica", version=punica.__version__)
    srv = Server(engine, settings)
    app.state.server = srv
    retry = settings.retry_after_s

    @app.exception_handler(PunicaError)
    async def punica_error(_: Request, err: PunicaError) -> JSONResponse:
        status = getattr(err, "status", 500)
        if status >= 500 and status != 503:
            log.error("request failed: %s", err)
        return error_response(str(err), status,
                              retry_after_s=getattr(err, "retry_after_s", retry))

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        message, where = _validation_message(err)
        return error_response(f"invalid request: {message}", 400, where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(str(err.detail), err.status_code, retry_after_s=retry,
                              headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(f"internal server error ({type(err).__name__})", 500)

    app.add_middleware(RequestGate, max_bytes=settings.max_body_bytes,
                       api_key=settings.api_key, open_paths=OPEN_PATHS)

    @app.get("/health")
    async def health() -> object:
        if not engine.healthy():
            return error_response("no engine is serving", 503, retry_after_s=retry)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return error_response("metrics are off", 404)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/version")
    async def version() -> dict:
        return {"version": punica.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        names = await engine.call(lambda e: e.list_loras())
        base = settings.served_model_name
        data = [{"id": base, "object": "model", "owned_by": "punica", "root": base,
                 "parent": None}]
        data += [{"id": n, "object": "model", "owned_by": "punica", "root": n, "parent": base}
                 for n in names]
        return {"object": "list", "data": data}

    lister = RootLister()

    @app.get("/v1/lora_adapters")
    async def lora_adapters() -> object:
        """The adapter folders below --lora-root, by the names requests use (lora_listing)."""
        root = srv.jit_root
        if root is None:
            return error_response("no adapter folder to list: start the server with "
                                  "--lora-root DIR", 404)
        loaded = set(await engine.call(lambda e: e.list_loras()))
        return await lister.listing(root, loaded, settings.served_model_name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest) -> dict:
        if body.lora_name == settings.served_model_name:
            raise InvalidRequestError("lora_name: the base model's name cannot name an adapter")
        path = safe_lora_path(settings.lora_root, body.lora_path)
        root = str(safe_lora_path(settings.lora_root, "."))
        try:
            # parsed off the engine thread (its steps go on while the files are read), then
            # registered on it
            parsed = await asyncio.to_thread(engine.engine.parse_lora, body.lora_name,
                                             str(path), root)
            await engine.call(lambda e: e.load_lora(body.lora_name, str(path), root,
                                                    body.replace, parsed))
        except AdapterLoadError as err:  # name paths below the root as the client did
            raise AdapterLoadError(str(err).replace(root, "<lora-root>")) from err
        log.info("adapter %r loaded from %s%s", body.lora_name, path,
                 " (replacing)" if body.replace else "")
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest) -> dict:
        failed = await engine.call(lambda e: e.remove_lora(body.lora_name))
        if metrics is not None:
            metrics.forget(body.lora_name)
        log.info("adapter %r unloaded; %d request(s) of it failed", body.lora_name,
                 len(failed or []))
        return {"status": "ok", "lora_name": body.lora_name,
                "failed_requests": len(failed or [])}

    def left(request: Request) -> Callable[[], Awaitable[bool]]:
        """Whether the client has gone (RequestGate watches the connection)."""
        gone = request.scope.get(DISCONNECTED)

        async def check() -> bool:
            return gone is not None and gone.is_set()
        return check

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> object:
        return await run_completion(srv, body, left(request))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> object:
        return await run_chat(srv, body, left(request))

    return app
