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

import torch

from vtensor.kv.layout import KVLayout, KVSpec
from vtensor.kv.manager import SlotStateError
from vtensor.kv.radix import RadixNode, RadixTree
from vtensor.vmm import Backend, Mapper, PagePool, Ticket, VirtualTensor


class SlotState(IntEnum):
    FREE = 0
    ACTIVE = 1
    PARKED = 2  # finished, pages kept for conversation affinity; evictable
    SWAPPED = 3  # private pages in host memory, shared pages still mapped


@dataclass(slots=True)
class PartialCopy:
    """The first `nbytes` of scratch ring entry `entry` go to byte `dst` of the KV (a new page of
    `slot`), once the maps of both are done."""

    slot: int
    entry: int
    dst: int
    nbytes: int


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
    pending: Ticket | None = None  # lookahead map work not yet required by ensure()
    pending_first: int = 0  # first slot page of that work
    swap_pages: list[int] = field(default_factory=list)  # slot pages swapped out
    swap_buf: torch.Tensor | None = None  # host copy [len(swap_pages) * page_size] uint8


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
    pool: PagePool
    mapper: Mapper | None
    vt: VirtualTensor  # the KV reservation
    scratch: VirtualTensor  # a ring of pages: partial-page copy sources (see prefix.py)
    scratch_bytes: torch.Tensor  # uint8 view of the whole ring
    scratch_next: int  # next ring entry
    copies: list[PartialCopy]  # queued for wait_ready(): their maps must be done first
    tree: RadixTree
    slots: list[Slot]
    free_slots: deque[int]  # FIFO: the slot freed longest ago is reused first
    parked: OrderedDict[int, None]  # parked slot ids, LRU first
    parked_private_pages: int  # sum of parked slots' parked_private
    stats: dict[str, int]
    series: list[dict]
    _bytes: torch.Tensor  # uint8 view of the whole reservation
    _required: list[Ticket]  # map work the next step needs
    _last_alloc: float
    _closed: bool

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

    def _map(self, slot: int, first: int, last: int) -> Ticket:
        self._last_alloc = time.monotonic()
        self.stats["map_ops"] += last - first
        return self.vt.map(self.slot_page(slot, first), self.slot_page(slot, last))

    def _unmap_runs(self, slot: int, pages: Sequence[int], after: object | None) -> None:
        """Unmap the given slot pages (sorted), one call per consecutive run."""
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            first, last = self.slot_page(slot, pages[i]), self.slot_page(slot, pages[j - 1] + 1)
            self.vt.unmap(first, last, after=after)
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
