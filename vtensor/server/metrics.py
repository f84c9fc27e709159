"""`GET /metrics` in the Prometheus text exposition format (version 0.0.4), no dependency.

Latencies (TTFT, TPOT) and token counters are measured here, at the HTTP boundary, because that
is what a client sees; queue depths and KV page telemetry come from `engine.stats()` at scrape
time so that they are never stale.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from typing import Any

PREFIX = "vtensor:"

# Seconds. TTFT on CPU prefill can take seconds; TPOT on an H200 is a few ms. TTFT's buckets
# stay fine to 1 s, where loaded-server tails sit (p99s of 0.3-0.6 s on the H200).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6,
                0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)  # fmt: skip
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_fmt(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class ServerMetrics:
    """Counters owned by the server; mutated only on the event loop thread (no locks)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        # the engine's side of TTFT: queued (arrival -> first scheduled), then prefill (-> first
        # token sampled), from the engine's timestamps (one monotonic clock for its process too)
        self.queue_time = Histogram(TTFT_BUCKETS)
        self.prefill_time = Histogram(TTFT_BUCKETS)
        self.num_waiting = 0  # engine requests submitted without a first token yet
        self.num_aborted = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.window_s = window_s
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s
        self._window_tokens = 0
        self.started = time.perf_counter()

    def observe_engine_times(self, m: dict | None) -> None:
        m = m or {}
        arrival, sched, first = m.get("arrival"), m.get("scheduled"), m.get("first_token")
        if arrival is not None and sched is not None and first is not None:
            self.queue_time.observe(max(0.0, sched - arrival))
            self.prefill_time.observe(max(0.0, first - sched))

    def add_generated(self, n: int, now: float) -> None:
        self.generation_tokens += n
        self._window.append((now, n))
        self._window_tokens += n
        self._prune(now)

    def count_finished(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def _prune(self, now: float) -> None:
        while self._window and self._window[0][0] < now - self.window_s:
            self._window_tokens -= self._window.popleft()[1]

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        self._prune(now)
        span = min(self.window_s, now - self.started)
        return self._window_tokens / span if span > 0 else 0.0

    def render(self, engine_stats: dict[str, Any] | None, model_name: str) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.append(f"# HELP {PREFIX}{name} {help_}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            lines.extend(samples)

        def gauge(name: str, help_: str, value: Any) -> None:
            if value is not None:
                metric(name, "gauge", help_, [f"{PREFIX}{name} {_fmt(value)}"])

        s = engine_stats or {}  # EngineClient.stats(): counts, and the KV snapshot
        kv = s.get("kv") or {}
        gauge("num_requests_running", "Requests in the engine's running batch.",
              _get(s, "running"))  # fmt: skip
        gauge("num_requests_waiting", "Requests queued in the engine.",
              _get(s, "waiting"))  # fmt: skip
        gauge("num_requests_waiting_first_token", "Server requests without a first token yet.",
              self.num_waiting)  # fmt: skip
        gauge("generation_tokens_per_second",
              f"Output tokens per second over the last {self.window_s:g} s.",
              self.tokens_per_second())  # fmt: skip
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [f"{PREFIX}prompt_tokens_total {self.prompt_tokens}"])  # fmt: skip
        metric("generation_tokens_total", "counter", "Output tokens produced.",
               [f"{PREFIX}generation_tokens_total {self.generation_tokens}"])  # fmt: skip
        metric("request_success_total", "counter", "Finished requests by finish reason.",
               [f'{PREFIX}request_success_total{{finished_reason="{_esc(r)}"}} {c}'
                for r, c in sorted(self.finished.items())])  # fmt: skip
        metric("request_aborted_total", "counter", "Requests aborted (client disconnect).",
               [f"{PREFIX}request_aborted_total {self.num_aborted}"])  # fmt: skip
        for name, hist, help_ in (
            ("time_to_first_token_seconds", self.ttft, "Time to first token."),
            ("time_per_output_token_seconds", self.tpot, "Time per output token after the first."),
            ("request_queue_time_seconds", self.queue_time, "Engine: arrival to first scheduled."),
            ("request_prefill_time_seconds", self.prefill_time,
             "Engine: first scheduled to first token sampled."),
        ):  # fmt: skip
            metric(name, "histogram", help_, hist.lines(f"{PREFIX}{name}"))
        # the engine's steps and its host time per phase of a step (wait: blocked on the GPU
        # for sampled ids): wait / steps near the step time means GPU-bound, near 0 host-bound
        steps = {k: _get(s, f"{k}_steps") for k in ("prefill", "decode")}
        if None not in steps.values():
            metric("engine_steps_total", "counter", "Engine steps by kind (with prefill or "
                   "decode only).", [f'{PREFIX}engine_steps_total{{kind="{k}"}} {v}'
                                     for k, v in steps.items()])  # fmt: skip
        graphed = _get(s, "prefill_steps_graphed")
        if graphed is not None:
            metric("engine_prefill_steps_graphed_total", "counter", "Steps with prefill "
                   "replayed from a CUDA graph (--mixed-graph-tokens).",
                   [f"{PREFIX}engine_prefill_steps_graphed_total {graphed}"])  # fmt: skip
        host = {k.removesuffix("_s"): v for k, v in (s.get("host_s") or {}).items()
                if _get(s["host_s"], k) is not None}  # fmt: skip
        if host:
            name = f"{PREFIX}engine_host_seconds_total"
            samples = [f'{name}{{phase="{_esc(k)}"}} {_fmt(v)}' for k, v in sorted(host.items())]
            metric("engine_host_seconds_total", "counter", "Engine thread time per phase of "
                   "a step; wait = blocked on the GPU.", samples)  # fmt: skip
        gauge("kv_pages_in_use", "Physical KV pages mapped to live requests.",
              _get(kv, "pages_in_use"))  # fmt: skip
        gauge("kv_pages_cached", "Physical KV pages held only by the prefix cache / parked slots.",
              _get(kv, "pages_cached"))  # fmt: skip
        gauge("kv_pages_free", "Physical KV pages free in the pool (or still unallocated budget).",
              _get(kv, "pages_free"))  # fmt: skip
        mapped, live = _get(kv, "bytes_mapped"), _get(kv, "bytes_live_tokens")
        frag = None
        if mapped is not None and live is not None:
            frag = 1.0 - live / mapped if mapped else 0.0
        gauge("kv_fragmentation", "1 - bytes of live tokens / bytes mapped.", frag)
        gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt "
              "tokens.", _get(kv, "prefix_hit_rate"))  # fmt: skip
        # The rest of the KV snapshot as-is (slots parked, shared pages, map ops, ...).
        named = {"pages_in_use", "pages_cached", "pages_free", "prefix_hit_rate"}
        for key in sorted(kv):
            if key not in named and _get(kv, key) is not None and key.isidentifier():
                gauge(f"kv_{key}", f"KV cache snapshot field `{key}`.", kv[key])
        metric("model_info", "gauge", "Served model.",
               [f'{PREFIX}model_info{{model_name="{_esc(model_name)}"}} 1'])  # fmt: skip
        return "\n".join(lines) + "\n"


def _get(d: dict[str, Any], key: str) -> int | float | None:
    """d[key] when it is a number (what a gauge can show), else None."""
    v = d.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
