"""Thin FastAPI routers and the app factory. Logic lives in serving_*.py.

Every error leaves as OpenAI JSON, `{"error": {"message", "type", "param", "code"}}`, with the
status the client caused (400/401/404/503); a 500 means a bug in the server.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vtensor.server.metrics import ServerMetrics
from vtensor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from vtensor.server.serving_chat import OpenAIServingChat
from vtensor.server.serving_completions import OpenAIServingCompletion
from vtensor.server.serving_engine import OpenAIError, engine_dead

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.to_response().model_dump(), status_code=e.status, headers=e.headers)


async def _listen_for_disconnect(request: Request) -> None:
    # The body was already read to parse the request, so the next message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def with_cancellation(request: Request, work: Awaitable[Any]) -> Any:
    """Run a handler, cancelling it when the client disconnects (a non-streaming request
    would otherwise keep generating, and holding KV, for a client that is gone)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_listen_for_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutting down: take the handler with us
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()  # the serving layer aborts its engine requests in its finally
    await asyncio.gather(task, return_exceptions=True)
    return None


def _as_response(result: Any) -> Response:
    if result is None:  # client went away; nobody reads this
        return Response(status_code=499)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Drop pydantic's union-branch names ("str", "list[int]") so the field stays readable.
        field = ".".join(x for x in loc if not any(c in x for c in "[]|") and x not in ("str",))
        first = first or field or None
        parts.append(f"`{field or 'body'}`: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(dict.fromkeys(parts)), first


def build_app(
    engine: Any,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncLLM. The caller owns the engine (starts
    it before and shuts it down after), so several apps may share one engine in tests."""
    metrics = ServerMetrics()
    completion = OpenAIServingCompletion(engine, served_model_name, metrics, max_waiting)
    chat = OpenAIServingChat(engine, served_model_name, metrics, max_waiting)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise OpenAIError(
                "Invalid or missing API key (send `Authorization: Bearer <key>`).",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    app = FastAPI(title="vtensor", version="0.1.0")
    app.state.engine = engine
    app.state.metrics = metrics
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(
            data=[ModelCard(id=served_model_name, max_model_len=completion.max_model_len)]
        )

    @v1.get("/models/{model:path}")
    async def retrieve_model(model: str) -> ModelCard:
        completion.check_model(model)
        return ModelCard(id=served_model_name, max_model_len=completion.max_model_len)

    @v1.post("/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return _as_response(await with_cancellation(raw, completion.create_completion(req)))

    @v1.post("/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return _as_response(await with_cancellation(raw, chat.create_chat_completion(req)))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        dead = engine_dead(engine)
        if dead is not None:
            return error_response(
                OpenAIError(f"engine failed: {dead!r}", status=503, type="server_error")
            )
        return Response(status_code=200)

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        text = metrics.render(engine.stats(), served_model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(OpenAIError(msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            OpenAIError(str(exc.detail), status=exc.status_code, type=kind, headers=exc.headers)
        )

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(
            OpenAIError(f"{type(exc).__name__}: {exc}", status=500, type="internal_error")
        )

    return app
