"""Client-visible errors: `OpenAIError` (an OpenAI error body with an HTTP status) and the one
mapping from an engine failure (`ErrorKind`) to HTTP. Messages are safe to show: exception types,
internal ids and a dead engine's text stay in the server log."""

from __future__ import annotations

from vtensor.engine.errors import ErrorKind, RequestError
from vtensor.server.protocol import ErrorInfo, ErrorResponse


class OpenAIError(Exception):
    """A client-visible error: becomes `{"error": {...}}` with `status` (never a 500)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


# The one mapping from an engine failure (ErrorKind) to HTTP: status, OpenAI type, code.
FAILURE_HTTP: dict[ErrorKind, tuple[int, str, str]] = {
    ErrorKind.TOO_LARGE: (400, "invalid_request_error", "request_too_large"),
    ErrorKind.INVALID: (400, "invalid_request_error", "invalid_request"),
    ErrorKind.INTERNAL: (500, "server_error", "internal_error"),
}


def failure_error(error: RequestError) -> OpenAIError:
    """The client's view of a request the engine failed (its message is client-safe)."""
    status, type_, code = FAILURE_HTTP.get(error.kind, FAILURE_HTTP[ErrorKind.INTERNAL])
    return OpenAIError(error.message, status=status, type=type_, code=code)


# Factories, not constants: a raised exception keeps its traceback, so each raise gets a new one.
def _server_error(
    message: str, status: int, code: str, retry_after: int | None = None
) -> OpenAIError:
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return OpenAIError(message, status=status, type="server_error", code=code, headers=headers)


def internal_error() -> OpenAIError:
    """A bug in the server: the details go to the log, never to the client."""
    return _server_error(
        "Internal server error (details are in the server log).", 500, "internal_error"
    )


def engine_dead_error() -> OpenAIError:
    return _server_error(
        "The inference engine has failed and the server must be restarted.", 503, "engine_dead"
    )


def shutting_down_error() -> OpenAIError:
    return _server_error(
        "The server is shutting down. Retry on another instance or later.",
        503,
        "server_shutting_down",
        retry_after=5,
    )
