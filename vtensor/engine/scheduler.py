"""Continuous batching with chunked prefill under a per-step token budget.

Each step (vLLM v1 style):
  1. running requests, oldest first: a decode token each, or the next chunk of their prompt.
     When the KV cache cannot map the pages (`ensure` is False), preempt the newest running
     request (swap its pages to host, or free them and recompute later) and retry; a request
     that cannot fit even alone gets an error instead of hanging the engine.
  2. if nothing was preempted: resume swapped requests (oldest first), then admit waiting ones
     through `acquire()`, which reports the prompt tokens already in the cache (prefix sharing
     or a parked conversation slot): only the rest is computed.
A request preempted by recompute goes back to the front of the queue with prompt + output as
its new prompt, so greedy results are the same as if it had never been preempted.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from vtensor.engine.errors import ErrorKind, RequestError, RequestTooLargeError
from vtensor.engine.sequence import Sequence, Status
from vtensor.kv import KVManager, PagePlan

__all__ = ["RequestTooLargeError", "ScheduledBatch", "Scheduler"]


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens computed this step, per seq
    is_prefill: bool = False  # False: every seq decodes exactly one token
    # the KV device work decided since the last step (maps, unmaps, copies): the engine
    # applies it before the batch's inputs are built, even when the batch is empty
    plan: PagePlan = field(default_factory=PagePlan)

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)
        # a decode computes the one token it sampled last step; anything else is a prefill
        if n != 1 or seq.num_computed + 1 != seq.num_tokens:
            self.is_prefill = True


class Scheduler:
    def __init__(
        self,
        kv_cache: KVManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "recompute",
    ) -> None:
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, not {preemption_mode!r}")
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.swapped: deque[Sequence] = deque()  # oldest first
        self.failed: list[Sequence] = []  # given up on (KV too small); the engine reports them
        # stopped (length) but their last token is still in flight: KV kept until it lands
        self.held: set[Sequence] = set()
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def hold(self, seq: Sequence) -> None:
        """seq stops once its in-flight token lands: never scheduled again, its KV is kept
        (and counts as pages that will come back) until `finish`."""
        if seq.status == Status.RUNNING:
            seq.status = Status.FINISHED  # remove_finished drops it from `running`
            self.held.add(seq)

    def finish(self, seq: Sequence) -> None:
        """seq finished normally: park its KV (valid tokens published for prefix reuse)."""
        self.held.discard(seq)
        seq.status = Status.FINISHED
        if seq.slot is not None:
            self.kv.release(seq.slot, seq.token_ids[: seq.num_computed])
            seq.slot = None

    def abort(self, seq: Sequence) -> None:
        """Drop seq from whatever queue holds it and free its KV at once."""
        self.held.discard(seq)
        if seq.status == Status.WAITING:
            self._remove(self.waiting, seq)
        elif seq.status == Status.SWAPPED:
            self._remove(self.swapped, seq)
        elif seq.status == Status.RUNNING and seq in self.running:
            self.running.remove(seq)  # rare (abort), O(running)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED

    @staticmethod
    def _remove(q: deque[Sequence], seq: Sequence) -> None:
        with contextlib.suppress(ValueError):
            q.remove(seq)  # abort only, never on the step path

    def _fail(self, seq: Sequence, why: str) -> None:
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED
        seq.finish_reason = "error"
        seq.error = RequestError(ErrorKind.TOO_LARGE, why)
        self.failed.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.num_preemptions += 1
        if self.preemption_mode == "swap":
            self.kv.swap_out(seq.slot)
            seq.status = Status.SWAPPED
            self.swapped.appendleft(seq)  # preempted newest first: the oldest ends up in front
        else:
            self.kv.free(seq.slot)
            seq.slot = None
            seq.num_computed = 0
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ step

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        batch.plan = self.kv.take_plan()  # includes frees since the last step (finish, abort)
        return batch

    def _schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.kv.ensure(seq.slot, seq.num_computed + n):
                victim = running[-1]
                running.pop()
                preempted = True
                if victim is not seq:
                    self._preempt(victim)
                    continue
                if i == 0 and not self.held:  # alone in the engine and still no room
                    self._fail(seq, self._too_large(seq, seq.num_computed + n))
                else:
                    self._preempt(seq)
                seq = None
                break
            if seq is None:
                break  # seq was the last one in `running`
            batch.add(seq, n)
            budget -= n
            i += 1
        if preempted:
            return batch
        # resume swapped requests before admitting new ones (they are older)
        while self.swapped and len(running) < self.max_num_seqs:
            seq = self.swapped[0]
            if not self.kv.swap_in(seq.slot):
                if running or batch or self.held:
                    return batch  # wait for running requests to give pages back
                # nothing runs that could free pages: recompute instead of waiting forever
                self.swapped.popleft()
                self.kv.free(seq.slot)
                seq.slot, seq.num_computed, seq.status = None, 0, Status.WAITING
                self.waiting.appendleft(seq)
                continue
            self.swapped.popleft()
            seq.status = Status.RUNNING
            bisect.insort(running, seq, key=lambda s: s.arrival)  # scheduled from next step
        if self.swapped:
            return batch
        while self.waiting and len(running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            alloc = self.kv.acquire(seq.request_id, seq.token_ids)
            if alloc is None:
                break  # no free slot
            seq.slot, seq.num_computed = alloc.slot, alloc.num_cached_tokens
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.kv.ensure(seq.slot, seq.num_computed + n):
                self.kv.free(seq.slot)
                seq.slot, seq.num_computed = None, 0
                if running or self.held:
                    break  # wait for running requests to give pages back
                self.waiting.popleft()
                self._fail(seq, self._too_large(seq, n))
                continue
            self.waiting.popleft()
            if seq.t_scheduled is None:  # first admission (not a resumption)
                seq.t_scheduled = time.monotonic()
                seq.num_cached_tokens = alloc.num_cached_tokens
            seq.status = Status.RUNNING
            running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _too_large(self, seq: Sequence, num_tokens: int) -> str:
        return (
            f"request {seq.request_id!r} needs KV for {num_tokens} tokens, more than the KV "
            f"cache can hold with the engine to itself ({self.kv.num_free_pages()} pages "
            "obtainable): raise kv_memory or shorten the request"
        )

    def remove_finished(self) -> None:
        if any(s.status != Status.RUNNING for s in self.running):
            self.running = [s for s in self.running if s.status == Status.RUNNING]
