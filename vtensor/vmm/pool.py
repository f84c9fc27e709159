"""PagePool: physical pages created ahead in batches, reused, capped by a byte budget.

cuMemCreate costs ~17 us per 2 MiB page on the H200, so pages are created `grow_batch` at a
time and recycled through a LIFO free list (the most recently freed page is the warmest).
`trim()` hands idle pages back to the driver/OS, which is what makes the memory elastic.

Every live page is exactly one of: free (refcount 0, on the free list) or in use (refcount >=
1: the number of virtual addresses it is mapped under, plus any extra holds via incref).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vtensor.vmm.backend import Backend
from vtensor.vmm.errors import OutOfPages, VmmError

if TYPE_CHECKING:
    from vtensor.vmm.mapper import Mapper


@dataclass(slots=True, eq=False)
class PhysPage:
    handle: int  # backend handle (CUDA: CUmemGenericAllocationHandle as int; host: memfd slot)
    index: int  # small dense id within the pool (< peak live pages), reused after release
    refcount: int  # 0: on the free list; n: held n times (mappings + increfs)


class PagePool:
    def __init__(
        self, backend: Backend, budget_bytes: int | None = None, grow_batch: int = 16
    ) -> None:
        if grow_batch < 1:
            raise ValueError(f"grow_batch={grow_batch} must be >= 1")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be >= 0")
        self.backend = backend
        self.page_size = backend.page_size
        self.budget_pages: int | None = (
            None if budget_bytes is None else budget_bytes // backend.page_size
        )
        self.grow_batch = grow_batch
        self._pages: list[PhysPage | None] = []  # by index; None = index free for reuse
        self._free_indices: list[int] = []
        self._free: list[PhysPage] = []  # LIFO free list (refcount 0)
        self._live = 0  # created - released
        self._in_use = 0
        self._created = 0
        self._released = 0
        self._peak_in_use = 0
        self._closed = False
        # Mappers that may still hold queued unmaps of our pages: trim/close drain them first
        # so that a page is never released while a deferred unmap still maps it.
        self._mappers: weakref.WeakSet[Mapper] = weakref.WeakSet()

    # ---- allocation ----
    def alloc(self, n: int = 1) -> list[PhysPage]:
        """n pages with refcount 1. OutOfPages (and no state change) past the budget."""
        self._check_open()
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        short = n - len(self._free)
        if short > 0:
            room = None if self.budget_pages is None else self.budget_pages - self._live
            if room is not None and short > room:
                raise OutOfPages(
                    f"need {n} pages: {len(self._free)} free and {room} more allowed by the "
                    f"budget of {self.budget_pages} pages ({self._in_use} in use)"
                )
            batch = max(short, self.grow_batch)
            self._grow(batch if room is None else min(batch, room), need=short)
        out = [self._free.pop() for _ in range(n)]
        for p in out:
            p.refcount = 1
        self._in_use += n
        self._peak_in_use = max(self._peak_in_use, self._in_use)
        return out

    def _grow(self, count: int, need: int) -> None:
        # Pages created before a driver failure stay on the free list: nothing leaks, and the
        # error only surfaces when we could not get the pages the caller needs.
        for i in range(count):
            try:
                handle = self.backend.create()
            except Exception:
                if i < need:
                    raise
                return
            if self._free_indices:
                index = self._free_indices.pop()
            else:
                index = len(self._pages)
                self._pages.append(None)
            page = PhysPage(handle=handle, index=index, refcount=0)
            self._pages[index] = page
            self._free.append(page)
            self._live += 1
            self._created += 1

    def reserve_free(self, n: int) -> None:
        """Create pages ahead so that at least n are free (within the budget)."""
        self._check_open()
        short = n - len(self._free)
        if short > 0:
            room = None if self.budget_pages is None else self.budget_pages - self._live
            self._grow(short if room is None else min(short, room), need=0)

    def incref(self, page: PhysPage) -> None:
        self._check_page(page)
        if page.refcount < 1:
            raise VmmError(f"incref of free page {page.index}: alloc it first")
        page.refcount += 1

    def decref(self, page: PhysPage) -> None:
        self._check_page(page)
        if page.refcount < 1:
            raise VmmError(f"decref of free page {page.index}")
        page.refcount -= 1
        if page.refcount == 0:
            self._free.append(page)
            self._in_use -= 1

    # ---- elasticity ----
    def trim(self, keep_free: int = 0) -> int:
        """Release idle pages beyond `keep_free` (oldest-freed first). Returns how many."""
        return len(self.trim_pages(keep_free))

    def trim_pages(self, keep_free: int = 0) -> list[int]:
        """trim(), returning the indices of the pages released (an index may be reused by a
        page created later)."""
        self._check_open()
        n = len(self._free) - max(keep_free, 0)
        if n <= 0:
            return []
        self._drain_mappers()
        victims, self._free = self._free[:n], self._free[n:]  # bottom of the LIFO = coldest
        for i, page in enumerate(victims):
            try:
                self.backend.release(page.handle)
            except Exception:
                self._free = victims[i:] + self._free  # keep the unreleased ones
                raise
            self._forget(page)
        return [p.index for p in victims]

    def _forget(self, page: PhysPage) -> None:
        self._pages[page.index] = None
        self._free_indices.append(page.index)
        page.refcount = -1  # poison: a stale reference fails _check_page
        self._live -= 1
        self._released += 1

    def _drain_mappers(self) -> None:
        for m in list(self._mappers):
            m.flush()

    def attach_mapper(self, mapper: Mapper) -> None:
        """Called by VirtualTensor: trim/close will drain this mapper before releasing."""
        self._mappers.add(mapper)

    # ---- introspection ----
    def num_free(self) -> int:
        return len(self._free)

    def num_in_use(self) -> int:
        return self._in_use

    def stats(self) -> dict:
        return {
            "page_size": self.page_size,
            "created": self._created,
            "released": self._released,
            "live": self._live,
            "free": len(self._free),
            "in_use": self._in_use,
            "peak_in_use": self._peak_in_use,
            "budget_pages": self.budget_pages,
        }

    def check_integrity(self) -> None:
        """free + in_use == live, refcounts consistent with the free list."""
        live = [p for p in self._pages if p is not None]
        assert len(live) == self._live, (len(live), self._live)
        free_ids = {id(p) for p in self._free}
        assert len(free_ids) == len(self._free), "page twice on the free list"
        for p in live:
            assert (p.refcount == 0) == (id(p) in free_ids), (p, "free list / refcount mismatch")
        assert len(self._free) + self._in_use == self._live, self.stats()

    def close(self) -> None:
        """Release the free pages. Pages still in use are an error (close tensors first)."""
        if self._closed:
            return
        self._drain_mappers()
        self.trim(0)
        self._closed = True
        if self._in_use:
            raise VmmError(f"PagePool closed with {self._in_use} pages still in use")

    def _check_open(self) -> None:
        if self._closed:
            raise VmmError("PagePool is closed")

    def _check_page(self, page: PhysPage) -> None:
        if not (0 <= page.index < len(self._pages)) or self._pages[page.index] is not page:
            raise VmmError(f"page {page!r} does not belong to this pool (or was released)")
