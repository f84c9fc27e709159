"""Online runner: a real `vtensor serve` (or `vllm serve`, vllm_system.py) subprocess and a
Poisson-arrival streaming client.

Requests (or, for multi-turn, conversations) arrive as a Poisson process at `rate` per second
(seeded exponential gaps). Each request is a streaming `POST /v1/completions` with the prompt
as token ids, `ignore_eos` and `stream_options.include_usage`; the client measures

    TTFT   send -> first chunk carrying text
    TPOT   (end - first token) / (completion_tokens - 1)
    E2E    send -> [DONE]

and goodput = requests meeting both SLOs (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms) per
second of the run. A multi-turn conversation sends its turns one after another, each carrying
the whole history: earlier user messages and the server's replies (re-tokenized, as a client
sending text would have them re-tokenized by the server) plus the new user message.

The client is aiohttp (as vLLM's serving benchmark): its C parser costs ~2-3x less CPU per
streamed chunk than httpx's pure-Python h11, so under heavy load (thousands of chunks a second)
the client's own event loop does not add to the latency it measures (`client_loop_lag_ms`).
No `openai` package needed (the H200 image has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import httpx

from vtensor.bench.memory import MemorySampler
from vtensor.bench.workloads import Workload
from vtensor.engine.step_trace import loop_lags


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """`vtensor serve` on a free port of 127.0.0.1; `with ServerProcess([...]) as srv:`."""

    def __init__(self, serve_args: Sequence[str], *, startup_timeout: float = 300.0,
                 log_path: str | None = None, env: dict[str, str] | None = None):  # fmt: skip
        self.port = free_port()
        self.env = dict(env or {})
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.serve_args = list(serve_args)
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vtensor.cli", "serve", "--host", "127.0.0.1",
                "--port", str(self.port), *self.serve_args]  # fmt: skip

    def environ(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # its own process group: a server's children (vLLM's engine core) go down with it
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.environ(), start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}: {self._tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"server not healthy after {self.startup_timeout:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:  # whatever the server started and left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMServer(ServerProcess):
    """`vllm serve` (vllm_system.serve_cmd) on a free port, with vLLM's PYTHONPATH."""

    def __init__(self, model_dir: str, *, max_model_len: int, dtype: str = "bfloat16",
                 load_format: str = "dummy", gpu_memory_utilization: float | None = None,
                 startup_timeout: float = 600.0, log_path: str | None = None):  # fmt: skip
        from vtensor.bench.vllm_system import serve_cmd

        super().__init__([], startup_timeout=startup_timeout, log_path=log_path)
        self.cmd = serve_cmd(model_dir, port=self.port, max_model_len=max_model_len, dtype=dtype,
                             load_format=load_format,
                             gpu_memory_utilization=gpu_memory_utilization)  # fmt: skip

    def command(self) -> list[str]:
        return self.cmd

    def environ(self) -> dict[str, str]:
        from vtensor.bench.vllm_system import worker_env

        return worker_env()


# --- metrics scraping (KV telemetry for the memory plot) -----------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name.split(":", 1)[-1]] = float(value)
        except ValueError:
            continue
    return out


def histogram_quantile(metrics_text: str, name: str, q: float) -> float | None:
    """The q-quantile of a Prometheus histogram, interpolated in its bucket (as PromQL's
    histogram_quantile); None when it has no samples. Past the last finite bound: that bound."""
    prefix = f'{name}_bucket{{le="'
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            le, _, value = line[len(prefix):].partition('"} ')
            buckets.append((float(le), float(value)))  # "+Inf" parses as inf
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - below) / (count - below) if count > below else le
        lo, below = le, count
    return lo


def engine_step_stats(metrics_text: str) -> dict | None:
    """From `vtensor serve`'s /metrics: its engine's steps, and host ms per step by phase
    (`wait`: blocked on the GPU; a wait share near 1 means the run was GPU-bound), and how many
    prefill steps replayed a CUDA graph. None for a server without these metrics (vLLM)."""
    steps: dict[str, float] = {}
    host: dict[str, float] = {}
    graphed = parse_prometheus(metrics_text).get("engine_prefill_steps_graphed_total")
    series = (("vtensor:engine_steps_total{", steps, "kind"),
              ("vtensor:engine_host_seconds_total{", host, "phase"))  # fmt: skip
    for line in metrics_text.splitlines():
        for prefix, into, label in series:
            if line.startswith(prefix):
                labels, _, value = line[len(prefix):].partition("} ")
                key = labels.removeprefix(f'{label}="').removesuffix('"')
                into[key] = float(value)
    n = sum(steps.values())
    if not n or not host:
        return None
    busy = sum(v for k, v in host.items() if k != "wait")  # process includes wait
    return {
        "steps": {k: int(v) for k, v in steps.items()},
        "prefill_graphed": None if graphed is None else int(graphed),
        # TTFT (ms) as the server saw it (request in -> first chunk out), and the engine's part
        # of it: queued, then prefill until the first token sampled; against the client's TTFT
        # they say where a tail comes from (bucket-interpolated: coarse above 100 ms)
        **{f"{k}_ms_p{int(q * 100)}": _ms(histogram_quantile(metrics_text, name, q))
           for k, name in (("server_ttft", "vtensor:time_to_first_token_seconds"),
                           ("queue", "vtensor:request_queue_time_seconds"),
                           ("prefill", "vtensor:request_prefill_time_seconds"))
           for q in (0.5, 0.99)},  # fmt: skip
        "host_ms_per_step": {k: round(1e3 * v / n, 3) for k, v in host.items()},
        "wait_share": round(host.get("wait", 0.0) / busy, 4) if busy else None,
    }


def summarize_trace(path: str, t_from: float, t_to: float, top: int = 5) -> dict | None:
    """The server's step trace (engine/step_trace.py: PATH and PATH.server) between two
    CLOCK_MONOTONIC times: step times, garbage collections per process, the server's
    event-loop stalls, and the longest of each, to line up with a latency tail."""
    def rows(p: str) -> list[dict]:
        if not os.path.exists(p):
            return []
        with open(p) as f:
            out = [json.loads(line) for line in f if line.endswith("\n")]
        return [r for r in out if t_from <= r["t"] <= t_to]

    eng, srv = rows(path), rows(path + ".server")
    if not eng and not srv:
        return None
    steps = [r for r in eng if "ms" in r and "gc" not in r]

    def gcs(rs: list[dict]) -> dict:
        g = [r for r in rs if "gc" in r]
        return {"count": len(g), "gen2": sum(r["gc"] == 2 for r in g),
                "total_ms": round(sum(r["ms"] for r in g), 1),
                "max_ms": max((r["ms"] for r in g), default=0.0)}  # fmt: skip

    lags = sorted((r for r in srv if "loop_lag_ms" in r), key=lambda r: -r["loop_lag_ms"])
    return {
        "steps": len(steps),
        "step_ms": _percentiles([r["ms"] for r in steps], scale=1.0),  # {} without steps
        "longest_steps": sorted(steps, key=lambda r: -r["ms"])[:top],
        "gc_engine": gcs(eng),
        "gc_server": gcs(srv),
        "server_loop_stalls": len(lags),  # wake-ups > 5 ms late
        "server_loop_stall_ms_total": round(sum(r["loop_lag_ms"] for r in lags), 1),
        "longest_server_stalls": lags[:top],
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(1e3 * s, 2)


def metrics_probe(base_url: str) -> Callable[[], dict]:
    client = httpx.Client(timeout=2.0)

    def probe() -> dict:
        m = parse_prometheus(client.get(base_url + "/metrics").text)
        return {
            "kv_pages_in_use": m.get("kv_pages_in_use"),
            "kv_pages_cached": m.get("kv_pages_cached"),
        }

    return probe


# --- the client -----------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    prompt_tokens: int
    t_send: float = 0.0  # when it was sent, s from the run's start
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    error: str | None = None
    text: str = ""
    token_ids: list[int] | None = None  # the reply's ids, where the server returns them

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


async def stream_completion(
    client: aiohttp.ClientSession,
    model: str,
    prompt: list[int],
    max_tokens: int,
    extra_body: dict | None = None,
    t_start: float | None = None,
) -> RequestRecord:
    """One streaming request. `extra_body`: server-specific fields (vLLM: return_token_ids,
    whose chunks carry `token_ids`; with --skip-tokenizer-init their text is empty, so a
    chunk with ids counts as a token arriving)."""
    rec = RequestRecord(len(prompt))
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra_body or {}),
    }
    t0 = time.perf_counter()
    rec.t_send = t0 - t_start if t_start is not None else 0.0
    parts: list[str] = []
    ids: list[int] = []
    try:
        async with client.post("/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return rec
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                for ch in chunk.get("choices") or []:
                    if ch.get("text") or ch.get("token_ids"):
                        if rec.ttft is None:
                            rec.ttft = time.perf_counter() - t0
                        parts.append(ch.get("text") or "")
                        ids += ch.get("token_ids") or []
                usage = chunk.get("usage")
                if usage:
                    rec.completion_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = int(details.get("cached_tokens") or 0)
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: bad JSON, an overlong line
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e = time.perf_counter() - t0
    rec.text = "".join(parts)
    rec.token_ids = ids or None
    if rec.completion_tokens == 0:  # no usage chunk: count ids, else text chunks (lower bound)
        rec.completion_tokens = len(ids) or len(parts)
    return rec


def _percentiles(xs: list[float], scale: float = 1000.0) -> dict:
    if not xs:
        return {}
    s = sorted(xs)

    def pct(p: float) -> float:
        k = (len(s) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return (s[lo] + (s[hi] - s[lo]) * (k - lo)) * scale

    return {
        "mean": sum(s) / len(s) * scale,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": s[-1] * scale,
    }


async def _watch_loop_lag(lag: list[float], period: float = 0.01) -> None:
    """How late the client's own event loop wakes a 10 ms sleeper: a busy client delays every
    stream it reads, so its TTFT / TPOT would be the client's, not the server's."""
    async for _, late in loop_lags(period):
        lag.append(late)


async def _run_client(
    base_url: str,
    model: str,
    wl: Workload,
    rate: float,
    seed: int,
    encode: Callable[[str], list[int]] | None,
    deadline: float | None,
    extra_body: dict | None = None,
    lag: list[float] | None = None,
) -> tuple[list[RequestRecord], float, bool, float]:
    """Run the workload; `lag` collects the client's event-loop lag (s) while it runs.
    Returns the records, the run's seconds, whether it ran whole, and when it started
    (CLOCK_MONOTONIC, the clock of the server's trace)."""
    rng = random.Random(seed)
    units = wl.conversations if wl.multi_turn else wl.requests
    arrivals, t = [], 0.0
    for _ in units:
        arrivals.append(t)
        t += rng.expovariate(rate) if rate > 0 else 0.0
    records: list[RequestRecord] = []
    conn = aiohttp.TCPConnector(limit=0)  # no cap on concurrent connections
    timeout = aiohttp.ClientTimeout(total=None, connect=30.0)
    cut = False
    async with aiohttp.ClientSession(base_url, connector=conn, timeout=timeout,
                                     read_bufsize=1 << 20) as client:  # fmt: skip
        t0, t0_mono = time.perf_counter(), time.monotonic()

        async def one(i: int) -> None:
            nonlocal cut
            await asyncio.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            u = units[i]
            if not wl.multi_turn:
                if deadline is not None and time.perf_counter() > deadline:
                    cut = True
                    return
                records.append(await stream_completion(client, model, u.prompt_token_ids,
                                                       u.max_tokens, extra_body, t0))  # fmt: skip
                return
            history: list[int] = []
            for user, reply_len in zip(u.user_turns, u.reply_lens, strict=True):
                if deadline is not None and time.perf_counter() > deadline:
                    cut = True
                    return
                prompt = history + user
                rec = await stream_completion(client, model, prompt, reply_len, extra_body, t0)
                records.append(rec)
                if rec.error:
                    return
                if rec.token_ids is not None:  # the server's own ids: the exact history
                    reply = rec.token_ids
                elif encode is not None:
                    reply = encode(rec.text)
                else:  # no tokenizer here: keep the history's length right with filler ids
                    reply = [user[j % len(user)] for j in range(rec.completion_tokens)]
                history = prompt + reply

        jobs = asyncio.gather(*(one(i) for i in range(len(units))))
        watch = asyncio.create_task(_watch_loop_lag(lag if lag is not None else []))
        try:
            if deadline is None:
                await jobs
            else:  # requests in flight at the deadline get 30 s more, then are cancelled
                try:
                    await asyncio.wait_for(jobs, max(1.0, deadline + 30.0 - time.perf_counter()))
                except TimeoutError:
                    cut = True
        finally:
            watch.cancel()
        elapsed = time.perf_counter() - t0
    return records, elapsed, not cut, t0_mono


def run_online(
    base_url: str,
    model: str,
    wl: Workload,
    *,
    rate: float,
    seed: int = 0,
    slo_ttft_ms: float = 2000.0,
    slo_tpot_ms: float = 100.0,
    encode: Callable[[str], list[int]] | None = None,
    deadline: float | None = None,
    sample_interval: float = 0.1,
    rss_pid: int | None = None,
    extra_body: dict | None = None,
) -> dict:
    """Drive `wl` against a running server; returns the JSON-able result record."""
    lag: list[float] = []
    t_from = time.monotonic()
    with MemorySampler(sample_interval, metrics_probe(base_url), rss_pid) as mem:
        records, elapsed, complete, t0_mono = asyncio.run(
            _run_client(base_url, model, wl, rate, seed, encode, deadline, extra_body, lag)
        )
    ok = [r for r in records if r.error is None and r.e2e is not None]
    good = [
        r
        for r in ok
        if r.ttft is not None
        and r.ttft * 1000 <= slo_ttft_ms
        and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)
    ]
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "rate": rate,
        "complete": complete,
        "t_monotonic": [t_from, time.monotonic()],  # the run's window, for the server's trace
        "elapsed_s": elapsed,
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else None,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
        "ttft_ms": _percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": _percentiles([r.e2e for r in ok]),
        "client_loop_lag_ms": _percentiles(lag),  # the client's own delay (see _watch_loop_lag)
        # replies the server returned as ids (multi-turn history resent exactly, no re-encode)
        "server_token_ids": sum(r.token_ids is not None for r in ok) / len(ok) if ok else None,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput_rps": len(good) / elapsed if elapsed > 0 else None,
        "slo_attainment": len(good) / len(records) if records else None,
        "memory": mem.summary(),
        "memory_series": mem.to_json(),
        # per request, in sending order: where in the run a latency tail sits
        "timeline": {"t0_monotonic": t0_mono, **timeline(ok)},
    }


def timeline(records: list[RequestRecord]) -> dict[str, list]:
    """Columns per request (sent s, TTFT ms, prompt and reply tokens), by sending time."""
    rs = sorted(records, key=lambda r: r.t_send)
    return {
        "sent_s": [round(r.t_send, 4) for r in rs],
        "ttft_ms": [None if r.ttft is None else round(r.ttft * 1000, 2) for r in rs],
        "prompt_tokens": [r.prompt_tokens for r in rs],
        "completion_tokens": [r.completion_tokens for r in rs],
    }
