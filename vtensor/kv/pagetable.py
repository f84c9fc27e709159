"""PageTable: the KV reservation's pages as the scheduler sees them, with no device work.

Which logical page (id) is mapped at each KV page, refcounts in an accounting pool whose pages
are ids only (`logical_pool`): no memory, no driver call. Every change is also recorded as an
op of the pending plan (plan.py); the device applies it later (applier.py). The same
invariants as a VirtualTensor: a page is mapped once before it is unmapped, refcount = the
number of KV pages mapping the id + extra holds (radix tree, pending copies).
"""

from __future__ import annotations

from collections.abc import Sequence

from vtensor.kv.plan import Map, PageOp, PagePlan, Unmap
from vtensor.vmm import PagePool, PhysPage
from vtensor.vmm.errors import AlreadyMapped, NotMapped, OutOfRange


class _LogicalIds:
    """The accounting pool's stand-in for a backend: a page is a number, its memory lives on
    each device (created there when the id is first mapped)."""

    name = "logical"

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def create(self) -> int:
        return 0  # the pool's dense index is the id; the handle is unused

    def release(self, handle: int) -> None:
        pass


def logical_pool(page_size: int, budget_bytes: int | None) -> PagePool:
    """A PagePool of ids under the byte budget; ids are made one at a time (they cost nothing,
    and pool stats then count ids that were really used)."""
    return PagePool(_LogicalIds(page_size), budget_bytes, grow_batch=1)  # type: ignore[arg-type]


class PageTable:
    def __init__(self, pool: PagePool, num_pages: int) -> None:
        self.pool = pool
        self.num_pages = num_pages
        self._pages: list[PhysPage | None] = [None] * num_pages
        self._num_mapped = 0
        self.plan = PagePlan()  # recorded since the last take()

    def record(self, op: PageOp) -> None:
        self.plan.ops.append(op)

    def take(self) -> PagePlan:
        plan, self.plan = self.plan, PagePlan()
        return plan

    def map(self, first: int, last: int, ahead: bool = False) -> None:
        """Fresh ids (refcount 1) at KV pages [first, last); OutOfPages changes nothing."""
        self._check_unmapped(first, last)
        self._install(first, self.pool.alloc(last - first), ahead)

    def map_pages(self, first: int, pages: Sequence[PhysPage]) -> None:
        """Alias ids already in use at KV pages [first, first + len(pages))."""
        self._check_unmapped(first, first + len(pages))
        for p in pages:
            self.pool.incref(p)
        self._install(first, list(pages), False)

    def _install(self, first: int, pages: list[PhysPage], ahead: bool) -> None:
        if not pages:
            return
        self._pages[first : first + len(pages)] = pages
        self._num_mapped += len(pages)
        self.record(Map(first, tuple(p.index for p in pages), ahead))

    def unmap(self, first: int, last: int) -> None:
        if not 0 <= first <= last <= self.num_pages:
            raise OutOfRange(f"KV pages [{first}, {last}) outside [0, {self.num_pages})")
        pages = self._pages[first:last]
        if any(p is None for p in pages):
            raise NotMapped(f"KV pages [{first}, {last}) are not all mapped")
        self._pages[first:last] = [None] * (last - first)
        self._num_mapped -= last - first
        for p in pages:
            self.pool.decref(p)  # type: ignore[arg-type]
        if first < last:
            self.record(Unmap(first, last))

    def page(self, index: int) -> PhysPage | None:
        return self._pages[index]

    def is_mapped(self, index: int) -> bool:
        return self._pages[index] is not None

    def num_mapped(self) -> int:
        return self._num_mapped

    def ids(self) -> dict[int, int]:
        """{KV page: id} of every mapped page (integrity, replay tests)."""
        return {i: p.index for i, p in enumerate(self._pages) if p is not None}

    def _check_unmapped(self, first: int, last: int) -> None:
        if not 0 <= first <= last <= self.num_pages:
            raise OutOfRange(f"KV pages [{first}, {last}) outside [0, {self.num_pages})")
        if any(p is not None for p in self._pages[first:last]):
            raise AlreadyMapped(f"a KV page in [{first}, {last}) is already mapped")
