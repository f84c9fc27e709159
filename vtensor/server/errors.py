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


def internal_error() -> OpenAIError:
    """A bug in the server: the details go to the log, never to the client."""
    return OpenAIError(
        "Internal server error (details are in the server log).",
        status=500,
        type="server_error",
        code="internal_error",
    )


def engine_dead_error() -> OpenAIError:
    return OpenAIError(
        "The inference engine has failed and the server must be restarted.",
        status=503,
        type="server_error",
        code="engine_dead",
    )


def shutting_down_error() -> OpenAIError:
    return OpenAIError(
        "The server is shutting down. Retry on another instance or later.",
        status=503,
        type="server_error",
        code="server_shutting_down",
        headers={"Retry-After": "5"},
    )
