"""Graceful shutdown: drain for a bounded time, then end what is left with an error.

uvicorn on SIGTERM stops accepting connections and waits for the ones open to finish, for as
long as they take (a long stream: minutes). `DrainingServer` bounds that: when shutdown starts
it marks the app as draining (new generation requests get 503) and arms a deadline; at the
deadline every generation still running ends with a final error chunk (streams) or a 503
(non-streaming), its engine requests are aborted, and the connections close on their own.
uvicorn's own `timeout_graceful_shutdown` stays armed a few seconds later as a backstop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn

log = logging.getLogger("vtensor.serve")

# What a generation's queue receives when the drain deadline passes.
SHUTDOWN = object()


class Lifecycle:
    """Shutdown state shared by the handlers of one app (all on one event loop)."""

    def __init__(self) -> None:
        self.draining = False  # shutdown started: refuse new generation requests
        self.expired = False  # drain deadline passed: stop the ones still running
        self._queues: set[asyncio.Queue] = set()
        self._timer: asyncio.TimerHandle | None = None

    def register(self, q: asyncio.Queue) -> None:
        self._queues.add(q)
        if self.expired:
            q.put_nowait(SHUTDOWN)

    def unregister(self, q: asyncio.Queue) -> None:
        self._queues.discard(q)

    @property
    def num_running(self) -> int:
        return len(self._queues)

    def begin_drain(self, timeout_s: float | None) -> None:
        """Called on the event loop when shutdown starts. timeout_s None: wait for ever."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d generation(s), timeout %s s", self.num_running, timeout_s)
        if timeout_s is not None:
            self._timer = asyncio.get_running_loop().call_later(max(timeout_s, 0.0), self.expire)

    def expire(self) -> None:
        if self._queues:
            log.warning("drain timeout: stopping %d generation(s)", len(self._queues))
        self.expired = True
        for q in list(self._queues):
            q.put_nowait(SHUTDOWN)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the app's generations for at most drain_timeout_s
    seconds (None: no limit, uvicorn's behaviour)."""

    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        drain_timeout_s: float | None,
        background: Callable[[], Coroutine] | None = None,
    ) -> None:
        """background: a coroutine to run on the server's event loop while it serves."""
        if drain_timeout_s is not None and config.timeout_graceful_shutdown is None:
            # backstop: uvicorn cancels whatever still runs a little after our deadline
            config.timeout_graceful_shutdown = int(drain_timeout_s) + 5
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self._background = background
        self._task: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._background is not None:
            self._task = asyncio.create_task(self._background())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.lifecycle.begin_drain(self.drain_timeout_s)
        if self._task is not None:
            self._task.cancel()
        await super().shutdown(sockets)


def app_lifecycle(app: Any) -> Lifecycle:
    return app.state.lifecycle
