"""One HTTP request's engine requests, run concurrently: prompts x `n` choices.

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

import anyio

from vtensor.engine.client import EngineClient
from vtensor.engine.errors import RequestFailedError
from vtensor.engine.outputs import RequestOutput
from vtensor.engine.sampling_params import SamplingParams
from vtensor.engine.streams import EngineDeadError
from vtensor.server.errors import (
    OpenAIError,
    engine_dead_error,
    failure_error,
    internal_error,
    shutting_down_error,
)
from vtensor.server.lifecycle import SHUTDOWN, Lifecycle
from vtensor.server.metrics import ServerMetrics
from vtensor.server.protocol import PromptTokensDetails, UsageInfo

log = logging.getLogger("vtensor.serve")


@dataclass(slots=True)
class SubRequest:
    """One engine request: choice `index` of the HTTP request."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # first output token arrived (TTFT)
    num_tokens: int = 0  # output tokens seen so far (for TPOT and tokens/s)
    last: RequestOutput | None = None  # latest output


async def run_subrequests(
    engine: EngineClient, subs: list[SubRequest], metrics: ServerMetrics, lifecycle: Lifecycle
) -> AsyncIterator[SubRequest]:
    """Run the sub-requests concurrently; yield a sub-request each time it has new output
    (its `.last`). The caller has counted them in `metrics.num_waiting`; each is uncounted at
    its first token or its end. On cancellation (client gone), error or the drain deadline,
    every unfinished sub-request is aborted in the engine, which frees its KV at once. Errors
    leave as OpenAIError with a client-safe message."""
    # (sub, output, None) | (sub, None, error) | (None, index of a sub whose pump ended, None);
    # SHUTDOWN from the lifecycle at the drain deadline
    queue: asyncio.Queue = asyncio.Queue()
    waiting = set(range(len(subs)))  # sub.index is its position in subs
    lifecycle.register(queue)
    tasks = [asyncio.create_task(_pump(engine, s, queue)) for s in subs]
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
                    metrics.num_waiting -= 1
                continue
            if err is not None:
                raise err
            _observe(sub, out, metrics)
            if out.finished and out.error is not None:  # (AsyncLLM raises these itself)
                raise failure_error(out.error)
            if sub.index in waiting and sub.num_tokens > 0:
                waiting.discard(sub.index)
                metrics.num_waiting -= 1
            yield sub
    finally:
        lifecycle.unregister(queue)
        metrics.num_waiting -= len(waiting)
        unfinished = [s for s in subs if s.index not in finished]
        for t in tasks:
            t.cancel()
        if unfinished:
            # Shielded: this runs inside a cancelled scope when the client went away.
            with anyio.CancelScope(shield=True):
                for s in unfinished:
                    await engine.abort(s.request_id)
                metrics.num_aborted += len(unfinished)


async def _pump(engine: EngineClient, sub: SubRequest, queue: asyncio.Queue) -> None:
    """The engine's outputs for one sub-request onto the shared queue, errors made safe."""
    try:
        async for out in engine.generate(sub.prompt_ids, sub.params, sub.request_id):
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


def _observe(sub: SubRequest, out: RequestOutput, metrics: ServerMetrics) -> None:
    """Record the output on the sub-request and the latencies / token counts in metrics."""
    now = time.perf_counter()
    sub.last = out
    n = len(out.outputs[0].token_ids) if out.outputs else 0
    new = n - sub.num_tokens
    if new > 0:
        if sub.t_first is None:
            sub.t_first = now
            metrics.ttft.observe(now - sub.t_submit)
            metrics.observe_engine_times(out.metrics)
        metrics.add_generated(new, now)
    sub.num_tokens = n
    if out.finished:
        metrics.prompt_tokens += len(sub.prompt_ids)
        if n > 1 and sub.t_first is not None:
            metrics.tpot.observe((now - sub.t_first) / (n - 1))
        reason = out.outputs[0].finish_reason if out.outputs else None
        metrics.count_finished(reason or "unknown")


def make_usage(subs: list[SubRequest], n: int) -> UsageInfo:
    """OpenAI counts each prompt once however many choices it has; cached tokens are those of
    each prompt's first choice (the later choices share its pages anyway)."""
    prompt = sum(len(s.prompt_ids) for s in subs[::n])
    cached = sum(s.last.num_cached_tokens for s in subs[::n] if s.last is not None)
    completion = sum(s.num_tokens for s in subs)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )
