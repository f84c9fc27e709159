"""MPAsyncLLM: the EngineClient with the engine in its own process (engine/core_proc.py).

The server's interpreter keeps the tokenizer and validation (a bad request fails at once,
without a round trip), the per-request streams, and one reader thread that turns each step's
outputs into queue puts. The engine process steps without sharing a GIL with the HTTP event
loop. Same interface and error contract as AsyncLLM (the in-process thread), which stays for
tests and for callers that hand in an engine they built.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from dataclasses import dataclass, field
from typing import Any

from vtensor.engine.args import EngineArgs
from vtensor.engine.core_proc import run_engine_core
from vtensor.engine.outputs import CompletionOutput, RequestOutput
from vtensor.engine.sampling_params import SamplingParams
from vtensor.engine.sequence import Sequence, new_sequence
from vtensor.engine.streams import EngineDeadError, RequestStreams, StreamingClient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sofar:
    """One request's output so far, on the server's side: what the engine's per-step deltas
    (core_proc.delta) add to."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None


class MPAsyncLLM(StreamingClient):
    """Implements EngineClient (engine/client.py) over an engine process."""

    _where = "engine process"

    def __init__(self, args: EngineArgs | None = None, **kwargs: Any) -> None:
        args = args if args is not None else EngineArgs(**kwargs)
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=run_engine_core, args=(args, child),
                                 name="vtensor-engine", daemon=True)  # fmt: skip
        self._proc.start()
        child.close()  # ours is the only other end: its exit reads as EOF
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(
                f"the engine process exited during start-up (code {self._proc.exitcode})"
            ) from None
        if kind == "error":
            self._proc.join(timeout=30)
            raise payload  # ValueError / ModelError / OSError: the caller's usage error
        self.tokenizer = payload["tokenizer"]
        self.model_config = payload["model_config"]
        self.max_model_len: int = payload["max_model_len"]
        self.vocab_size: int = payload["vocab_size"]
        self.kv_token_capacity: int = payload["kv_token_capacity"]
        self._stats: dict = payload["stats"]
        self._streams = RequestStreams()
        self._acc: dict[str, _Sofar] = {}  # request id -> its output so far
        self._acc_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._dead: BaseException | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="vtensor-engine-reader",
                                        daemon=True)  # fmt: skip
        self._reader.start()

    # ------------------------------------------------------------------ client side

    def _sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None
    ) -> Sequence:
        # tokenized and validated here: a bad request raises at once, without a round trip
        return new_sequence(request_id, prompt, params, tokenizer=self.tokenizer,
                            max_model_len=self.max_model_len,
                            vocab_size=self.vocab_size)  # fmt: skip

    def _submit(self, seq: Sequence) -> None:
        with self._acc_lock:
            self._acc[seq.request_id] = _Sofar(seq.prompt, seq.prompt_token_ids)
        self._send(("add", seq.request_id, seq.prompt_token_ids, seq.params, seq.t_arrival))

    def _abort_now(self, request_id: str) -> None:
        with self._acc_lock:
            self._acc.pop(request_id, None)
        self._send(("abort", request_id))

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:  # the process is gone; the reader reports it to every stream
            if msg[0] == "add":
                raise EngineDeadError(f"engine process is gone: {e!r}") from None

    def shutdown(self) -> None:
        if not self._closing:
            self._closing = True
            self._send(("stop",))
        self._reader.join(timeout=30)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            log.warning("engine process did not stop in 30 s: terminating it")
            self._proc.terminate()
            self._proc.join(timeout=10)
        self._conn.close()

    close = shutdown

    # ------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "out":
                    outs, stats = self._rebuild(msg[1]), msg[2]
                    self._stats = {**self._stats, **stats}
                    self._streams.observe(outs)
                    self._streams.deliver([(o.request_id, o) for o in outs])
                elif msg[0] == "stats":
                    self._stats = {**self._stats, **msg[1]}
                elif msg[0] == "fail":
                    with self._acc_lock:
                        self._acc.pop(msg[1], None)
                    self._streams.deliver([(msg[1], msg[2])])
                elif msg[0] == "dead":
                    error = msg[1]
                    break
                elif msg[0] == "closed":
                    return
        except (EOFError, OSError) as e:
            if self._closing:
                return
            error = RuntimeError(f"engine process exited (code {self._proc.exitcode}): {e!r}")
        self._dead = error
        log.error("engine process failed: %r", error)
        self._streams.fail_all(EngineDeadError(f"engine failed: {error!r}"))

    def _rebuild(self, deltas: list[tuple]) -> list[RequestOutput]:
        """The engine's per-step deltas -> full RequestOutputs, as AsyncLLM delivers them."""
        outs = []
        with self._acc_lock:
            for rid, ids, text, lps, cum, finish, stop, finished, cached, err, metrics in deltas:
                acc = self._acc.pop(rid, None) if finished else self._acc.get(rid)
                if acc is None:
                    continue  # aborted by its caller: nobody is listening
                acc.token_ids += ids
                acc.text += text
                if lps is not None:
                    acc.logprobs = acc.logprobs if acc.logprobs is not None else []
                    acc.logprobs += lps
                comp = CompletionOutput(
                    index=0, text=acc.text, token_ids=list(acc.token_ids), new_token_ids=ids,
                    new_text=text,
                    logprobs=list(acc.logprobs) if acc.logprobs is not None else None,
                    cumulative_logprob=cum, finish_reason=finish, stop_reason=stop,
                )  # fmt: skip
                outs.append(RequestOutput(rid, acc.prompt, acc.prompt_token_ids, [comp],
                                          finished, cached, err, metrics))  # fmt: skip
        return outs


__all__ = ["MPAsyncLLM"]
