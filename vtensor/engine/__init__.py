"""The engine: requests, sampling, scheduler, runner, LLMEngine, AsyncLLM / MPAsyncLLM and the
LLM API."""

from __future__ import annotations

from vtensor.engine.async_engine import AsyncLLM
from vtensor.engine.client import EngineClient
from vtensor.engine.engine import EngineArgs, LLMEngine, parse_memory
from vtensor.engine.errors import (
    ErrorKind,
    RequestError,
    RequestFailedError,
    RequestTooLargeError,
)
from vtensor.engine.llm import LLM
from vtensor.engine.mp_engine import MPAsyncLLM
from vtensor.engine.outputs import CompletionOutput, RequestOutput
from vtensor.engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "AsyncLLM", "CompletionOutput", "EngineArgs", "EngineClient", "ErrorKind", "LLMEngine",
    "MPAsyncLLM", "RequestError", "RequestFailedError", "RequestOutput", "RequestTooLargeError",
    "SamplingParams", "parse_memory",
]  # fmt: skip
