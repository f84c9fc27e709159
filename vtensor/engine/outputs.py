"""What the engine hands back per step: one RequestOutput per request that made progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtensor.engine.errors import RequestError


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # all output text so far (stop string trimmed)
    token_ids: list[int]  # all output token ids so far
    new_token_ids: list[int] = field(default_factory=list)  # delta since the last output
    new_text: str = ""  # delta since the last output
    # per output token {token_id: logprob}: the sampled token plus the top `logprobs`
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  # stop | length | abort (client) | error | None
    stop_reason: str | int | None = None  # the stop string / stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the KV cache (not recomputed)
    error: RequestError | None = None  # why the engine gave up on it (finish "error")
    metrics: dict | None = None  # arrival / first token / finish times (time.monotonic)
