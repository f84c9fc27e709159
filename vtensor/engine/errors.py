"""Why the engine gave up on a request: one typed status, mapped to HTTP codes by the server.

A failure tied to one request (it can never fit in the KV cache, the sampler raised on its
parameters, its detokenizer failed) ends that request with a `RequestError`; the engine and the
other requests go on. Only a failure that leaves the device unusable kills the engine
(`EngineDeadError` in AsyncLLM).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch


def is_device_error(e: BaseException) -> bool:
    """A device error leaves the CUDA context unusable: no request can be served after it."""
    return isinstance(e, torch.AcceleratorError) or "CUDA error" in str(e)


class ErrorKind(StrEnum):
    TOO_LARGE = "too_large"  # needs more KV than the cache can ever give it: a client error
    INVALID = "invalid"  # a bad request found inside the engine: a client error
    INTERNAL = "internal"  # the engine failed on this request: a server error


@dataclass(frozen=True, slots=True)
class RequestError:
    kind: ErrorKind
    message: str  # safe to show the client: no exception types, no internal state


class RequestFailedError(RuntimeError):
    """Raised to the caller of a request that ended with a RequestError."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error

    @property
    def kind(self) -> ErrorKind:
        return self.error.kind


class RequestTooLargeError(RequestFailedError, ValueError):
    """The request cannot fit in the KV cache even with the engine to itself."""

    def __init__(self, error: RequestError | str) -> None:
        if isinstance(error, str):
            error = RequestError(ErrorKind.TOO_LARGE, error)
        super().__init__(error)


def raise_for(error: RequestError) -> None:
    """Raise the exception type that matches `error`."""
    if error.kind == ErrorKind.TOO_LARGE:
        raise RequestTooLargeError(error)
    raise RequestFailedError(error)


__all__ = ["ErrorKind", "RequestError", "RequestFailedError", "RequestTooLargeError", "raise_for"]
