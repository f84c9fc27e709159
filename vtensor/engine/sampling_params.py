"""SamplingParams: what one request asks of the sampler and the stop checks.

Validated on construction: a bad value raises ValueError naming the field, so that the server
can answer 400 with the engine's own message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bounds that keep every value representable where the sampler uses it (top_k in an int32
# kernel argument, seeds in torch's int64 generator) and follow vLLM's _verify_args for the rest.
MAX_TOP_K = 2**31 - 1
MAX_REPETITION_PENALTY = 2.0
MAX_SEED = 2**63 - 1


@dataclass(slots=True)
class SamplingParams:
    n: int = 1  # choices per request; the server fans n > 1 out as n requests
    max_tokens: int | None = 16  # None: until EOS or max_model_len
    min_tokens: int = 0  # EOS / stop ids are masked until this many output tokens
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None  # per-request torch.Generator: reproducible whatever the batch
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # > 1 discourages tokens of prompt + output (CTRL style)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's + top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # The server passes None for fields the client left out: treat them as defaults.
        for name, default in (
            ("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
            ("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
            ("min_tokens", 0), ("n", 1),
        ):  # fmt: skip
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            bad("max_tokens", "must be an integer >= 1 (or None)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if not self.temperature >= 0.0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not -1 <= self.top_k <= MAX_TOP_K
        ):
            bad("top_k", f"must be an integer: -1 or 0 (disabled) or 1..{MAX_TOP_K}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_K
        ):
            bad("logprobs", f"must be an integer in [0, {MAX_TOP_K}] (or None)")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -MAX_SEED - 1 <= self.seed <= MAX_SEED
        ):
            bad("seed", "must be a 64-bit signed integer (or None)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must hold non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must hold token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
