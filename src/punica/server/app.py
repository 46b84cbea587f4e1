"""The FastAPI app: OpenAI completions and chat (plain and streamed), models, adapter loading,
health and version. `model` names the served base model or a loaded adapter."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

import punica
from punica.engine.async_engine import AsyncEngine
from punica.errors import PunicaError
from punica.server import formatting as fmt
from punica.server.metrics import Metrics
from punica.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from punica.server.routes import run_chat, run_completion
from punica.server.state import Server, ServerSettings, safe_lora_path


def create_app(engine: AsyncEngine, settings: ServerSettings,
               metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI(title="Punica", version=punica.__version__)
    srv = Server(engine, settings)
    app.state.server = srv

    @app.exception_handler(PunicaError)
    async def punica_error(_: Request, err: PunicaError) -> JSONResponse:
        status = getattr(err, "status", 500)
        return JSONResponse(fmt.error_body(str(err), status), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', err)}" if where else str(first.get("msg", err))
        return JSONResponse(fmt.error_body(f"invalid request: {message}", 400, where),
                            status_code=400)

    @app.middleware("http")
    async def auth(request: Request, call_next: object) -> object:
        key = settings.api_key
        if key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return JSONResponse(fmt.error_body("invalid or missing API key", 401),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            return Response("metrics are off\n", status_code=404, media_type="text/plain")
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

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoraRequest) -> dict:
        path = safe_lora_path(settings.lora_root, body.lora_path)
        await engine.call(lambda e: e.load_lora(body.lora_name, str(path)))
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoraRequest) -> dict:
        await engine.call(lambda e: e.remove_lora(body.lora_name))
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> object:
        return await run_completion(srv, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> object:
        return await run_chat(srv, body)

    return app
