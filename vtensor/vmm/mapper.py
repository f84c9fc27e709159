"""Mapper: one daemon thread that runs driver work (map/unmap) in FIFO order.

Callers change bookkeeping synchronously and submit only the driver calls, so they never block
on cuMemSetAccess (~40-47 us per 2 MiB page on the H200) or cuMemUnmap (~31 us). FIFO order is
what makes deferred reclamation safe: an unmap that waits for a CUDA event is queued before any
later map of the same physical page elsewhere, so the page is never reused before the event.

An exception raised by queued work surfaces at its Ticket.wait() and once at the next submit().
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from vtensor.vmm.errors import VmmError


class Ticket:
    """Completion handle of one submitted batch of driver work."""

    __slots__ = ("_done", "_error", "_mapper")

    def __init__(self, mapper: Mapper | None = None) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._mapper = mapper

    @classmethod
    def completed(cls) -> Ticket:
        t = cls()
        t._done.set()
        return t

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        """Block until the work ran; re-raise its error. Blocked time adds to wait_seconds."""
        if not self._done.is_set():
            t0 = time.perf_counter()
            self._done.wait()
            if self._mapper is not None:
                self._mapper._add_wait(time.perf_counter() - t0)
        if self._error is not None:
            raise self._error


class Mapper:
    def __init__(self, name: str = "vtensor-mapper") -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], None], Ticket] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        self.wait_seconds = 0.0  # total time callers spent blocked in Ticket.wait()
        self.submitted = 0
        self.executed = 0
        self.busy_seconds = 0.0  # time the thread spent running work
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> Ticket:
        if self._closed:
            raise VmmError("Mapper is closed")
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise VmmError(f"earlier mapper work failed: {err!r}") from err
        t = Ticket(self)
        self.submitted += 1
        self._q.put((fn, t))
        return t

    def flush(self) -> None:
        """Wait until everything submitted so far has run (errors stay with their tickets)."""
        if self._closed:
            return
        t = Ticket(self)
        self._q.put((lambda: None, t))
        t.wait()

    def pending(self) -> int:
        return self.submitted - self.executed

    def _add_wait(self, dt: float) -> None:
        with self._lock:
            self.wait_seconds += dt

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, ticket = item
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                ticket._error = e
                with self._lock:
                    self._error = e
            finally:
                self.busy_seconds += time.perf_counter() - t0
                self.executed += 1
                ticket._done.set()

    def close(self) -> None:
        """Drain the queue (all submitted work runs), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._thread.join()

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
