"""Slot records and the state every part of KVCache shares (the mixins of cache.py).

A slot is one request's virtually contiguous KV range; `Slot` says what it holds. KVCacheBase
declares the shared state and the small page helpers; the concerns live in their own files:
prefix.py (prefix sharing, affinity), parking.py (parking, eviction, swap), telemetry.py.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from vtensor.kv.applier import PlanApplier
from vtensor.kv.layout import KVLayout, KVSpec
from vtensor.kv.manager import SlotStateError
from vtensor.kv.pagetable import PageTable
from vtensor.kv.plan import PagePlan
from vtensor.kv.radix import RadixNode, RadixTree
from vtensor.vmm import Backend, PagePool, PhysPage


class SlotState(IntEnum):
    FREE = 0
    ACTIVE = 1
    PARKED = 2  # finished, pages kept for conversation affinity; evictable
    SWAPPED = 3  # private pages in host memory, shared pages still mapped


@dataclass(slots=True, eq=False)
class Slot:
    index: int
    state: SlotState = SlotState.FREE
    request_id: str | None = None
    mapped: int = 0  # slot pages [0, mapped) are mapped (minus swapped-out ones)
    path: list[RadixNode] = field(default_factory=list)  # tree nodes of pages [0, len(path))
    tree_mapped: int = 0  # pages of `path` whose mapping IS the node's page (else a duplicate)
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is valid in the slot
    num_tokens: int = 0  # tokens the request needs (live length, for telemetry)
    tail: RadixNode | None = None  # node whose `tails` holds this slot (deepest path node)
    parked_at: int = 0
    parked_private: int = 0  # private pages counted as evictable while parked
    pending: bool = False  # pages [pending_first, mapped) were mapped ahead: no Need yet
    pending_first: int = 0
    swap_pages: list[int] = field(default_factory=list)  # slot pages swapped out


class KVCacheBase:
    spec: KVSpec
    backend: Backend
    layout: KVLayout
    page_size: int
    max_tokens: int
    num_slots: int
    enable_prefix_cache: bool
    lookahead_tokens: int
    idle_trim_seconds: float | None
    pool: PagePool  # accounting: logical ids under the budget (pagetable.py)
    table: PageTable  # which id is mapped where; records the pending plan
    applier: PlanApplier  # this device: reservation, pages, mapper, copies
    copy_refs: list[PhysPage]  # sources of recorded copies, held until their copy ran
    taken_refs: list[PhysPage]  # those of plans already taken: released by wait_ready()
    tree: RadixTree
    slots: list[Slot]
    free_slots: deque[int]  # FIFO: the slot freed longest ago is reused first
    parked: OrderedDict[int, None]  # parked slot ids, LRU first
    parked_private_pages: int  # sum of parked slots' parked_private
    stats: dict[str, int]
    series: list[dict]
    _last_alloc: float
    _closed: bool

    # ---- plans (plan.py) ----
    def take_plan(self) -> PagePlan:
        """The device work recorded since the last call; its copy sources stay held until
        the wait_ready() after it was applied."""
        self.taken_refs += self.copy_refs
        self.copy_refs = []
        return self.table.take()

    def apply(self, plan: PagePlan) -> None:
        """Start a plan's device work on this device (maps run ahead on the mapper thread)."""
        self.applier.apply(plan)

    # ---- small helpers ----
    def slot_page(self, slot: int, page: int = 0) -> int:
        return self.layout.slot_page(slot, page)

    def _avail(self) -> int:
        b = self.pool.budget_pages
        return (1 << 62) if b is None else b - self.pool.num_in_use()

    def _slot(self, slot: int, *states: SlotState) -> Slot:
        if not 0 <= slot < self.num_slots:
            raise SlotStateError(f"slot {slot} out of range [0, {self.num_slots})")
        s = self.slots[slot]
        if states and s.state not in states:
            names = "/".join(st.name for st in states)
            raise SlotStateError(f"slot {slot} is {s.state.name}, expected {names}")
        return s

    def _map(self, slot: int, first: int, last: int, ahead: bool = False) -> None:
        self._last_alloc = time.monotonic()
        self.stats["map_ops"] += last - first
        self.table.map(self.slot_page(slot, first), self.slot_page(slot, last), ahead)

    def _unmap_runs(self, slot: int, pages: Sequence[int]) -> None:
        """Unmap the given slot pages (sorted), one op per consecutive run; the device unmaps
        them once the GPU is done with the kernels queued before the plan is applied."""
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            first, last = self.slot_page(slot, pages[i]), self.slot_page(slot, pages[j - 1] + 1)
            self.table.unmap(first, last)
            self.stats["unmap_ops"] += j - i
            i = j

    def _set_tail(self, s: Slot, node: RadixNode | None) -> None:
        if s.tail is not None:
            s.tail.tails.discard(s.index)
        s.tail = node
        if node is not None:
            node.tails.add(s.index)

    def deepest(self, s: Slot) -> RadixNode:
        return s.path[-1] if s.path else self.tree.root
