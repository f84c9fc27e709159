"""Property test: random map / alias / unmap / write / trim sequences against a simple model.

The model knows which (tensor, page index) slots hold which physical page, each page's
refcount, how many pages the pool has free / in use / created (batches of grow_batch, capped by
the budget) and the byte each page was last filled with; after every step the real pool,
backend and page contents must agree with it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vtensor.vmm import (  # noqa: E402
    AlreadyMapped,
    Mapper,
    NotMapped,
    OutOfPages,
    OutOfRange,
    PagePool,
    VirtualTensor,
    make_backend,
)

PAGE = 64 << 10
PAGES = 6  # per virtual tensor
BUDGET = 8  # pages
GROW = 3

idx = st.integers(-1, PAGES)
count = st.integers(0, 3)
which = st.integers(0, 1)


class VmmMachine(RuleBasedStateMachine):
    @initialize(use_mapper=st.booleans())
    def setup(self, use_mapper: bool) -> None:
        self.backend = make_backend("host", PAGE)
        self.pool = PagePool(self.backend, budget_bytes=BUDGET * PAGE, grow_batch=GROW)
        self.mapper = Mapper() if use_mapper else None
        self.vts = [VirtualTensor(self.pool, PAGES * PAGE, self.mapper) for _ in range(2)]
        # model
        self.slot: dict[tuple[int, int], int] = {}  # (tensor, index) -> page key
        self.refs: dict[int, int] = {}  # page key -> refcount (pages in use only)
        self.pages: dict[int, object] = {}  # page key -> PhysPage (keeps ids stable)
        self.data: dict[int, int | None] = {}  # page key -> fill byte, None = unknown
        self.free = self.created = self.released = 0

    def _alloc_outcome(self, n: int) -> bool:
        short = n - self.free
        if short <= 0:
            return True
        room = BUDGET - (self.free + len(self.refs))
        if short > room:
            return False
        batch = min(max(short, GROW), room)
        self.free += batch
        self.created += batch
        return True

    def _range_error(self, v: int, first: int, last: int, want_mapped: bool):
        if not 0 <= first <= last <= PAGES:
            return OutOfRange
        for i in range(first, last):
            if ((v, i) in self.slot) != want_mapped:
                return NotMapped if want_mapped else AlreadyMapped
        return None

    @rule(v=which, first=idx, n=count)
    def map(self, v: int, first: int, n: int) -> None:
        last = first + n
        err = self._range_error(v, first, last, want_mapped=False)
        if err is None and not self._alloc_outcome(n):
            err = OutOfPages
        if err is not None:
            try:
                self.vts[v].map(first, last)
            except err:
                return
            raise AssertionError(f"expected {err.__name__}")
        self.vts[v].map(first, last)
        self.free -= n
        for i in range(first, last):
            p = self.vts[v].page(i)
            key = id(p)
            assert key not in self.refs, "a page in use was handed out again"
            self.pages[key], self.refs[key], self.data[key] = p, 1, None
            self.slot[(v, i)] = key

    @precondition(lambda self: bool(self.slot))
    @rule(v=which, first=idx, pick=st.integers(0, 10**6), n=st.integers(1, 3))
    def alias(self, v: int, first: int, pick: int, n: int) -> None:
        src, src_first = sorted(self.slot)[pick % len(self.slot)]
        keys = []  # the run of mapped source pages starting at the picked slot
        while len(keys) < n and (src, src_first + len(keys)) in self.slot:
            keys.append(self.slot[(src, src_first + len(keys))])
        n = len(keys)
        err = self._range_error(v, first, first + n, want_mapped=False)
        pages = [self.pages[k] for k in keys]
        if err is not None:
            try:
                self.vts[v].map_pages(first, pages)
            except err:
                return
            raise AssertionError(f"expected {err.__name__}")
        self.vts[v].map_pages(first, pages)
        for i, k in enumerate(keys):
            self.slot[(v, first + i)] = k
            self.refs[k] += 1

    @rule(v=which, first=idx, n=count)
    def unmap(self, v: int, first: int, n: int) -> None:
        last = first + n
        err = self._range_error(v, first, last, want_mapped=True)
        if err is not None:
            try:
                self.vts[v].unmap(first, last)
            except err:
                return
            raise AssertionError(f"expected {err.__name__}")
        self.vts[v].unmap(first, last)
        for i in range(first, last):
            k = self.slot.pop((v, i))
            self.refs[k] -= 1
            if self.refs[k] == 0:
                del self.refs[k]
                self.free += 1

    @precondition(lambda self: bool(self.slot))
    @rule(pick=st.integers(0, 10**6), value=st.integers(0, 255))
    def write(self, pick: int, value: int) -> None:
        v, i = sorted(self.slot)[pick % len(self.slot)]
        if self.mapper is not None:
            self.mapper.flush()  # like Ticket.wait() before a kernel touches the page
        self.vts[v].view(torch.uint8, (PAGE,), offset_bytes=i * PAGE).fill_(value)
        self.data[self.slot[(v, i)]] = value

    @rule(keep=st.integers(0, 4))
    def trim(self, keep: int) -> None:
        n = self.pool.trim(keep)
        assert n == max(0, self.free - keep)
        self.free -= n
        self.released += n

    @invariant()
    def agrees_with_model(self) -> None:
        if self.mapper is not None:
            self.mapper.flush()
        s = self.pool.stats()
        assert (s["in_use"], s["free"], s["created"], s["released"]) == (
            len(self.refs), self.free, self.created, self.released,
        ), (s, len(self.refs), self.free, self.created, self.released)  # fmt: skip
        self.pool.check_integrity()
        assert self.backend.stats()["mapped_pages"] == len(self.slot)
        for (v, i), k in self.slot.items():
            page = self.vts[v].page(i)
            assert id(page) == k and page.refcount == self.refs[k]
            if self.data[k] is not None:
                got = self.vts[v].view(torch.uint8, (PAGE,), offset_bytes=i * PAGE)
                assert bool((got == self.data[k]).all()), f"page {(v, i)} lost its bytes"
        for v in range(2):
            assert self.vts[v].num_mapped() == sum(1 for (w, _) in self.slot if w == v)

    def teardown(self) -> None:
        if not hasattr(self, "vts"):
            return
        for vt in self.vts:
            vt.close()
        if self.mapper is not None:
            self.mapper.close()
        self.pool.close()
        assert self.pool.stats()["live"] == 0 and self.backend.stats()["handles"] == 0
        self.backend.close()


TestVmmProperty = VmmMachine.TestCase
TestVmmProperty.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
