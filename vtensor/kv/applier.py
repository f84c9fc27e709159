"""PlanApplier: one device's side of a KVCache: its reservation, pages, mapper and copies.

It applies page plans (plan.py) and knows nothing of slots, requests or prefixes. Logical ids
resolve to pages of this device's own pool, created when an id is first mapped here and held
(one reference) until a `Release`. Driver maps and unmaps run on the mapper thread; copies are
queued on the stream at `wait_ready()`, in plan order, once the maps they need are done.

    Map      urgent map: the next wait_ready() waits for it; `ahead`: only once a Need names it
    Unmap    lazy unmap behind an event recorded now (after every kernel queued so far)
    Copy     the source id is mapped into a ring of scratch pages (address space only), the
             copy waits for wait_ready (one wait per step, not one per admitted request)
    SwapOut  waits for the maps, copies to (pinned) host memory at once; the Unmap follows
    SwapIn   queued like a Copy: its pages were mapped just before
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtensor.kv.layout import KVConfigError, KVLayout
from vtensor.kv.plan import (
    Copy,
    Map,
    Need,
    PagePlan,
    Release,
    SwapDrop,
    SwapIn,
    SwapOut,
    Unmap,
)
from vtensor.vmm import Backend, Mapper, PagePool, PhysPage, Ticket, VirtualTensor

# Scratch ring entries: an entry is mapped again ~SCRATCH_PAGES copies later, by when the GPU
# has long passed the event its unmap waits for (a smaller ring would make admissions wait for
# the GPU). Address space only (2 MiB each).
SCRATCH_PAGES = 256


@dataclass(slots=True)
class _Queued:
    """A copy waiting for wait_ready: a partial page (ring `entry` -> byte `dst`, `nbytes`) or
    a swap-in (`buf` -> KV pages `pages`)."""

    pages: tuple[int, ...]  # KV pages written
    entry: int = -1
    nbytes: int = 0
    buf: torch.Tensor | None = None


class PlanApplier:
    def __init__(
        self,
        backend: Backend,
        layout: KVLayout,
        budget_bytes: int | None,
        *,
        async_map: bool = True,
        grow_batch: int = 16,
    ) -> None:
        self.backend = backend
        self.page_size = ps = backend.page_size
        # The accounting pool (pagetable.py) enforces the budget; here it only caps creating
        # pages ahead. Pages held here <= ids alive there, as plans apply in order.
        self.pool = PagePool(backend, budget_bytes, grow_batch=grow_batch)
        self.mapper: Mapper | None = Mapper() if async_map else None
        try:
            self.vt = VirtualTensor(self.pool, layout.total_bytes, self.mapper)
        except Exception as e:
            self._close_mapper_and_pool()
            raise KVConfigError(
                f"cannot reserve {layout.total_bytes / 2**40:.2f} TiB of virtual space for "
                f"{layout.num_slots} slots x {layout.max_tokens} tokens x "
                f"{layout.bytes_per_token} B: {e}"
            ) from e
        self.bytes = self.vt.view(torch.uint8, (layout.total_bytes,))  # the whole reservation
        # Made now, before any map work is queued (CUDA builds a tensor over a reservation with
        # a temporary mapping). Pages are mapped there just for one copy.
        self.ring = SCRATCH_PAGES
        self.scratch = VirtualTensor(self.pool, self.ring * ps, self.mapper)
        self.scratch_bytes = self.scratch.view(torch.uint8, (self.ring * ps,))
        self._ring_next = 0
        self._held: dict[int, PhysPage] = {}  # logical id -> this device's page
        self._id_of: dict[int, int] = {}  # id(PhysPage) -> logical id
        self._required: list[Ticket] = []  # map work the next step needs
        self._ahead: dict[int, Ticket] = {}  # KV page -> its lookahead map, maybe not done
        self._last: Ticket | None = None  # latest map (FIFO: done means all earlier are done)
        self._queued: list[_Queued] = []  # copies for wait_ready, in plan order
        self._swap: dict[int, torch.Tensor] = {}  # slot -> host copy of its swapped pages
        self._do = {
            Map: self._map, Need: self._need, Unmap: self._unmap, Copy: self._copy,
            SwapOut: self._swap_out, SwapIn: self._swap_in, SwapDrop: self._swap_drop,
            Release: self._release,
        }  # fmt: skip

    def apply(self, plan: PagePlan) -> None:
        """Start the plan's device work, op by op (maps and unmaps go to the mapper thread)."""
        do = self._do
        for op in plan.ops:
            do[type(op)](op)

    def wait_ready(self) -> None:
        """Block until the map work the next step needs is done (lookahead maps may run on),
        then queue the copies that waited for it on the stream."""
        required, self._required = self._required, []
        for t in required:
            t.wait()
        queued, self._queued = self._queued, []
        ps = self.page_size
        for q in queued:
            if q.buf is None:
                src = self.scratch_bytes[q.entry * ps : q.entry * ps + q.nbytes]
                dst = q.pages[0] * ps
                self.bytes[dst : dst + q.nbytes].copy_(src, non_blocking=True)
            else:
                for i, page in enumerate(q.pages):
                    dst = self.bytes[page * ps : (page + 1) * ps]
                    dst.copy_(q.buf[i * ps : (i + 1) * ps], non_blocking=True)
        entries = [q.entry for q in queued if q.buf is None]
        if entries:  # behind the copies: the ring entries' page references go then
            event = self.backend.record_event()
            for e in entries:
                self.scratch.unmap(e, e + 1, after=event)

    # ---- ops ----
    def _map(self, op: Map) -> None:
        missing = [i for i in op.ids if i not in self._held]
        for i, p in zip(missing, self.pool.alloc(len(missing)), strict=True):
            self._held[i] = p  # the allocation's reference is the hold
            self._id_of[id(p)] = i
        t = self.vt.map_pages(op.first, [self._held[i] for i in op.ids])
        self._last = t
        if op.ahead:
            for page in range(op.first, op.first + len(op.ids)):
                self._ahead[page] = t
        else:
            self._required.append(t)

    def _need(self, op: Need) -> None:
        for page in range(op.first, op.last):
            t = self._ahead.pop(page, None)
            if t is not None and not t.done():  # usually done long ago: that is lookahead
                self._required.append(t)

    def _unmap(self, op: Unmap) -> None:
        if self._queued:
            self._drop_queued(op.first, op.last)
        for page in range(op.first, op.last):
            self._ahead.pop(page, None)
        self.vt.unmap(op.first, op.last, after=self.backend.record_event())

    def _drop_queued(self, first: int, last: int) -> None:
        """Pages [first, last) go before wait_ready: a partial copy into them is dropped (its
        slot went away: nothing reads it); a swap-in that still fills other pages runs now."""
        hit = [q for q in self._queued if any(first <= p < last for p in q.pages)]
        if any(q.buf is not None for q in hit):
            self.wait_ready()
            return
        for q in hit:
            self.scratch.unmap(q.entry, q.entry + 1)  # nothing read it
        self._queued = [q for q in self._queued if q not in hit]

    def _copy(self, op: Copy) -> None:
        entry = self._ring_next
        if any(q.entry == entry for q in self._queued):  # the ring wrapped within one step
            self.wait_ready()
        self._ring_next = (entry + 1) % self.ring
        self._required.append(self.scratch.map_pages(entry, [self._held[op.src]]))
        self._queued.append(_Queued((op.dst,), entry=entry, nbytes=op.nbytes))

    def _swap_out(self, op: SwapOut) -> None:
        # the pages must be mapped and written first: earlier copies go now, maps are waited
        # for (lookahead ones too: FIFO, the latest map covers them)
        self.wait_ready()
        if self._last is not None:
            self._last.wait()
        ps = self.page_size
        pin = self.backend.name == "cuda" and torch.cuda.is_available()
        buf = torch.empty(len(op.pages) * ps, dtype=torch.uint8, pin_memory=pin)
        for i, page in enumerate(op.pages):
            buf[i * ps : (i + 1) * ps].copy_(self.bytes[page * ps : (page + 1) * ps],
                                             non_blocking=True)  # fmt: skip
        self._swap[op.slot] = buf

    def _swap_in(self, op: SwapIn) -> None:
        self._queued.append(_Queued(op.pages, buf=self._swap.pop(op.slot)))

    def _swap_drop(self, op: SwapDrop) -> None:
        self._swap.pop(op.slot, None)

    def _release(self, op: Release) -> None:
        for i in op.ids:
            p = self._held.pop(i)
            del self._id_of[id(p)]
            self.pool.decref(p)  # unmapped everywhere by now: it goes back to the free list
        self.pool.trim(0)  # only released pages are free here

    # ---- queries, teardown ----
    def ids(self) -> dict[int, int]:
        """{KV page: logical id} of every page mapped on this device."""
        out = {}
        for page in range(self.vt.num_pages):
            p = self.vt.page(page)
            if p is not None:
                out[page] = self._id_of[id(p)]
        return out

    def num_scratch_mapped(self) -> int:
        return self.scratch.num_mapped()

    def close(self) -> None:
        """Everything goes, applied or not (the cache is closing)."""
        self._queued, self._required, self._swap = [], [], {}
        self.scratch.close()
        self.vt.close()
        for p in self._held.values():
            self.pool.decref(p)
        self._held, self._id_of = {}, {}
        self._close_mapper_and_pool()

    def _close_mapper_and_pool(self) -> None:
        if self.mapper is not None:
            self.mapper.close()
        self.pool.close()
