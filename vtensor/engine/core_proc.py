"""The engine's own process (MPAsyncLLM's other half): it builds the LLMEngine and runs its
step loop, taking requests and aborts from a pipe and sending each step's outputs back.

Why a process: in one interpreter the HTTP event loop (JSON, SSE writes for every running
stream, every step) and the engine's host work share one GIL; once their sum passes a decode
step's GPU time, the GPU waits for Python. Here the engine owns its interpreter, as vLLM's
EngineCore does.

Messages, parent -> engine: ("add", request_id, prompt_token_ids, params, arrival),
("abort", request_id), ("stop",). Engine -> parent: ("ready", info) or ("error", exc) once at
start-up, then ("out", deltas, stats) per step (`delta`: only what is new since the last
output; the parent keeps the prompt and the text and ids so far, so a step's message does not
grow with the requests' lengths), ("fail", request_id, exc) for a request the engine refused,
("stats", stats) when it goes idle, ("dead", exc) if the loop fails, and ("closed",) after
"stop".
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from vtensor.engine.args import EngineArgs
from vtensor.engine.outputs import RequestOutput
from vtensor.engine.step_trace import StepTrace

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # while idle, how often to look for KV pages to trim


def portable(e: BaseException) -> BaseException:
    """e itself if it survives pickling (its type is what the caller dispatches on), else a
    RuntimeError carrying its repr."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(e).__name__}: {e}")


def run_engine_core(args: EngineArgs, conn: Connection) -> None:
    """Process entry point (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; it sends "stop"
    from vtensor.engine.engine import LLMEngine

    try:
        eng = LLMEngine(args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", portable(e)))
        conn.close()
        return
    info = {
        "tokenizer": eng.tokenizer,
        "model_config": eng.model_config,
        "max_model_len": eng.max_model_len,
        "vocab_size": eng.model_config.vocab_size,
        "kv_token_capacity": eng.kv_cache.token_capacity(),
        "stats": eng.stats(),
    }
    conn.send(("ready", info))
    trace = StepTrace.from_env()
    try:
        _loop(eng, conn, trace)
        conn.send(("closed",))
    except (BrokenPipeError, EOFError):
        pass  # the parent is gone: nobody to tell
    except BaseException as e:  # noqa: BLE001 - the parent fails every request in flight
        log.exception("engine process failed")
        with contextlib.suppress(OSError):
            conn.send(("dead", portable(e)))
    finally:
        if trace is not None:
            trace.close()
        eng.close()
        conn.close()


def _loop(eng: Any, conn: Connection, trace: StepTrace | None = None) -> None:
    from vtensor.engine.sequence import new_sequence

    busy = False
    while True:
        if not eng.has_unfinished_requests():
            if busy:  # just went idle: the parent's /metrics should say so
                conn.send(("stats", eng.stats()))
                busy = False
                if trace is not None:
                    trace.flush()
            if not conn.poll(IDLE_POLL_S):
                eng.on_idle()
                continue
        while conn.poll():
            msg = conn.recv()
            if msg[0] == "add":
                _, rid, ids, params, arrival = msg
                try:  # validated by the parent already; this builds the engine-side state
                    seq = new_sequence(rid, ids, params, tokenizer=eng.tokenizer,
                                       max_model_len=eng.max_model_len,
                                       vocab_size=eng.model_config.vocab_size)  # fmt: skip
                    seq.t_arrival = arrival  # CLOCK_MONOTONIC: one clock for both processes
                    eng.add_sequence(seq)
                except ValueError as e:
                    conn.send(("fail", rid, e))
            elif msg[0] == "abort":
                eng.abort_request(msg[1])
            elif msg[0] == "stop":
                return
        if not eng.has_unfinished_requests():
            continue
        busy = True
        t0 = time.monotonic()
        outs = eng.step()
        # the KV snapshot walks every slot: every 16 steps (and when idle)
        stats = eng.stats(include_kv=eng.counters["steps"] % 16 == 0)
        if trace is not None:
            trace.step(t0, time.monotonic(), stats)
        conn.send(("out", [delta(o) for o in outs], stats))


def delta(o: RequestOutput) -> tuple:
    """What the parent needs to rebuild `o` (MPAsyncLLM._rebuild): the new ids, text and
    logprobs, and the small per-step fields."""
    c = o.outputs[0]
    lps = c.logprobs[len(c.logprobs) - len(c.new_token_ids):] if c.logprobs is not None else None
    return (o.request_id, c.new_token_ids, c.new_text, lps, c.cumulative_logprob,
            c.finish_reason, c.stop_reason, o.finished, o.num_cached_tokens, o.error,
            o.metrics)  # fmt: skip
