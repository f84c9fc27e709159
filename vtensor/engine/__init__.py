"""The engine: requests, sampling, scheduler, runner, LLMEngine, AsyncLLM and the LLM API."""

from __future__ import annotations

from vtensor.engine.async_engine import AsyncLLM
from vtensor.engine.engine import EngineArgs, LLMEngine, parse_memory
from vtensor.engine.llm import LLM
from vtensor.engine.outputs import CompletionOutput, RequestOutput
from vtensor.engine.sampling_params import SamplingParams
from vtensor.engine.scheduler import RequestTooLargeError

__all__ = [
    "LLM", "AsyncLLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput",
    "RequestTooLargeError", "SamplingParams", "parse_memory",
]  # fmt: skip
