"""VirtualTensor: one reserved virtual range, seen as torch tensors, backed on demand.

    addr                                                         addr + nbytes
    |  page 0  |  page 1  |  page 2  |  ...                  | page n-1 |
       mapped    unmapped   mapped (alias of another tensor's page)

The base address never moves, so views (and CUDA graphs over them) stay valid while pages come
and go. Bookkeeping (which PhysPage is where, refcounts) changes synchronously in the caller's
thread; only the driver calls go to the mapper. Ticket.wait() before a kernel touches newly
mapped pages. Touching an unmapped page is a segfault on host and an illegal address on CUDA:
map first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from vtensor.vmm.errors import AlreadyMapped, NotMapped, OutOfRange, VmmError
from vtensor.vmm.mapper import Mapper, Ticket
from vtensor.vmm.pool import PagePool, PhysPage


class VirtualTensor:
    def __init__(
        self, pool: PagePool, nbytes: int, mapper: Mapper | None = None, lazy_unmap: bool = True
    ) -> None:
        """`lazy_unmap`: unmaps go to the mapper's lazy lane (they never delay later maps);
        a later map of the same page index first runs the pending unmap there."""
        if nbytes <= 0:
            raise ValueError(f"nbytes={nbytes} must be positive")
        self.pool = pool
        self.backend = pool.backend
        self.mapper = mapper
        self.page_size = pool.page_size
        self.num_pages = -(-nbytes // self.page_size)
        self.nbytes = self.num_pages * self.page_size  # rounded up to whole pages
        self.addr = self.backend.reserve(self.nbytes)
        try:
            # Made now, while nothing is mapped or queued: CUDA needs a scratch page at the
            # base to build it (see CudaBackend.as_tensor), which must not race a real map.
            self._base = self.backend.as_tensor(self.addr, self.nbytes)  # uint8 [nbytes]
        except BaseException:
            self.backend.free_reservation(self.addr, self.nbytes)
            raise
        self._pages: list[PhysPage | None] = [None] * self.num_pages
        self._unmapping: dict[int, Ticket] = {}  # page index -> its lazy unmap, maybe not run
        self.lazy_unmap = lazy_unmap and mapper is not None
        # time unmap work spent waiting for the GPU to pass its event (mapper or caller thread)
        self.event_wait_seconds = 0.0
        self._num_mapped = 0
        self._closed = False
        if mapper is not None:
            pool.attach_mapper(mapper)

    # ---- views ----
    def view(
        self,
        dtype: torch.dtype,
        shape: Sequence[int],
        strides: Sequence[int] | None = None,
        offset_bytes: int = 0,
    ) -> torch.Tensor:
        """Zero-copy tensor over the range; strides in elements, contiguous by default."""
        self._check_open()
        shape = tuple(int(s) for s in shape)
        item = dtype.itemsize
        if strides is None:
            strides, acc = [], 1
            for s in reversed(shape):
                strides.append(acc)
                acc *= s
            strides = tuple(reversed(strides))
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(shape) or any(s < 0 for s in shape) or any(s < 0 for s in strides):
            raise ValueError(f"bad shape {shape} / strides {strides}")
        if offset_bytes < 0 or offset_bytes % item:
            raise OutOfRange(f"offset_bytes={offset_bytes} must be >= 0 and a multiple of {item}")
        extent = (
            0 if 0 in shape else 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
        )
        if offset_bytes + extent * item > self.nbytes:
            raise OutOfRange(
                f"view of {extent * item} bytes at offset {offset_bytes} exceeds {self.nbytes}"
            )
        n_el = (self.nbytes - offset_bytes) // item
        flat = self._base[offset_bytes : offset_bytes + n_el * item].view(dtype)
        return flat.as_strided(shape, strides)

    # ---- mapping ----
    def map(self, first: int, last: int) -> Ticket:
        """Back pages [first, last) with fresh pool pages (refcount 1)."""
        self._check_range(first, last)
        self._check_unmapped(first, last)
        pages = self.pool.alloc(last - first)  # OutOfPages here leaves everything unchanged
        return self._install(first, pages)

    def map_pages(self, first: int, pages: Sequence[PhysPage]) -> Ticket:
        """Map existing pages at [first, first + len(pages)): aliases share the same data."""
        last = first + len(pages)
        self._check_range(first, last)
        self._check_unmapped(first, last)
        for p in pages:
            self.pool._check_page(p)
            if p.refcount < 1:
                raise VmmError(f"page {p.index} is free: map_pages needs pages in use")
        for p in pages:
            self.pool.incref(p)
        return self._install(first, list(pages))

    def _install(self, first: int, pages: list[PhysPage]) -> Ticket:
        if not pages:
            return Ticket.completed()
        self._pages[first : first + len(pages)] = pages
        self._num_mapped += len(pages)
        addr, handles, backend = (
            self.addr + first * self.page_size,
            [p.handle for p in pages],
            self.backend,
        )
        # the old mapping of these addresses goes first
        return self._run(self._after_unmaps(first, first + len(pages),
                                            lambda: backend.map_range(addr, handles)))  # fmt: skip

    def _after_unmaps(self, first: int, last: int, fn: Callable[[], None]) -> Callable[[], None]:
        """fn, preceded on the mapper thread by the still-queued lazy unmaps of pages
        [first, last) (an address must be unmapped before it is mapped again or freed)."""
        before: dict[int, Ticket] = {}
        if self._unmapping:
            for i in range(first, last):
                t = self._unmapping.pop(i, None)
                if t is not None and not t.done():
                    before[id(t)] = t
        if not before:
            return fn
        mapper = self.mapper
        assert mapper is not None

        def work() -> None:
            for t in before.values():
                mapper.run_now(t)
            fn()

        return work

    def unmap(
        self, first: int, last: int, after: object | None = None, lazy: bool | None = None
    ) -> Ticket:
        """Unmap pages [first, last) and decref them. With `after` (a CUDA event recorded
        after the last kernel using them) the driver unmap first waits for that event.
        `lazy` (default: the tensor's lazy_unmap): queue it on the mapper's lazy lane."""
        self._check_range(first, last)
        for i in range(first, last):
            if self._pages[i] is None:
                raise NotMapped(f"page {i} of the virtual tensor is not mapped")
        pages = self._pages[first:last]
        self._pages[first:last] = [None] * (last - first)
        self._num_mapped -= last - first
        for p in pages:
            self.pool.decref(p)  # type: ignore[arg-type]
        if first == last:
            return Ticket.completed()
        addrs = [self.addr + i * self.page_size for i in range(first, last)]
        backend = self.backend

        def work() -> None:
            t0 = time.perf_counter()
            backend.wait_event(after)
            self.event_wait_seconds += time.perf_counter() - t0
            for a in addrs:
                backend.unmap(a)

        lazy = self.lazy_unmap if lazy is None else lazy and self.mapper is not None
        ready = None if after is None else lambda: backend.event_done(after)
        ticket = self._run(work, lazy=lazy, ready=ready)
        if lazy:
            for i in range(first, last):
                self._unmapping[i] = ticket
        return ticket

    def ensure_mapped(self, start_byte: int, end_byte: int) -> Ticket:
        """Map every still-unmapped page under bytes [start_byte, end_byte)."""
        if not 0 <= start_byte <= end_byte <= self.nbytes:
            raise OutOfRange(f"bytes [{start_byte}, {end_byte}) outside [0, {self.nbytes})")
        first, last = start_byte // self.page_size, -(-end_byte // self.page_size)
        holes = [i for i in range(first, last) if self._pages[i] is None]
        if not holes:
            return Ticket.completed()
        pages = self.pool.alloc(len(holes))
        tickets = []
        run_start = 0  # group consecutive holes into one map_range each
        for k in range(1, len(holes) + 1):
            if k == len(holes) or holes[k] != holes[k - 1] + 1:
                tickets.append(self._install(holes[run_start], pages[run_start:k]))
                run_start = k
        return tickets[-1]  # FIFO: the last one done means all are done

    # ---- queries ----
    def page(self, index: int) -> PhysPage | None:
        self._check_index(index)
        return self._pages[index]

    def is_mapped(self, index: int) -> bool:
        self._check_index(index)
        return self._pages[index] is not None

    def num_mapped(self) -> int:
        return self._num_mapped

    def close(self, after: object | None = None) -> None:
        """Unmap everything (after `after`, if given), free the reservation. Views die."""
        if self._closed:
            return
        runs, i = [], 0
        while i < self.num_pages:
            if self._pages[i] is None:
                i += 1
                continue
            j = i
            while j < self.num_pages and self._pages[j] is not None:
                j += 1
            runs.append((i, j))
            i = j
        last = Ticket.completed()
        for a, b in runs:
            last = self.unmap(a, b, after=after, lazy=False)  # before the free below
        self._closed = True
        self._base = None  # type: ignore[assignment]
        backend, addr, nbytes = self.backend, self.addr, self.nbytes
        free = self._after_unmaps(0, self.num_pages, lambda: backend.free_reservation(addr, nbytes))
        last = self._run(free)
        last.wait()

    # ---- helpers ----
    def _run(
        self, fn: Callable[[], None], lazy: bool = False, ready: Callable[[], bool] | None = None
    ) -> Ticket:
        if self.mapper is None:
            fn()
            return Ticket.completed()
        return self.mapper.submit(fn, lazy=lazy, ready=ready)

    def _check_open(self) -> None:
        if self._closed:
            raise VmmError("VirtualTensor is closed")

    def _check_range(self, first: int, last: int) -> None:
        self._check_open()
        if not 0 <= first <= last <= self.num_pages:
            raise OutOfRange(f"pages [{first}, {last}) outside [0, {self.num_pages})")

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_pages:
            raise OutOfRange(f"page {index} outside [0, {self.num_pages})")

    def _check_unmapped(self, first: int, last: int) -> None:
        for i in range(first, last):
            if self._pages[i] is not None:
                raise AlreadyMapped(f"page {i} of the virtual tensor is already mapped")

    def __repr__(self) -> str:
        return (
            f"VirtualTensor(addr={self.addr:#x}, pages={self.num_pages}, "
            f"mapped={self._num_mapped}, page_size={self.page_size}, {self.backend.name})"
        )
