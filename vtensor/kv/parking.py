"""Parking, eviction and swap for KVCache.

A finished request's slot is parked (pages kept for a follow-up turn, evictable LRU along with
cached-only tree pages); a preempted one may swap its private pages to host memory and back
to the same virtual addresses. `_make_room` is the one place that evicts.
"""

from __future__ import annotations

from collections.abc import Sequence

from vtensor.kv.plan import SwapDrop, SwapIn, SwapOut
from vtensor.kv.slots import KVCacheBase, Slot, SlotState


class Parking(KVCacheBase):
    def _evict_one(self) -> bool:
        """Evict the least recently used of: an unlocked cached tree leaf, a parked slot."""
        t_node = self.tree.oldest_use()
        t_park = self.slots[next(iter(self.parked))].parked_at if self.parked else None
        if t_node is None and t_park is None:
            return False
        if t_park is None or (t_node is not None and t_node <= t_park):
            page = self.tree.evict_one()
            self.pool.decref(page)  # the tree's reference: the page goes back to the pool
            self.stats["evicted_pages"] += 1
        else:
            self._drop(self.slots[next(iter(self.parked))])
            self.stats["evicted_slots"] += 1
        return True

    def _make_room(self, n: int) -> bool:
        while self._avail() < n:
            if not self._evict_one():
                return False
        return True

    def reset_prefix_cache(self) -> int:
        before = self.pool.num_in_use()
        while self._evict_one():  # LRU order, parked slots and unlocked tree pages alike
            pass
        return before - self.pool.num_in_use()

    def num_free_pages(self) -> int:
        """Pages obtainable now: free within the budget + evictable (cached, parked)."""
        return min(self._avail() + self.tree.num_unpinned + self.parked_private_pages, 1 << 62)

    def release(self, slot: int, token_ids: Sequence[int], park: bool = True) -> None:
        s = self._slot(slot, SlotState.ACTIVE)
        if len(token_ids):
            self.cache_prefix(slot, token_ids)
        if not (park and self.enable_prefix_cache and s.tokens):
            self._drop(s)
            return
        # keep pages through the valid tokens only: a lookahead page left mapped in every parked
        # slot was a page per finished request (8 MiB each on the H200: +9 GiB of peak over
        # ShareGPT's 1000 requests) to save the next turn one ~35 us map the mapper overlaps
        keep = self.layout.pages_for(len(s.tokens))
        if s.mapped > keep:
            self._unmap_runs(slot, range(keep, s.mapped))
            s.mapped = keep
        s.state, s.request_id = SlotState.PARKED, None
        s.pending = False
        s.num_tokens = len(s.tokens)
        self.tree.unpin(s.path)
        self.tree.clock += 1
        s.parked_at = self.tree.clock
        s.parked_private = s.mapped - s.tree_mapped
        self.parked_private_pages += s.parked_private
        self.parked[slot] = None

    def _drop(self, s: Slot) -> None:
        """Unmap everything of the slot (after the GPU is done with it), unlock its path."""
        if s.mapped:
            base = self.slot_page(s.index)
            mapped = [j for j in range(s.mapped) if self.table.is_mapped(base + j)]
            self._unmap_runs(s.index, mapped)
        if s.state == SlotState.SWAPPED:
            self.table.record(SwapDrop(s.index))
        if s.state == SlotState.PARKED:
            del self.parked[s.index]
            self.parked_private_pages -= s.parked_private
        self.tree.unlock(s.path, pinned=s.state != SlotState.PARKED)
        self._set_tail(s, None)
        s.state, s.request_id = SlotState.FREE, None
        s.mapped = s.tree_mapped = s.num_tokens = s.parked_private = 0
        s.path, s.tokens, s.swap_pages = [], [], []
        s.pending = False
        self.free_slots.append(s.index)

    def _private_pages(self, s: Slot) -> list[int]:
        out = []
        for j in range(s.mapped):
            page = self.table.page(self.slot_page(s.index, j))
            if page is not None and not (j < len(s.path) and s.path[j].page is page):
                out.append(j)
        return out

    def swap_out(self, slot: int) -> None:
        """Private pages -> host memory, then unmapped; shared pages stay mapped."""
        s = self._slot(slot, SlotState.ACTIVE)
        pages = self._private_pages(s)
        self.table.record(SwapOut(slot, tuple(self.slot_page(slot, j) for j in pages)))
        self._unmap_runs(slot, pages)  # the device copies before it unmaps
        s.swap_pages = pages
        s.pending = False
        s.state = SlotState.SWAPPED
        self._set_tail(s, None)  # its partial page is gone: no longer a copy source
        self.stats["swap_outs"] += 1
        self.stats["swap_bytes"] += len(pages) * self.page_size

    def swap_in(self, slot: int) -> bool:
        """Fresh pages at the same virtual addresses, data copied back. False: no room."""
        s = self._slot(slot, SlotState.SWAPPED)
        pages = s.swap_pages
        if not self._make_room(len(pages)):
            return False
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            self._map(slot, pages[i], pages[j - 1] + 1)
            i = j
        self.table.record(SwapIn(slot, tuple(self.slot_page(slot, j) for j in pages)))
        s.swap_pages = []
        s.state = SlotState.ACTIVE
        if self.enable_prefix_cache and s.tokens:
            self._set_tail(s, self.deepest(s))
        self.stats["swap_ins"] += 1
        return True
