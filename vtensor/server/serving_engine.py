"""What both OpenAI endpoints share: the engine handle, tokenization and length checks, the
translation of request fields into SamplingParams, and the fan-out of `n` choices.

`n > 1` runs as n engine requests with derived seeds (seed + i) rather than one request with n
samples: each choice is then an ordinary request that the scheduler batches, the prefix cache
shares the prompt's pages between them, and aborting one client aborts exactly its requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from vtensor.engine.async_engine import EngineDeadError
from vtensor.engine.errors import RequestError, RequestFailedError
from vtensor.server.engine_info import (
    engine_dead,
    engine_max_model_len,
    engine_tokenizer,
    engine_vocab_size,
    kv_token_capacity,
)
from vtensor.server.errors import (
    OpenAIError,
    engine_dead_error,
    failure_error,
    internal_error,
    shutting_down_error,
)
from vtensor.server.lifecycle import SHUTDOWN, Lifecycle
from vtensor.server.metrics import ServerMetrics
from vtensor.server.protocol import (
    PromptTokensDetails,
    SamplingFields,
    UsageInfo,
    random_id,
)

log = logging.getLogger("vtensor.serve")


@dataclass(slots=True)
class SubRequest:
    """One engine request: choice `index` of the HTTP request."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # first output token arrived (TTFT)
    num_tokens: int = 0  # output tokens seen so far (for TPOT and tokens/s)
    last: Any = None  # latest RequestOutput


class OpenAIServing:
    def __init__(
        self,
        engine: Any,
        served_model_name: str,
        metrics: ServerMetrics,
        max_waiting: int | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()
        self.tokenizer = engine_tokenizer(engine)
        # A KV budget smaller than one max-length request lowers what we accept: a request
        # that can never fit gets a 400 up front instead of failing after its first tokens.
        self.engine_max_model_len = engine_max_model_len(engine)
        capacity = kv_token_capacity(engine)
        self.kv_limited = capacity is not None and capacity < self.engine_max_model_len
        self.max_model_len = capacity if self.kv_limited else self.engine_max_model_len
        vocab = engine_vocab_size(engine)
        self.vocab_size = vocab if vocab is not None else len(self.tokenizer)

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
        if dead := engine_dead(self.engine):
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
    ) -> Any:
        from vtensor.engine import SamplingParams

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

    async def generate(self, subs: list[SubRequest]) -> AsyncIterator[SubRequest]:
        """Run the sub-requests concurrently; yield a sub-request each time it has new output
        (its `.last` is the engine's RequestOutput). Admission (`--max-waiting`) happens on the
        first `__anext__`, before anything reaches the engine. On cancellation (client gone),
        error or the drain deadline, every unfinished sub-request is aborted in the engine,
        which frees its KV at once. Errors leave as OpenAIError with a client-safe message."""
        self.admit(len(subs))
        queue: asyncio.Queue[Any] = asyncio.Queue()
        waiting = set(range(len(subs)))
        self.lifecycle.register(queue)

        async def pump(sub: SubRequest) -> None:
            try:
                async for out in self.engine.generate(sub.prompt_ids, sub.params, sub.request_id):
                    queue.put_nowait((sub, out, None))
            except asyncio.CancelledError:
                raise
            except EngineDeadError as e:  # not the client's fault, and not going to recover
                log.error("request %s: engine dead: %s", sub.request_id, e)
                queue.put_nowait((sub, None, engine_dead_error()))
            except RequestFailedError as e:  # the engine failed this request alone
                log.warning("request %s failed (%s): %s", sub.request_id, e.error.kind.value, e)
                queue.put_nowait((sub, None, failure_error(e.error)))
            except (ValueError, TypeError) as e:  # the engine rejected the request's input
                queue.put_nowait((sub, None, OpenAIError(f"Invalid request: {e}")))
            except BaseException as e:  # a bug: logged, reported without its details
                log.exception("request %s: unexpected error", sub.request_id)
                queue.put_nowait((sub, None, internal_error()))
                if not isinstance(e, Exception):
                    raise
            finally:
                queue.put_nowait((None, sub.index, None))

        # sub.index is its position in subs (choices are made in order).
        tasks = [asyncio.create_task(pump(s)) for s in subs]
        remaining = len(subs)
        finished: set[int] = set()
        try:
            while remaining:
                item = await queue.get()
                if item is SHUTDOWN:
                    raise shutting_down_error()
                sub, out, err = item
                if sub is None:  # the pump of choice `out` ended
                    remaining -= 1
                    finished.add(out)
                    if out in waiting:
                        waiting.discard(out)
                        self.metrics.num_waiting -= 1
                    continue
                if err is not None:
                    raise err
                self._observe(sub, out)
                error = getattr(out, "error", None)
                if out.finished and error is not None:  # (AsyncLLM raises these itself)
                    if isinstance(error, RequestError):
                        raise failure_error(error)
                    log.warning("request %s failed: %s", sub.request_id, error)
                    raise internal_error()
                if sub.index in waiting and sub.num_tokens > 0:
                    waiting.discard(sub.index)
                    self.metrics.num_waiting -= 1
                yield sub
        finally:
            self.lifecycle.unregister(queue)
            self.metrics.num_waiting -= len(waiting)
            unfinished = [s for s in subs if s.index not in finished]
            for t in tasks:
                t.cancel()
            if unfinished:
                # Shielded: this runs inside a cancelled scope when the client went away.
                with anyio.CancelScope(shield=True):
                    for s in unfinished:
                        await self.engine.abort(s.request_id)
                    self.metrics.num_aborted += len(unfinished)

    async def start(self, subs: list[SubRequest]) -> tuple[AsyncIterator[SubRequest], Any]:
        """Admit the sub-requests and wait for the first output of any of them, so that every
        error up to then (overload, a request that can never fit, a dead engine) is an HTTP
        status rather than a 200 stream that fails. Returns (the generator, its first item)."""
        it = self.generate(subs)
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

    def _observe(self, sub: SubRequest, out: Any) -> None:
        now = time.perf_counter()
        sub.last = out
        n = len(out.outputs[0].token_ids) if out.outputs else 0
        new = n - sub.num_tokens
        if new > 0:
            if sub.t_first is None:
                sub.t_first = now
                self.metrics.ttft.observe(now - sub.t_submit)
            self.metrics.add_generated(new, now)
        sub.num_tokens = n
        if out.finished:
            self.metrics.prompt_tokens += len(sub.prompt_ids)
            if n > 1 and sub.t_first is not None:
                self.metrics.tpot.observe((now - sub.t_first) / (n - 1))
            reason = out.outputs[0].finish_reason if out.outputs else None
            self.metrics.count_finished(reason or "unknown")

    # ------------------------------------------------------------------ logprobs

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_logprobs(self, out: Any, start: int, end: int) -> list[tuple[int, float, list]]:
        """(token id, logprob, [(top id, top logprob), ...]) for output tokens [start, end)."""
        comp = out.outputs[0]
        lps = comp.logprobs or []
        res = []
        for j in range(start, min(end, len(comp.token_ids))):
            tid = comp.token_ids[j]
            entry = lps[j] if j < len(lps) else None
            res.append((tid, *_split_logprob_entry(entry, tid)))
        return res


def _lp_value(v: Any) -> float:
    # A float, or a vLLM-style Logprob object with .logprob.
    return float(getattr(v, "logprob", v))


def _split_logprob_entry(entry: Any, tid: int) -> tuple[float, list[tuple[int, float]]]:
    """Normalize one token's logprob record: a {token_id: logprob} dict (top-k plus the sampled
    token), or an object with .logprob and .top_logprobs, into (logprob, top list)."""
    if entry is None:
        return float("nan"), []
    if isinstance(entry, dict):
        tops = sorted(((int(k), _lp_value(v)) for k, v in entry.items()), key=lambda x: -x[1])
        chosen = entry.get(tid)
        return (_lp_value(chosen) if chosen is not None else float("nan")), tops
    lp = _lp_value(entry)
    tops_raw = getattr(entry, "top_logprobs", None) or []
    if isinstance(tops_raw, dict):
        tops_raw = list(tops_raw.items())
    tops = [(int(t), _lp_value(v)) for t, v in tops_raw]
    return lp, tops


def make_usage(subs: list[SubRequest], n: int) -> UsageInfo:
    """OpenAI counts each prompt once however many choices it has; cached tokens are those of
    each prompt's first choice (the later choices share its pages anyway)."""
    prompt = sum(len(s.prompt_ids) for s in subs[::n])
    cached = sum(getattr(s.last, "num_cached_tokens", 0) or 0 for s in subs[::n] if s.last)
    completion = sum(s.num_tokens for s in subs)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def chain_first(first: Any, it: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`first` (unless None), then the rest of `it` (closing `it` is the caller's job)."""
    if first is not None:
        yield first
    async for x in it:
        yield x


def sse(obj: Any) -> str:
    """One server-sent event carrying a JSON object (a pydantic model or a plain string)."""
    data = obj if isinstance(obj, str) else obj.model_dump_json()
    return f"data: {data}\n\n"


def finish_reason(out: Any) -> str | None:
    return out.outputs[0].finish_reason if out is not None and out.finished else None


def stop_reason(out: Any) -> Any:
    return getattr(out.outputs[0], "stop_reason", None) if out is not None else None
