"""Mapper: one daemon thread that runs driver work (map/unmap) off the caller's thread.

Callers change bookkeeping synchronously and submit only the driver calls, so they never block
on cuMemSetAccess (~40-47 us per 2 MiB page on the H200) or cuMemUnmap (~31 us).

Two lanes, each FIFO: urgent work (maps the next step needs) always runs first; lazy work
(unmaps of released pages, each behind a CUDA event recorded after their last reader) runs when
no urgent work waits and, if it came with a `ready` check, once that says so (the event was
reached): the thread never blocks inside lazy work on the GPU, so a map the next step needs is
never stuck behind an unmap waiting for the running step to end. A step never waits for
unmaps or for the GPU to reach those events.
Why reusing a page before its old mapping is gone is safe: a physical page may be mapped at two
addresses at once, and the new owner's kernels are queued on the same stream after the old
readers. What must still be ordered, a map at an address whose unmap is pending, the caller
says with `run_now` (VirtualTensor does it per page).

An exception raised by queued work surfaces at its Ticket.wait() and once at the next submit().
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from vtensor.vmm.errors import VmmError


class Ticket:
    """Completion handle of one submitted batch of driver work."""

    __slots__ = ("_done", "_error", "_fn", "_mapper", "_ready")

    def __init__(self, mapper: Mapper | None = None) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._mapper = mapper
        # the queued work; taken (set to None) under the mapper's lock by whoever runs it
        self._fn: Callable[[], None] | None = None
        self._ready: Callable[[], bool] | None = None  # lazy work: may it run yet?

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
    # how often a lazy ticket that is not ready yet is checked again (while nothing else waits)
    poll_s = 0.001

    def __init__(self, name: str = "vtensor-mapper") -> None:
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._urgent: deque[Ticket] = deque()
        self._lazy: deque[Ticket] = deque()  # may hold tickets run_now already ran: skipped
        self._stopping = False
        self._error: BaseException | None = None
        self._closed = False
        self.wait_seconds = 0.0  # total time callers spent blocked in Ticket.wait()
        self.submitted = 0
        self.executed = 0
        self.busy_seconds = 0.0  # time the thread spent running work
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[[], None], lazy: bool = False, ready: Callable[[], bool] | None = None
    ) -> Ticket:
        """Queue fn; `lazy` work runs only while no urgent work waits and once `ready()` (if
        given, checked on this thread; it must not block) returns True (see the module doc)."""
        if self._closed:
            raise VmmError("Mapper is closed")
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise VmmError(f"earlier mapper work failed: {err!r}") from err
        return self._enqueue(fn, lazy, ready if lazy else None)

    def _enqueue(
        self, fn: Callable[[], None], lazy: bool, ready: Callable[[], bool] | None = None
    ) -> Ticket:
        t = Ticket(self)
        t._fn = fn
        t._ready = ready
        with self._cv:
            self.submitted += 1
            (self._lazy if lazy else self._urgent).append(t)
            self._cv.notify()
        return t

    def run_now(self, ticket: Ticket) -> None:
        """From work running on the mapper thread: run lazy `ticket` first if it has not run
        (e.g. the unmap of an address that this work maps again)."""
        with self._lock:  # O(1): take the work; the loop skips the ticket when it pops it
            fn, ticket._fn = ticket._fn, None
        if fn is not None:
            self._execute(fn, ticket)

    def flush(self) -> None:
        """Wait until everything submitted so far, lazy work included, has run (errors stay
        with their tickets)."""
        if self._closed:
            return
        # the lazy lane runs only once the urgent one is empty, and in order
        self._enqueue(lambda: None, lazy=True).wait()

    def pending(self) -> int:
        return self.submitted - self.executed

    def _add_wait(self, dt: float) -> None:
        with self._lock:
            self.wait_seconds += dt

    def _next(self) -> Ticket | None:
        """Under the lock: the ticket to run now, or None (stopping, and everything ran)."""
        while True:
            if self._urgent:
                return self._urgent.popleft()
            if self._lazy:
                head = self._lazy[0]
                if head._fn is None or head._ready is None or self._is_ready(head):
                    return self._lazy.popleft()
                self._cv.wait(self.poll_s)  # not yet: stay free for urgent work meanwhile
                continue
            if self._stopping:
                return None
            self._cv.wait()

    def _is_ready(self, t: Ticket) -> bool:
        try:
            return t._ready()  # type: ignore[misc]
        except Exception:  # run it: the work itself reports the error
            return True

    def _loop(self) -> None:
        while True:
            with self._cv:
                t = self._next()
                if t is None:
                    return
                fn, t._fn = t._fn, None
            if fn is not None:  # None: run_now ran it already
                self._execute(fn, t)

    def _execute(self, fn: Callable[[], None], ticket: Ticket) -> None:
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
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
