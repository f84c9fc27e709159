"""AsyncLLM: the engine's step loop on a background thread, for the server.

The event loop never touches the engine: `generate` tokenizes and validates in the caller
(ValueError at once for a bad request), hands the Sequence to the engine thread, and awaits
outputs on a per-request asyncio.Queue fed with `call_soon_threadsafe` (one call per loop per
step). The engine thread sleeps on a condition variable when it has nothing to do, so an idle
server costs nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vtensor.engine.engine import EngineArgs, LLMEngine
from vtensor.engine.sampling_params import SamplingParams
from vtensor.engine.sequence import Sequence
from vtensor.engine.streams import EngineDeadError, RequestStreams, StreamingClient

log = logging.getLogger(__name__)


class AsyncLLM(StreamingClient):
    """The engine behind the server: implements EngineClient (engine/client.py)."""

    _where = "engine thread"

    def __init__(
        self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None, **kwargs: Any
    ) -> None:
        if engine is None:
            engine = LLMEngine(args if args is not None else EngineArgs(**kwargs))
        self.engine = engine
        # EngineClient (engine/client.py): what the server reads, fixed once the engine is built
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.kv_token_capacity: int = engine.kv_cache.token_capacity()
        self._cv = threading.Condition()
        self._new: list[Sequence] = []
        self._aborts: list[str] = []
        self._streams = RequestStreams()
        self._stop = False
        self._dead: BaseException | None = None
        self._stats: dict = self.engine.stats()
        self.idle_poll_s = 1.0  # how often the idle engine thread checks for idle KV pages
        self._thread = threading.Thread(target=self._loop, name="vtensor-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side

    def _sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None
    ) -> Sequence:
        return self.engine.make_sequence(request_id, prompt, params)

    def _submit(self, seq: Sequence) -> None:
        with self._cv:
            self._new.append(seq)
            self._cv.notify()

    def _abort_now(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.engine.close()

    close = shutdown

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._new or self._aborts
                               or eng.has_unfinished_requests()):  # fmt: skip
                        self._stats = eng.stats()
                        # wake now and then while idle so idle KV pages can be trimmed
                        if not self._cv.wait(timeout=self.idle_poll_s):
                            eng.on_idle()
                    if self._stop:
                        return
                    new, self._new = self._new, []
                    aborts, self._aborts = self._aborts, []
                for seq in new:
                    try:
                        eng.add_sequence(seq)
                    except ValueError as e:  # duplicate id
                        self._streams.deliver([(seq.request_id, e)])
                for rid in aborts:
                    eng.abort_request(rid)
                outs = eng.step()
                self._streams.observe(outs)
                self._streams.deliver([(o.request_id, o) for o in outs])
                # the KV snapshot walks every slot: refresh it every 16 steps (and when idle)
                fresh = eng.stats(include_kv=eng.counters["steps"] % 16 == 0)
                with self._cv:
                    self._stats = {**self._stats, **fresh}
        except BaseException as e:  # never leave a client waiting forever
            log.exception("engine thread failed")
            self._dead = e
            self._streams.fail_all(EngineDeadError(f"engine failed: {e!r}"))


__all__ = ["AsyncLLM", "EngineDeadError"]
