"""The FastAPI application: routes, guards, health, metrics and the web page, wired together.

Owns `create_app`. The app's lifespan starts the `EngineDriver` thread and, at shutdown
(after uvicorn stopped accepting and let open requests finish), stops it once in-flight
generations are done. Middleware, outermost first: metrics (counts every response, 401/413
included), API key, body size limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from megaloom.data.chat_template import ChatTemplate
from megaloom.data.tokenizer import Tokenizer
from megaloom.infer import Engine
from megaloom.serve import chat, completions, megatron_api, tokenizer_routes
from megaloom.serve.driver import EngineDriver
from megaloom.serve.errors import error_response, install_error_handlers
from megaloom.serve.generation import ServeContext
from megaloom.serve.metrics import MetricsMiddleware, ServeMetrics
from megaloom.serve.security import ApiKeyMiddleware, BodyLimitMiddleware

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_MAX_BODY_BYTES = 1 << 20


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *,
               tokenizer_path: str | Path | None = None, api_key: str | None = None,
               max_queue: int = 64, timeout: float | None = 600.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine`. `max_queue` sequences may wait beyond the running batch
    (more get 429); `timeout` seconds bound each request (None: no limit)."""
    if timeout is not None and timeout <= 0:
        raise ValueError(f"invalid timeout={timeout}: must be > 0")
    if max_body_bytes < 1:
        raise ValueError(f"invalid max_body_bytes={max_body_bytes}: must be >= 1")
    metrics = ServeMetrics()
    driver = EngineDriver(engine, max_queue=max_queue, metrics=metrics)
    eos = tokenizer_routes.eos_token_of(tokenizer)
    ctx = ServeContext(driver, tokenizer, model_name,
                       ChatTemplate.for_tokenizer(tokenizer_path, eos), timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        driver.start()
        try:
            yield
        finally:
            await driver.stop()

    app = FastAPI(title="megaloom", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    routers = [m.router for m in (completions, chat, tokenizer_routes, megatron_api)]
    for router in routers:
        app.include_router(router)

    @app.get("/health")
    async def health() -> Response:
        if driver.alive:
            return JSONResponse({"status": "ok"})
        return error_response(503, "engine is not running", code="engine_unavailable")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index(_: Request) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    routes = {r.path for router in routers for r in router.routes} | {"/health", "/metrics", "/"}
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    return app
