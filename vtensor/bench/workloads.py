"""Benchmark workloads, generated (no downloads) from fixed seeds.

Prompts are lists of token ids drawn uniformly from `token_range` (ids away from the special
tokens at either end of a vocabulary), so a workload is independent of any tokenizer and the
same ids reach every system. Lengths follow the distributions documented below; every length
can be shrunk with `len_scale` (and counts chosen by the caller) for toy CPU runs.

Length distributions (before `len_scale`):

    ShareGPT-like message  lognormal, median 100 tokens, sigma 1.0, clipped to [4, 2048]
                           (p90 ~360, p99 ~1000: a long tail to ~2K as in ShareGPT)
    ShareGPT-like reply    lognormal, median 100 tokens, sigma 0.9, clipped to [4, 1024]
    system prompt          uniform in [1024, 4096]
    long-context prompt    uniform in [6144, 8192], output uniform in [2048, 4096]

Workloads:

    multi_turn    C conversations x T turns. Turn t sends the whole history (every earlier user
                  message and generated reply) plus user message t, as OpenAI-API clients do;
                  the runner appends each turn's *generated* reply before the next turn.
    shared_prefix N requests, each = one of P long system prompts + a ShareGPT-like question.
    long_context  N prompts of 6K-8K tokens generating 2K-4K tokens (the LV-Eval setup).
    sharegpt      N independent ShareGPT-like requests (plain offline throughput).

Every request is generated with `ignore_eos` semantics in mind: `max_tokens` is the number of
tokens the runner asks for; runners report the tokens actually produced.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_TOKEN_RANGE = (1000, 30000)  # inside every vocabulary we bench (SmolLM2 has 49152)


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(slots=True)
class Conversation:
    conv_id: str
    user_turns: list[list[int]]  # user message t, token ids (no chat template)
    reply_lens: list[int]  # max_tokens for turn t


@dataclass(slots=True)
class Workload:
    name: str
    description: str
    requests: list[Request] = field(default_factory=list)  # single-shot workloads
    conversations: list[Conversation] = field(default_factory=list)  # multi-turn workloads
    params: dict = field(default_factory=dict)  # generator arguments, for the JSON record

    @property
    def multi_turn(self) -> bool:
        return bool(self.conversations)

    def max_context(self) -> int:
        """Longest prompt + output any request can reach (to size max_model_len)."""
        if self.conversations:
            return max(
                sum(len(u) for u in c.user_turns) + sum(c.reply_lens) for c in self.conversations
            )
        return max(len(r.prompt_token_ids) + r.max_tokens for r in self.requests)

    def stats(self) -> dict:
        """Counts and token totals (prompt tokens as sent, i.e. with resent history)."""
        if self.conversations:
            prompt = output = 0
            for c in self.conversations:
                hist = 0
                for u, r in zip(c.user_turns, c.reply_lens, strict=True):
                    hist += len(u)
                    prompt += hist
                    output += r
                    hist += r
            n = sum(len(c.user_turns) for c in self.conversations)
            return {
                "num_conversations": len(self.conversations),
                "num_requests": n,
                "prompt_tokens": prompt,
                "max_output_tokens": output,
                "max_context": self.max_context(),
            }
        return {
            "num_requests": len(self.requests),
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in self.requests),
            "max_output_tokens": sum(r.max_tokens for r in self.requests),
            "max_context": self.max_context(),
        }


# --- length distributions -------------------------------------------------------------------


def lognormal_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(sigma * rng.gauss(0.0, 1.0))))))


def _scaled(n: float, s: float, floor: int = 1) -> int:
    return max(floor, int(round(n * s)))


def sharegpt_message_len(rng: random.Random, len_scale: float = 1.0) -> int:
    lo, hi = _scaled(4, len_scale), _scaled(2048, len_scale, 2)
    return lognormal_len(rng, 100 * len_scale, 1.0, lo, hi)


def sharegpt_reply_len(rng: random.Random, len_scale: float = 1.0) -> int:
    lo, hi = _scaled(4, len_scale), _scaled(1024, len_scale, 2)
    return lognormal_len(rng, 100 * len_scale, 0.9, lo, hi)


def _rng(name: str, seed: int) -> random.Random:
    # one stream per (workload, seed): workloads never share token sequences by accident
    # (str seeds are hashed deterministically, unlike hash())
    return random.Random(f"{name}:{seed}")


def _tokens(rng: random.Random, n: int, token_range: tuple[int, int]) -> list[int]:
    lo, hi = token_range
    if not 0 <= lo < hi:
        raise ValueError(f"bad token_range {token_range}")
    return [rng.randrange(lo, hi) for _ in range(n)]


def _check(**positive: float) -> None:
    for k, v in positive.items():
        if v <= 0:
            raise ValueError(f"{k} must be > 0, got {v}")


# --- generators -----------------------------------------------------------------------------


def multi_turn(
    num_conversations: int = 64,
    num_turns: int = 4,
    *,
    seed: int = 0,
    len_scale: float = 1.0,
    max_context: int = 8192,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> Workload:
    """C conversations x T turns; a conversation never grows past `max_context` tokens
    (user messages are shortened, never dropped, so every conversation has T turns)."""
    _check(num_conversations=num_conversations, num_turns=num_turns, len_scale=len_scale)
    if max_context < 2 * num_turns:
        raise ValueError(f"max_context {max_context} too small for {num_turns} turns")
    rng = _rng("multi_turn", seed)
    convs = []
    for c in range(num_conversations):
        users, replies, total = [], [], 0
        for t in range(num_turns):
            left = max_context - total - 2 * (num_turns - t - 1)  # keep >= 2 tokens per turn
            u = min(sharegpt_message_len(rng, len_scale), max(1, left // 2))
            r = min(sharegpt_reply_len(rng, len_scale), max(1, left - u))
            users.append(_tokens(rng, u, token_range))
            replies.append(r)
            total += u + r
        convs.append(Conversation(f"conv{c}", users, replies))
    return Workload(
        "multi_turn",
        f"{num_conversations} conversations x {num_turns} turns, ShareGPT-like messages and "
        "replies, whole history resent each turn",
        conversations=convs,
        params=dict(
            num_conversations=num_conversations,
            num_turns=num_turns,
            seed=seed,
            len_scale=len_scale,
            max_context=max_context,
        ),
    )


def shared_prefix(
    num_requests: int = 256,
    num_prefixes: int = 4,
    *,
    prefix_len: tuple[int, int] = (1024, 4096),
    seed: int = 0,
    len_scale: float = 1.0,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> Workload:
    """Requests i uses system prompt i % P (interleaved, so they share it while in flight)."""
    _check(num_requests=num_requests, num_prefixes=num_prefixes, len_scale=len_scale)
    rng = _rng("shared_prefix", seed)
    lo, hi = _scaled(prefix_len[0], len_scale), _scaled(prefix_len[1], len_scale)
    prefixes = [_tokens(rng, rng.randint(lo, hi), token_range) for _ in range(num_prefixes)]
    reqs = []
    for i in range(num_requests):
        q = _tokens(rng, sharegpt_message_len(rng, len_scale), token_range)
        reqs.append(
            Request(f"sp{i}", prefixes[i % num_prefixes] + q, sharegpt_reply_len(rng, len_scale))
        )
    return Workload(
        "shared_prefix",
        f"{num_requests} requests behind {num_prefixes} system prompts of "
        f"{lo}-{hi} tokens + ShareGPT-like questions",
        requests=reqs,
        params=dict(
            num_requests=num_requests,
            num_prefixes=num_prefixes,
            prefix_len=list(prefix_len),
            seed=seed,
            len_scale=len_scale,
        ),
    )


def long_context(
    num_requests: int = 16,
    *,
    prompt_len: tuple[int, int] = (6144, 8192),
    output_len: tuple[int, int] = (2048, 4096),
    seed: int = 0,
    len_scale: float = 1.0,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> Workload:
    _check(num_requests=num_requests, len_scale=len_scale)
    rng = _rng("long_context", seed)
    plo, phi = _scaled(prompt_len[0], len_scale), _scaled(prompt_len[1], len_scale)
    olo, ohi = _scaled(output_len[0], len_scale), _scaled(output_len[1], len_scale)
    reqs = [
        Request(f"lc{i}", _tokens(rng, rng.randint(plo, phi), token_range), rng.randint(olo, ohi))
        for i in range(num_requests)
    ]
    return Workload(
        "long_context",
        f"{num_requests} prompts of {plo}-{phi} tokens generating {olo}-{ohi} tokens",
        requests=reqs,
        params=dict(
            num_requests=num_requests,
            prompt_len=list(prompt_len),
            output_len=list(output_len),
            seed=seed,
            len_scale=len_scale,
        ),
    )


def sharegpt(
    num_requests: int = 512,
    *,
    seed: int = 0,
    len_scale: float = 1.0,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> Workload:
    _check(num_requests=num_requests, len_scale=len_scale)
    rng = _rng("sharegpt", seed)
    reqs = [
        Request(
            f"sg{i}",
            _tokens(rng, sharegpt_message_len(rng, len_scale), token_range),
            sharegpt_reply_len(rng, len_scale),
        )
        for i in range(num_requests)
    ]
    return Workload(
        "sharegpt",
        f"{num_requests} independent ShareGPT-like requests",
        requests=reqs,
        params=dict(num_requests=num_requests, seed=seed, len_scale=len_scale),
    )


def small_batch(
    num_requests: int = 8,
    *,
    prompt_len: int = 2048,
    output_len: int = 1024,
    seed: int = 0,
    len_scale: float = 1.0,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> Workload:
    """A few requests decoding in lock step: per-step latency at a small batch, the regime of
    the tail of every multi-turn wave (bounded by reading the weights each step)."""
    _check(num_requests=num_requests, len_scale=len_scale)
    rng = _rng("small_batch", seed)
    p, o = _scaled(prompt_len, len_scale), _scaled(output_len, len_scale)
    reqs = [Request(f"sb{i}", _tokens(rng, p, token_range), o) for i in range(num_requests)]
    return Workload(
        "small_batch",
        f"{num_requests} prompts of {p} tokens generating {o} tokens each",
        requests=reqs,
        params=dict(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len,
                    seed=seed, len_scale=len_scale),  # fmt: skip
    )


GENERATORS: dict[str, Callable[..., Workload]] = {
    "multi_turn": multi_turn,
    "shared_prefix": shared_prefix,
    "long_context": long_context,
    "sharegpt": sharegpt,
    "small_batch": small_batch,
}

# Sizes: "full" fits the H200 budget of `vtensor bench all`; "quick" is a toy CPU run;
# "smoke" is the CI test's.
SIZES: dict[str, dict[str, dict]] = {
    "full": {
        "multi_turn": dict(num_conversations=64, num_turns=4),
        "shared_prefix": dict(num_requests=256, num_prefixes=4),
        "long_context": dict(num_requests=16),
        "sharegpt": dict(num_requests=512),
        "small_batch": dict(num_requests=8),
    },
    "quick": {
        "multi_turn": dict(num_conversations=4, num_turns=3, len_scale=1 / 16, max_context=256),
        "shared_prefix": dict(num_requests=8, num_prefixes=2, len_scale=1 / 32),
        "long_context": dict(num_requests=2, len_scale=1 / 128),
        "sharegpt": dict(num_requests=8, len_scale=1 / 16),
        "small_batch": dict(num_requests=2, len_scale=1 / 64),
    },
    "smoke": {  # CI: a handful of tokens each, every code path
        "multi_turn": dict(num_conversations=2, num_turns=2, len_scale=1 / 16, max_context=48),
        "shared_prefix": dict(num_requests=4, num_prefixes=2, len_scale=1 / 128),
        "long_context": dict(num_requests=1, len_scale=1 / 256),
        "sharegpt": dict(num_requests=3, len_scale=1 / 16),
        "small_batch": dict(num_requests=1, len_scale=1 / 256),
    },
}


def make(
    name: str,
    size: str = "full",
    *,
    seed: int = 0,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
    **overrides,
) -> Workload:
    """Build workload `name` at a preset size ("full" | "quick" | "smoke"), with overrides."""
    if name not in GENERATORS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(GENERATORS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    kwargs = {**SIZES[size][name], **overrides}
    return GENERATORS[name](seed=seed, token_range=token_range, **kwargs)


def truncate(wl: Workload, max_requests: int) -> Workload:
    """The first `max_requests` requests (or conversations) of `wl`: for slow baselines."""
    return Workload(
        wl.name,
        wl.description + f" (first {max_requests})",
        requests=wl.requests[:max_requests],
        conversations=wl.conversations[:max_requests],
        params={**wl.params, "truncated_to": max_requests},
    )


def workload_to_json(wl: Workload) -> dict:
    """Everything a worker process needs to run `wl` with the very same token ids."""
    return {
        "name": wl.name,
        "description": wl.description,
        "params": wl.params,
        "requests": [[r.request_id, r.prompt_token_ids, r.max_tokens] for r in wl.requests],
        "conversations": [[c.conv_id, c.user_turns, c.reply_lens] for c in wl.conversations],
    }


def workload_from_json(d: dict) -> Workload:
    return Workload(
        d["name"],
        d["description"],
        requests=[Request(i, list(p), int(m)) for i, p, m in d.get("requests", [])],
        conversations=[Conversation(i, [list(u) for u in us], [int(x) for x in rs])
                       for i, us, rs in d.get("conversations", [])],  # fmt: skip
        params=dict(d.get("params", {})),
    )


def warmup_prompt(wls: list[Workload], n: int = 16) -> list[int]:
    """A short prompt of ids from the workloads themselves (inside the model's vocabulary)."""
    w = wls[0]
    first = w.requests[0].prompt_token_ids if w.requests else w.conversations[0].user_turns[0]
    return list(first[:n])
