"""What the engine hands back per step: one RequestOutput per request that made progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtensor.engine.errors import RequestError
from vtensor.engine.sequence import Sequence


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
    # arrival / first scheduled / first token / finish times (time.monotonic)
    metrics: dict | None = None


def make_output(seq: Sequence) -> RequestOutput:
    """The request's output so far; the new-token / new-text deltas are since the last call."""
    finished = seq.finish_reason is not None  # length stops are released at launch
    out_ids = seq.output_token_ids
    text = seq.detok.visible(finished)
    comp = CompletionOutput(
        index=0,
        text=text,
        token_ids=out_ids,
        new_token_ids=out_ids[seq.num_sent :],
        new_text=text[seq.text_sent :],
        logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
        cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
        finish_reason=seq.finish_reason if finished else None,
        stop_reason=seq.stop_reason,
    )
    seq.num_sent, seq.text_sent = len(out_ids), len(text)
    return RequestOutput(
        request_id=seq.request_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.prompt_token_ids,
        outputs=[comp],
        finished=finished,
        num_cached_tokens=seq.num_cached_tokens,
        error=seq.error,
        metrics={
            "arrival": seq.t_arrival,
            "scheduled": seq.t_scheduled,
            "first_token": seq.t_first_token,
            "finish": seq.t_finish,
            "num_preemptions": seq.num_preemptions,
        },  # fmt: skip
    )
