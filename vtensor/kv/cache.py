"""KVCache: per-request slots of one virtual KV tensor, pages mapped on demand.

Every physical page is exactly one of (check_integrity proves it):
    free      on the pool's free list (refcount 0)
    owned     mapped in one slot, not in the radix tree (refcount 1)
    shared    in the radix tree and/or mapped in several slots (refcount = mappings + tree ref)
    cached    only in the radix tree (refcount 1): evictable LRU once no slot path locks it

Page j of slot s is always mapped at the same virtual address; sharing a prefix means mapping
the radix tree's physical page there (aliasing, no copy; prefix.py). Finished requests park
their slot, preempted ones may swap (parking.py); telemetry.py; shared state in slots.py.

Scheduling calls change the bookkeeping (pagetable.py: logical page ids, no memory) and record
their device work in a page plan (plan.py); `apply` hands a plan to this device's applier
(applier.py: the reservation, its pages, the mapper thread, copies).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from vtensor.kv.applier import PlanApplier
from vtensor.kv.budget import resolve_budget
from vtensor.kv.layout import KVConfigError, KVLayout, KVSpec
from vtensor.kv.manager import Allocation, SlotStateError
from vtensor.kv.pagetable import PageTable, logical_pool
from vtensor.kv.parking import Parking
from vtensor.kv.plan import Need
from vtensor.kv.prefix import PrefixSharing
from vtensor.kv.radix import RadixTree
from vtensor.kv.slots import Slot, SlotState
from vtensor.kv.telemetry import Telemetry
from vtensor.vmm import Backend, PhysPage

__all__ = ["KVCache", "Slot", "SlotState"]


class KVCache(PrefixSharing, Parking, Telemetry):
    def __init__(
        self,
        spec: KVSpec,
        *,
        backend: Backend,
        max_tokens: int,
        num_slots: int,
        budget_bytes: int | float | None,
        enable_prefix_cache: bool = True,
        lookahead_tokens: int | None = None,
        async_map: bool = True,
        idle_trim_seconds: float | None = 30.0,
        grow_batch: int = 16,
        host_budget_base: int | None = None,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.layout = layout = KVLayout(spec, num_slots, max_tokens, backend.page_size)
        self.page_size = ps = backend.page_size
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.kv_index_width = 1  # a slot is one block holding the whole sequence
        self.enable_prefix_cache = enable_prefix_cache
        # Default: one page ahead, so a decoding request finds its next page already mapped.
        tpp = max(1, -(-ps // layout.bytes_per_token))
        self.lookahead_tokens = tpp if lookahead_tokens is None else int(lookahead_tokens)
        if self.lookahead_tokens < 0:
            raise KVConfigError(f"lookahead_tokens={lookahead_tokens} must be >= 0")
        self.idle_trim_seconds = idle_trim_seconds
        self.budget_bytes = resolve_budget(budget_bytes, backend.device, host_budget_base)
        # device side first (reserving the address space is what fails for absurd sizes);
        # the scheduling side has ids and refcounts only
        self.applier = PlanApplier(
            backend, layout, self.budget_bytes, async_map=async_map, grow_batch=grow_batch
        )
        self.pool = logical_pool(ps, self.budget_bytes)
        self.table = PageTable(self.pool, layout.num_pages)
        # kv: [slots, tokens, layers, 2, kv_heads, head_dim] flattened; base never moves
        self._base = self.applier.vt.view(spec.dtype, (layout.total_bytes // layout.itemsize,))
        self.kv_views = layout.layer_views(self._base)
        self.copy_refs: list[PhysPage] = []
        self.taken_refs: list[PhysPage] = []
        self.tree = RadixTree(layout.chunk_end)
        self.slots = [Slot(i) for i in range(num_slots)]
        # FIFO: slot 0 first, then the slot freed longest ago (a freed slot's lazy unmaps then
        # have time to run before its addresses are mapped again)
        self.free_slots = deque(range(num_slots))
        self.parked: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.parked_private_pages = 0
        self._last_alloc = time.monotonic()
        self._closed = False
        self.series: list[dict] = []
        self.stats = dict.fromkeys(
            (
                "requests", "query_tokens", "prefix_hit_tokens", "prefix_hit_pages",
                "affinity_hits", "affinity_tokens", "map_ops", "unmap_ops", "copies",
                "copy_bytes", "swap_outs", "swap_ins", "swap_bytes", "evicted_pages",
                "evicted_slots", "ensure_failures", "trimmed_pages",
            ),
            0,
        )  # fmt: skip

    # ---- engine API ----
    def acquire(self, request_id: str, token_ids: Sequence[int]) -> Allocation | None:
        self._check_open()
        n = len(token_ids)
        if n == 0 or n > self.max_tokens:
            raise ValueError(f"prompt of {n} tokens: need 1..{self.max_tokens}")
        self.stats["requests"] += 1
        self.stats["query_tokens"] += n
        if self.enable_prefix_cache:
            alloc = self._take_parked(request_id, token_ids)
            if alloc is not None:
                return alloc
        if not self.free_slots:
            if not self.parked:
                return None
            self._drop(self.slots[next(iter(self.parked))])
            self.stats["evicted_slots"] += 1
        s = self.slots[self.free_slots.popleft()]
        s.state, s.request_id = SlotState.ACTIVE, request_id
        m = self._share_prefix(s, token_ids) if self.enable_prefix_cache else 0
        return Allocation(s.index, m)

    def token_capacity(self) -> int:
        # a slot starts page-aligned, so the budget's pages hold its first tokens_in_pages()
        budget = self.pool.budget_pages
        if budget is None:
            return self.max_tokens
        return min(self.max_tokens, self.layout.tokens_in_pages(budget))

    def ensure(self, slot: int, num_tokens: int) -> bool:
        # fast path (most decode steps): the pages through num_tokens + lookahead are mapped and
        # no pending lookahead work is needed yet; the general case below gives the same result
        s = self.slots[slot] if 0 <= slot < self.num_slots else None
        if (
            s is not None
            and s.state is SlotState.ACTIVE
            and num_tokens >= 0
            and num_tokens + self.lookahead_tokens <= self._fast_limit(s.mapped)
            and (not s.pending or num_tokens <= self._fast_limit(s.pending_first))
        ):
            if num_tokens > s.num_tokens:
                s.num_tokens = num_tokens
            return True
        s = self._slot(slot, SlotState.ACTIVE)
        if not 0 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens={num_tokens} outside [0, {self.max_tokens}]")
        lay = self.layout
        need = lay.pages_for(num_tokens)
        want = lay.pages_for(min(num_tokens + self.lookahead_tokens, self.max_tokens))
        if s.pending and need > s.pending_first:
            # the step reads pages mapped ahead: the device waits for those maps (if a map is
            # added below, FIFO makes it cover them anyway)
            first, last = self.slot_page(slot, s.pending_first), self.slot_page(slot, s.mapped)
            self.table.record(Need(first, last))
            s.pending = False
        if need > s.mapped:
            if not self._make_room(need - s.mapped):
                self.stats["ensure_failures"] += 1
                return False
            last = want if self._make_room(want - s.mapped) else need
            self._map(slot, s.mapped, last)
            s.mapped, s.pending = last, False
        elif want > s.mapped and self._make_room(want - s.mapped):
            # lookahead only: nobody waits for it unless a later ensure() needs these pages
            if not s.pending:
                s.pending_first = s.mapped
            self._map(slot, s.mapped, want, ahead=True)
            s.pending, s.mapped = True, want
        s.num_tokens = max(s.num_tokens, num_tokens)
        return True

    def _fast_limit(self, pages: int) -> int:
        """Tokens fully inside slot pages [0, pages) (the whole slot: any valid length)."""
        if pages >= self.layout.pages_per_slot:
            return self.max_tokens + self.lookahead_tokens
        return pages * self.page_size // self.layout.bytes_per_token

    def wait_ready(self) -> None:
        """Block until the map work of the applied plans that the next step needs is done
        (lookahead work may run on), queue their copies, then let the copy sources go."""
        self.applier.wait_ready()
        refs, self.taken_refs = self.taken_refs, []
        for p in refs:
            self.pool.decref(p)
        self.maybe_trim()

    def free(self, slot: int) -> None:
        s = self._slot(slot)
        if s.state != SlotState.FREE:
            self._drop(s)

    def store_targets(
        self, slots: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """(slot, position) of each new token: k_cache[slot, position]."""
        a: list[int] = []
        b: list[int] = []
        for slot, start, n in zip(slots, starts, counts, strict=True):
            a += [slot] * n
            b += range(start, start + n)
        return a, b

    def kv_index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.int32).view(-1, 1)

    # ---- integrity ----
    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless every page is exactly one of free / owned / shared /
        cached and all refcounts, locks and counters add up (see vtensor/kv/integrity.py)."""
        from vtensor.kv.integrity import check_cache  # it imports this module

        check_cache(self)

    # ---- teardown ----
    def close(self) -> None:
        """Free every slot and cached page, then give all memory back. Raises VmmError (from
        the pool) if any page leaked."""
        if self._closed:
            return
        for s in self.slots:
            if s.state != SlotState.FREE:
                self._drop(s)
        while self.tree.evictable:
            self.pool.decref(self.tree.evict_one())
        for p in self.copy_refs + self.taken_refs:
            self.pool.decref(p)
        self.copy_refs, self.taken_refs = [], []
        self.table.take()  # not applied: the device goes as a whole
        self.applier.close()
        self._closed = True
        self.kv_views = []
        self.pool.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SlotStateError("KVCache is closed")

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
