"""An opt-in trace of one process, for finding what a latency tail lines up with.

`VTENSOR_STEP_TRACE=PATH` makes the engine process write one JSON line per engine step to PATH
(its start and duration, prompt and decode tokens, queue lengths, host time waiting on the KV
mapper and on the GPU) and the server process write PATH.server; both record every garbage
collection (generation, duration) and the server its event loop's stalls. All times are
CLOCK_MONOTONIC seconds, one clock for both processes and comparable between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from collections.abc import AsyncIterator
from typing import IO, Any

ENV = "VTENSOR_STEP_TRACE"
_COUNTERS = ("steps", "prefill_steps", "prompt_tokens_computed", "generation_tokens")
_TIMES = ("kv_wait_s", "wait_s")


class StepTrace:
    def __init__(self, path: str) -> None:
        self._f: IO[str] | None = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - closed by close()
        self._gc_t0 = 0.0
        self._last: dict[str, float] = {}
        self._flushed = time.monotonic()
        self._dirty = False  # written since the last flush
        # GC passes are queued, not written: a collection can start inside our own write
        # (any allocation), and a buffered file raises on a reentrant write from one thread
        self._gcs: list[dict[str, Any]] = []
        gc.callbacks.append(self._on_gc)

    @classmethod
    def from_env(cls, suffix: str = "") -> StepTrace | None:
        path = os.environ.get(ENV)
        return cls(path + suffix) if path else None

    def _write(self, rec: dict[str, Any] | None = None) -> None:
        """Write `rec` (if any) and the GC passes queued since the last call; flush at most
        every 0.5 s: readers see the trace at most ~0.5 s behind its last call."""
        if self._f is None:
            return
        recs = [] if rec is None else [rec]
        while self._gcs:  # list.pop is atomic: a callback may append meanwhile
            recs.append(self._gcs.pop(0))
        if recs:
            self._f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
            self._dirty = True
        now = time.monotonic()
        if self._dirty and now - self._flushed > 0.5:
            self._f.flush()
            self._flushed, self._dirty = now, False

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.monotonic()
        else:
            t = time.monotonic()
            self._gcs.append({"gc": info["generation"], "t": round(self._gc_t0, 6),
                              "ms": round(1e3 * (t - self._gc_t0), 3),
                              "collected": info["collected"]})  # fmt: skip

    def step(self, t0: float, t1: float, stats: dict) -> None:
        """One engine step that ran from t0 to t1 (monotonic); `stats` = LLMEngine.stats()."""
        now = {k: stats[k] for k in _COUNTERS} | {k: stats["host_s"][k] for k in _TIMES}
        d = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        self._write({
            "t": round(t0, 6), "ms": round(1e3 * (t1 - t0), 3),
            "prefill": bool(d["prefill_steps"]), "prompt_tokens": d["prompt_tokens_computed"],
            "gen_tokens": d["generation_tokens"], "running": stats["running"],
            "waiting": stats["waiting"], "kv_wait_ms": round(1e3 * d["kv_wait_s"], 3),
            "gpu_wait_ms": round(1e3 * d["wait_s"], 3),
        })  # fmt: skip

    async def watch_loop(self, period: float = 0.005, threshold: float = 0.005) -> None:
        """Record each time this event loop wakes a `period` sleeper over `threshold` late;
        every wake also writes the GC passes queued meanwhile."""
        async for t, late in loop_lags(period):
            rec = {"loop_lag_ms": round(1e3 * late, 3), "t": round(t, 6)}
            self._write(rec if late > threshold else None)

    def flush(self) -> None:
        if self._f is not None:
            self._write()
            self._f.flush()
            self._flushed, self._dirty = time.monotonic(), False

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        self.flush()
        if self._f is not None:
            self._f.close()
            self._f = None


async def loop_lags(period: float) -> AsyncIterator[tuple[float, float]]:
    """(when it slept, how late it woke) for a `period` sleeper on this event loop, for ever:
    a busy loop delays everything it serves by that much."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(period)
        yield t, max(0.0, time.monotonic() - t - period)
