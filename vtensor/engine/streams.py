"""Per-request output streams: what both engine clients (AsyncLLM's thread, MPAsyncLLM's
process) share. A thread that is not the event loop's delivers each step's outputs with one
`call_soon_threadsafe` per loop; `stream` yields them to the request's caller and aborts the
request if the caller goes away before it finished. A caller that fell behind gets the outputs
waiting for it as one (the latest, with the deltas joined): under load the event loop then
does one SSE chunk's work per request per turn, not one per engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from vtensor.engine.errors import raise_for
from vtensor.engine.outputs import RequestOutput
from vtensor.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vtensor.engine.sequence import Sequence


class EngineDeadError(RuntimeError):
    """The engine (thread or process) failed; requests in flight get this error."""


class RequestStreams:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.ttft: deque[float] = deque(maxlen=2048)  # seconds, recent finished requests
        self.tpot: deque[float] = deque(maxlen=2048)

    def open(self, request_id: str) -> asyncio.Queue:
        """The queue `request_id`'s outputs arrive on (call from the event loop)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already running")
            self._queues[request_id] = (loop, q)
        return q

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    async def stream(
        self, request_id: str, q: asyncio.Queue, abort: Callable[[str], None]
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; an error item is raised. Closed early
        (cancelled, client gone): `abort(request_id)` frees its KV now."""
        finished = False
        pending = None
        try:
            while True:
                item = pending if pending is not None else await q.get()
                pending = None
                while _open(item) and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, RequestOutput) and nxt.error is None:
                        item = merge_outputs(item, nxt)
                    else:  # an error goes out after what came before it
                        pending = nxt
                        break
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise_for(item.error)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.discard(request_id)
            if not finished:
                abort(request_id)

    def observe(self, outs: list[RequestOutput]) -> None:
        """TTFT / TPOT samples of the finished requests among `outs` (for /metrics)."""
        for o in outs:
            m = o.metrics or {}
            if not o.finished or m.get("first_token") is None:
                continue
            self.ttft.append(m["first_token"] - m["arrival"])
            n = len(o.outputs[0].token_ids)
            if n > 1 and m.get("finish") is not None:
                self.tpot.append((m["finish"] - m["first_token"]) / (n - 1))

    def deliver(self, items: list[tuple[str, Any]]) -> None:
        """(request_id, RequestOutput | exception) pairs to their queues; unknown ids (the
        caller already left) are dropped."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for rid, item in items:
                entry = self._queues.get(rid)
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], item))
        for loop, puts in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its requests are gone
                loop.call_soon_threadsafe(_put_all, puts)

    def fail_all(self, error: BaseException) -> None:
        self.deliver([(rid, error) for rid in self.ids()])


class StreamingClient:
    """The EngineClient members AsyncLLM and MPAsyncLLM share. A subclass sets `_streams`,
    `_dead` and `_stats` and says how a request is validated (`_sequence`), handed to the
    engine (`_submit`) and aborted (`_abort_now`); `_where` names the engine in errors."""

    _streams: RequestStreams
    _dead: BaseException | None
    _stats: dict
    _where = "engine"

    def _sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None
    ) -> Sequence:
        raise NotImplementedError

    def _submit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _abort_now(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"{self._where} died: {self._dead!r}")
        seq = self._sequence(request_id, prompt, params)  # raises on bad input, at once
        q = self._streams.open(request_id)
        try:
            self._submit(seq)
        except BaseException:  # never handed over (the engine is gone): no stream to keep
            self._streams.discard(request_id)
            raise
        stream = self._streams.stream(request_id, q, self._abort_now)
        try:
            async for out in stream:
                yield out
        finally:  # closed early: the stream's abort runs now, not when collected
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    @property
    def dead(self) -> BaseException | None:
        """The error that stopped the engine (a device error, a dead process), or None while
        it runs: a failure tied to one request ends only that request."""
        return self._dead

    def stats(self) -> dict:
        """running / waiting counts, KV snapshot (as of the last step that took one), recent
        TTFT and TPOT samples in seconds."""
        return {**self._stats, "ttft": list(self._streams.ttft), "tpot": list(self._streams.tpot)}


def _open(item: Any) -> bool:
    return isinstance(item, RequestOutput) and item.error is None and not item.finished


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """b (the later output of the same request) with a's new ids and text in front of its own:
    cumulative fields are b's already."""
    ca, cb = a.outputs[0], b.outputs[0]
    comp = dataclasses.replace(cb, new_token_ids=ca.new_token_ids + cb.new_token_ids,
                               new_text=ca.new_text + cb.new_text)  # fmt: skip
    return dataclasses.replace(b, outputs=[comp])


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in puts:
        q.put_nowait(item)
