"""What both OpenAI endpoints share: the engine handle, tokenization and length checks, the
translation of request fields into SamplingParams, and the stream helpers. The sub-requests
themselves (prompts x `n` choices) run in fanout.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from vtensor.engine.client import EngineClient, check_engine_client
from vtensor.engine.outputs import RequestOutput
from vtensor.engine.sampling_params import SamplingParams
from vtensor.server.errors import (
    OpenAIError,
    engine_dead_error,
    internal_error,
    shutting_down_error,
)
from vtensor.server.fanout import SubRequest, run_subrequests
from vtensor.server.lifecycle import Lifecycle
from vtensor.server.metrics import ServerMetrics
from vtensor.server.protocol import SamplingFields, random_id

log = logging.getLogger("vtensor.serve")


class OpenAIServing:
    def __init__(
        self,
        engine: EngineClient,
        served_model_name: str,
        metrics: ServerMetrics,
        max_waiting: int | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.engine = check_engine_client(engine)
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()
        if engine.tokenizer is None:
            raise RuntimeError("the server needs a tokenizer: the model came without one")
        self.tokenizer = engine.tokenizer
        # A KV budget smaller than one max-length request lowers what we accept: a request
        # that can never fit gets a 400 up front instead of failing after its first tokens.
        self.kv_limited = engine.kv_token_capacity < engine.max_model_len
        self.max_model_len = min(engine.kv_token_capacity, engine.max_model_len)
        self.vocab_size = engine.vocab_size

    # ------------------------------------------------------------------ checks

    def check_model(self, model: str | None) -> None:
        # OpenAI requires `model`; we also accept it missing (curl convenience).
        if model is not None and model != self.served_model_name:
            raise OpenAIError(
                f"The model `{model}` does not exist. Available: `{self.served_model_name}`.",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_capacity(self, k: int) -> None:
        """Refuse k more engine requests (prompts x n) when the queue cannot take them. Cheap:
        called before tokenizing, and again by `admit` where they are counted."""
        if self.lifecycle.draining:
            raise shutting_down_error()
        if dead := self.engine.dead:
            log.error("request refused, the engine is dead: %r", dead)
            raise engine_dead_error()
        cap = self.max_waiting
        if cap is None:
            return
        if 0 < cap < k:  # retrying would not help: a client error
            raise OpenAIError(
                f"This request needs {k} engine requests (prompts x n) but the server queues "
                f"at most {cap} (--max-waiting). Send fewer prompts or a smaller n.",
                param="n",
                code="too_many_choices",
            )
        if self.metrics.num_waiting + k > cap:
            raise OpenAIError(
                f"Server overloaded: {self.metrics.num_waiting} requests waiting "
                f"(--max-waiting {cap}). Retry later.",
                status=503,
                type="server_overloaded",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )

    def admit(self, k: int) -> None:
        """Check and count k engine requests as waiting, with no await in between (one event
        loop: concurrent requests cannot all pass the check before any is counted)."""
        self.check_capacity(k)
        self.metrics.num_waiting += k

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Chat templates carry their own BOS; raw completion prompts get the tokenizer's.
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise OpenAIError("The prompt is empty.", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise OpenAIError(
                f"Token id {bad} in `{param}` is out of range [0, {self.vocab_size}).", param=param
            )

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """OpenAI semantics: prompt + max_tokens must fit the context; None = the rest of it."""
        room = self.max_model_len - prompt_len
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = prompt_len + (max_tokens or 0)
            why = " (limited by the server's KV cache budget)" if self.kv_limited else ""
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens{why}. "
                f"However, you requested {asked} tokens ({prompt_len} in the prompt, "
                f"{max_tokens or 0} for the completion). Please reduce the length.",
                param=param,
                code="context_length_exceeded",
            )
        return room if max_tokens is None else max_tokens

    # ------------------------------------------------------------------ params

    def sampling_params(
        self, req: SamplingFields, *, max_tokens: int, logprobs: int | None, seed: int | None
    ) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise OpenAIError("`stop` strings must be non-empty.", param="stop")
        kw: dict[str, Any] = dict(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=seed,
            stop=stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )
        if req.top_k is not None:  # k >= vocab keeps every token: the same as k = vocab
            kw["top_k"] = min(req.top_k, self.vocab_size)
        if req.min_p is not None:
            kw["min_p"] = req.min_p
        if req.repetition_penalty is not None:
            kw["repetition_penalty"] = req.repetition_penalty
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:  # the engine's own validation (names the field)
            raise OpenAIError(f"Invalid sampling parameters: {e}") from e

    def make_subrequests(
        self,
        prompts: list[list[int]],
        req: SamplingFields,
        *,
        max_tokens: list[int],
        logprobs: int | None,
    ) -> list[SubRequest]:
        base = random_id("req")
        subs = []
        for p, ids in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i
                seed = None if req.seed is None else req.seed + i
                params = self.sampling_params(
                    req, max_tokens=max_tokens[p], logprobs=logprobs, seed=seed
                )
                subs.append(SubRequest(index, f"{base}-{index}", ids, params))
        return subs

    # ------------------------------------------------------------------ generation

    async def start(
        self, subs: list[SubRequest]
    ) -> tuple[AsyncIterator[SubRequest], SubRequest | None]:
        """Admit the sub-requests and wait for the first output of any of them, so that every
        error up to then (overload, a request that can never fit, a dead engine) is an HTTP
        status rather than a 200 stream that fails. Returns (the generator, its first item)."""
        self.admit(len(subs))  # run_subrequests uncounts them from num_waiting
        it = run_subrequests(self.engine, subs, self.metrics, self.lifecycle)
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        return it, first

    async def stream_errors(self, rid: str, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE body wrapper: once the status line is gone an error is reported in-band as a
        final `{"error": ...}` event, and the stream always ends with `data: [DONE]`."""
        try:
            async for chunk in body:
                yield chunk
        except OpenAIError as e:
            yield sse(e.to_response())
        except Exception:
            log.exception("stream %s failed", rid)
            yield sse(internal_error().to_response())
        yield sse("[DONE]")

    # ------------------------------------------------------------------ logprobs

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_logprobs(
        self, out: RequestOutput, start: int, end: int
    ) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token id, logprob, [(top id, top logprob), ...] best first) for output tokens
        [start, end). The engine gives each token {token_id: logprob}: the top `logprobs`
        plus the sampled token."""
        comp = out.outputs[0]
        lps = comp.logprobs or []
        res = []
        for j in range(start, min(end, len(comp.token_ids))):
            tid = comp.token_ids[j]
            entry = lps[j] if j < len(lps) else {}
            tops = sorted(entry.items(), key=lambda x: -x[1])
            res.append((tid, entry.get(tid, math.nan), tops))
        return res


async def text_deltas(
    first: SubRequest | None, it: AsyncIterator[SubRequest], num_choices: int
) -> AsyncIterator[tuple[SubRequest, str, str | None]]:
    """(choice, its text not sent yet, finish reason) for `first` (unless None), then for each
    item of `it` that has text to send or finished: a token whose text is held back (a partial
    stop string, an incomplete UTF-8 character) gives nothing. Closing `it` is the caller's."""
    sent = [0] * num_choices  # characters already streamed, per choice
    async for s in _chain(first, it):
        text = s.last.outputs[0].text
        delta, fr = text[sent[s.index] :], finish_reason(s.last)
        if delta or fr is not None:
            sent[s.index] = len(text)
            yield s, delta, fr


async def _chain(
    first: SubRequest | None, it: AsyncIterator[SubRequest]
) -> AsyncIterator[SubRequest]:
    if first is not None:
        yield first
    async for x in it:
        yield x


def new_token_ids(s: SubRequest, sent: list[int]) -> list[int]:
    """Choice s's output ids not streamed yet (return_token_ids); marks them sent."""
    ids = list(s.last.outputs[0].token_ids[sent[s.index] :])
    sent[s.index] += len(ids)
    return ids


def sse(obj: BaseModel | str) -> str:
    """One server-sent event carrying a JSON object (a pydantic model or a plain string)."""
    data = obj if isinstance(obj, str) else obj.model_dump_json()
    return f"data: {data}\n\n"


def finish_reason(out: RequestOutput | None) -> str | None:
    return out.outputs[0].finish_reason if out is not None and out.finished else None


def stop_reason(out: RequestOutput | None) -> str | int | None:
    return out.outputs[0].stop_reason if out is not None else None
