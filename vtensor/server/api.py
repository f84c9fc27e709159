"""Thin FastAPI routers and the app factory. Logic lives in serving_*.py.

Every error leaves as OpenAI JSON, `{"error": {"message", "type", "param", "code"}}`, with the
status the client caused (400/401/404/413/503); a 500 means a bug in the server or an engine
failure on that request. Messages are for clients: exception types, tracebacks, internal request
ids and a dead engine's exception go to the log only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vtensor.engine.client import EngineClient
from vtensor.server.errors import OpenAIError, engine_dead_error, internal_error
from vtensor.server.lifecycle import Lifecycle
from vtensor.server.metrics import ServerMetrics
from vtensor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from vtensor.server.serving_chat import OpenAIServingChat
from vtensor.server.serving_completions import OpenAIServingCompletion

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Request bodies above this get 413 (`--max-body-size`): 16 MiB holds ~2M tokens as JSON ids.
DEFAULT_MAX_BODY_BYTES = 16 * 2**20

log = logging.getLogger("vtensor.serve")


def _printable(text: str) -> str:
    # A lone surrogate cannot be encoded as UTF-8: it would turn an error into a 500.
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(e: OpenAIError) -> JSONResponse:
    body = e.to_response().model_dump()
    err = body["error"]
    for key in ("message", "param"):
        if isinstance(err.get(key), str):
            err[key] = _printable(err[key])
    return JSONResponse(body, status_code=e.status, headers=e.headers)


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
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:  # loc is a character offset there, not a field
        loc = bad_json[0].get("loc", ())
        pos = next((x for x in loc if isinstance(x, int)), None)
        where = f" at character {pos}" if pos is not None else ""
        return f"The request body is not valid JSON{where}.", None
    parts, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Drop pydantic's union-branch names ("str", "list[int]") so the field stays readable.
        field = ".".join(x for x in loc if not any(c in x for c in "[]|") and x not in ("str",))
        first = first or field or None
        parts.append(f"`{field or 'body'}`: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(dict.fromkeys(parts)), first


def build_app(
    engine: EngineClient,
    served_model_name: str,
    api_key: str | None = None,
    max_waiting: int | None = None,
    max_body_size: int | None = DEFAULT_MAX_BODY_BYTES,
    lifecycle: Lifecycle | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over a running AsyncLLM. The caller owns the engine (starts
    it before and shuts it down after), so several apps may share one engine in tests.
    `lifecycle` is what a DrainingServer drains on shutdown (app.state.lifecycle). An engine
    without every EngineClient member is refused here (TypeError, from OpenAIServing), not at
    the first request."""
    metrics = ServerMetrics()
    life = lifecycle if lifecycle is not None else Lifecycle()
    completion = OpenAIServingCompletion(engine, served_model_name, metrics, max_waiting, life)
    chat = OpenAIServingChat(engine, served_model_name, metrics, max_waiting, life)

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

    # Starlette's RequestBodyLimitMiddleware: 413 once the body passes max_body_size bytes.
    app = FastAPI(title="vtensor", version="0.1.0", max_body_size=max_body_size)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.lifecycle = life
    app.state.max_model_len = completion.max_model_len
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
        """200 while the engine lives (a failed request does not count); 503 once it died."""
        if engine.dead is not None:
            return error_response(engine_dead_error())
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
        msg, code = str(exc.detail), None
        if exc.status_code == 413:
            limit = f" of {max_body_size} bytes" if max_body_size is not None else ""
            msg, code = f"The request body is larger than the server's limit{limit}.", "too_large"
        return error_response(
            OpenAIError(msg, status=exc.status_code, type=kind, code=code, headers=exc.headers)
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(internal_error())

    return app
