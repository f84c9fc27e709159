"""Request state: one Sequence per engine request (n = 1; the server fans n out)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from vtensor.engine.detokenizer import Detokenizer
from vtensor.engine.errors import RequestError
from vtensor.engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"  # not admitted yet (or preempted by recompute: KV dropped)
    RUNNING = "running"  # holds a KV slot
    SWAPPED = "swapped"  # preempted by swap: private KV pages in host memory
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    arrival: int  # admission order: preemption picks the newest, resumption the oldest
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # tokens whose KV is in the cache (a prefix of token_ids)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on first admission
    slot: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: RequestError | None = None  # why the engine gave up on it (finish "error")
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    num_sent: int = 0  # output tokens already reported
    text_sent: int = 0  # chars of output text already reported
    num_preemptions: int = 0
    num_pending: int = 0  # sampled tokens still on their way to the host (PLACEHOLDERs at the end)
    sample_row: int = 0  # this request's row in the last launched step's sampled ids
    t_arrival: float = field(default_factory=time.monotonic)
    t_scheduled: float | None = None  # first admitted to the running batch
    t_first_token: float | None = None
    t_finish: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Output token ids known on the host (pending ones excluded)."""
        return self.token_ids[len(self.prompt_token_ids) : len(self.token_ids) - self.num_pending]

    def length_reached(self, num_tokens: int, max_model_len: int) -> bool:
        """With `num_tokens` tokens (prompt + output) it is at its length limit."""
        max_tokens = self.params.max_tokens
        n_out = num_tokens - len(self.prompt_token_ids)
        return (max_tokens is not None and n_out >= max_tokens) or num_tokens >= max_model_len

    def drop_pending(self) -> None:
        """Forget sampled tokens not yet on the host (the request ended before them)."""
        if self.num_pending:
            del self.token_ids[len(self.token_ids) - self.num_pending :]
            self.num_pending = 0

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

def new_sequence(
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams | None,
    *,
    tokenizer: Any,
    max_model_len: int,
    vocab_size: int,
) -> Sequence:
    """A validated request: tokenized (str prompt) or checked (token ids) against the model."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
    if params.n != 1:
        raise ValueError(f"n={params.n}: the engine runs one choice per request; submit n "
                         "requests with different seeds (the server does)")  # fmt: skip
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass the prompt as token ids")
        ids, text = list(tokenizer.encode(prompt)), prompt
    else:
        ids, text = [int(t) for t in prompt], None
    n = len(ids)
    if n == 0:
        raise ValueError("prompt is empty")
    if n >= max_model_len:
        raise ValueError(
            f"prompt of {n} tokens is too long: max_model_len is {max_model_len} "
            "(prompt + at least one output token must fit)"
        )
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer; use stop_token_ids")
    detok = Detokenizer(
        tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
        stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
    )  # fmt: skip
    return Sequence(request_id, text, ids, params, detok, arrival=0)
