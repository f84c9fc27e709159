"""KVCache: per-request slots of one virtual KV tensor, pages mapped on demand.

Every physical page is exactly one of (check_integrity proves it):
    free      on the pool's free list (refcount 0)
    owned     mapped in one slot, not in the radix tree (refcount 1)
    shared    in the radix tree and/or mapped in several slots (refcount = mappings + tree ref)
    cached    only in the radix tree (refcount 1): evictable LRU once no slot path locks it

Page j of slot s is always mapped at the same virtual address; sharing a prefix means mapping
the radix tree's physical page there (aliasing, no copy). Shared pages are immutable: a slot
only aliases pages that lie entirely before the first token it will write, and the page holding
the last matched bytes is a private copy (<= 1 page of device copy).

    slot pages: | aliased (tree) | aliased | partial copy | fresh ... | lookahead |
                 <-- bytes of num_cached_tokens -->^first byte written
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from vtensor.kv.layout import KVConfigError, KVLayout, KVSpec
from vtensor.kv.radix import RadixNode, RadixTree
from vtensor.vmm import Backend, Mapper, PagePool, Ticket, VirtualTensor


class KVIntegrityError(RuntimeError):
    """check_integrity() found inconsistent page bookkeeping (always a bug)."""


class SlotStateError(RuntimeError):
    """An operation on a slot in the wrong state (e.g. ensure on a free slot)."""


@dataclass(slots=True)
class Allocation:
    slot: int
    num_cached_tokens: int  # prefix tokens whose KV is already in the slot


class SlotState(IntEnum):
    FREE = 0
    ACTIVE = 1
    PARKED = 2  # finished, pages kept for conversation affinity; evictable
    SWAPPED = 3  # private pages in host memory, shared pages still mapped


@dataclass(slots=True, eq=False)
class _Slot:
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


def resolve_budget(
    budget: int | float | None, backend: Backend, host_bytes: int | None = None
) -> int | None:
    """Bytes from a budget given in bytes (int) or as a fraction in (0, 1] (float) of free GPU
    memory (CUDA, torch.cuda.mem_get_info) or of `host_bytes` (host; default physical RAM).
    None: no cap on host, 90% of free memory on CUDA (never more than the device has)."""
    if budget is not None and not isinstance(budget, float):
        if int(budget) < 0:
            raise KVConfigError(f"budget={budget} must be >= 0")
        return int(budget)
    if budget is not None and not 0.0 < budget <= 1.0:
        raise KVConfigError(f"budget fraction {budget} must be in (0, 1]")
    if backend.name == "cuda":
        free, _ = torch.cuda.mem_get_info(backend.device)
        return int(free * (0.9 if budget is None else budget))
    if budget is None:
        return None
    if host_bytes is None:
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host_bytes * budget)


class KVCache:
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
        self.enable_prefix_cache = enable_prefix_cache
        # Default: one page ahead, so a decoding request finds its next page already mapped.
        tpp = max(1, -(-ps // layout.bytes_per_token))
        self.lookahead_tokens = tpp if lookahead_tokens is None else int(lookahead_tokens)
        if self.lookahead_tokens < 0:
            raise KVConfigError(f"lookahead_tokens={lookahead_tokens} must be >= 0")
        self.idle_trim_seconds = idle_trim_seconds
        self.budget_bytes = resolve_budget(budget_bytes, backend, host_budget_base)
        self.pool = PagePool(backend, self.budget_bytes, grow_batch=grow_batch)
        self.mapper: Mapper | None = Mapper() if async_map else None
        try:
            self.vt = VirtualTensor(self.pool, layout.total_bytes, self.mapper)
        except Exception as e:
            if self.mapper is not None:
                self.mapper.close()
            self.pool.close()
            raise KVConfigError(
                f"cannot reserve {layout.total_bytes / 2**40:.2f} TiB of virtual space for "
                f"{num_slots} slots x {max_tokens} tokens x {layout.bytes_per_token} B: {e}"
            ) from e
        n_el = layout.total_bytes // layout.itemsize
        # kv: [slots, tokens, layers, 2, kv_heads, head_dim] flattened; base never moves
        self._base = self.vt.view(spec.dtype, (n_el,))
        self._bytes = self.vt.view(torch.uint8, (layout.total_bytes,))
        self.kv_views = layout.layer_views(self._base)
        # 1 page of address space to read cached-only tree pages; made now, before any map
        # work is queued (CUDA builds a tensor over a reservation with a temporary mapping)
        self._scratch = VirtualTensor(self.pool, ps, self.mapper)
        self.tree = RadixTree(layout.chunk_end)
        self._slots = [_Slot(i) for i in range(num_slots)]
        # pop() takes the end: slot 0 first, then the slot freed longest ago (a freed slot's
        # lazy unmaps then have time to run before its addresses are mapped again)
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._parked: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._parked_private = 0
        self._required: list[Ticket] = []  # map work the next step needs
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

    # ---- small helpers ----
    def _sp(self, slot: int, page: int = 0) -> int:
        return self.layout.slot_page(slot, page)

    def _avail(self) -> int:
        b = self.pool.budget_pages
        return (1 << 62) if b is None else b - self.pool.num_in_use()

    def _slot(self, slot: int, *states: SlotState) -> _Slot:
        if not 0 <= slot < self.num_slots:
            raise SlotStateError(f"slot {slot} out of range [0, {self.num_slots})")
        s = self._slots[slot]
        if states and s.state not in states:
            names = "/".join(st.name for st in states)
            raise SlotStateError(f"slot {slot} is {s.state.name}, expected {names}")
        return s

    def _map(self, slot: int, first: int, last: int) -> Ticket:
        self._last_alloc = time.monotonic()
        self.stats["map_ops"] += last - first
        return self.vt.map(self._sp(slot, first), self._sp(slot, last))

    def _unmap_runs(self, slot: int, pages: Sequence[int], after: object | None) -> None:
        """Unmap the given slot pages (sorted), one call per consecutive run."""
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            self.vt.unmap(self._sp(slot, pages[i]), self._sp(slot, pages[j - 1] + 1), after=after)
            self.stats["unmap_ops"] += j - i
            i = j

    def _set_tail(self, s: _Slot, node: RadixNode | None) -> None:
        if s.tail is not None:
            s.tail.tails.discard(s.index)
        s.tail = node
        if node is not None:
            node.tails.add(s.index)

    def _deepest(self, s: _Slot) -> RadixNode:
        return s.path[-1] if s.path else self.tree.root

    # ---- eviction ----
    def _evict_one(self) -> bool:
        """Evict the least recently used of: an unlocked cached tree leaf, a parked slot."""
        t_node = self.tree.oldest_use()
        t_park = self._slots[next(iter(self._parked))].parked_at if self._parked else None
        if t_node is None and t_park is None:
            return False
        if t_park is None or (t_node is not None and t_node <= t_park):
            page = self.tree.evict_one()
            self.pool.decref(page)  # the tree's reference: the page goes back to the pool
            self.stats["evicted_pages"] += 1
        else:
            self._drop(self._slots[next(iter(self._parked))])
            self.stats["evicted_slots"] += 1
        return True

    def _make_room(self, n: int) -> bool:
        while self._avail() < n:
            if not self._evict_one():
                return False
        return True

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
        if not self._free_slots:
            if not self._parked:
                return None
            self._drop(self._slots[next(iter(self._parked))])
            self.stats["evicted_slots"] += 1
        s = self._slots[self._free_slots.pop()]
        s.state, s.request_id = SlotState.ACTIVE, request_id
        m = self._share_prefix(s, token_ids) if self.enable_prefix_cache else 0
        return Allocation(s.index, m)

    def _take_parked(self, request_id: str, token_ids: Sequence[int]) -> Allocation | None:
        """Conversation affinity: a parked slot whose valid tokens prefix token_ids."""
        if not self._parked:
            return None
        n, lay = len(token_ids), self.layout
        best: _Slot | None = None
        for node in [self.tree.root, *self.tree.match(token_ids)]:
            start = 0 if node.depth == 0 else lay.chunk_end(node.depth - 1)
            for sid in node.tails:
                s = self._slots[sid]
                v = len(s.tokens)
                if s.state != SlotState.PARKED or v > n or (best and v <= len(best.tokens)):
                    continue
                m = min(v, n - 1)
                # the first byte written must lie beyond every page of the slot's tree path
                if lay.token_byte(m) < len(s.path) * self.page_size:
                    continue
                if list(token_ids[start:v]) == s.tokens[start:]:
                    best = s
        if best is None:
            return None
        s = best
        m = min(len(s.tokens), n - 1)
        del self._parked[s.index]
        self._parked_private -= s.parked_private
        s.parked_private = 0
        self.tree.pin(s.path)
        s.state, s.request_id = SlotState.ACTIVE, request_id
        del s.tokens[m:]
        s.num_tokens = m
        self.stats["affinity_hits"] += 1
        self.stats["affinity_tokens"] += m
        self.stats["prefix_hit_tokens"] += m
        return Allocation(s.index, m)

    def _share_prefix(self, s: _Slot, token_ids: Sequence[int]) -> int:
        """Alias the tree's full pages, copy the partial page; returns num_cached_tokens."""
        lay, ps, n = self.layout, self.page_size, len(token_ids)
        path = self.tree.match(token_ids)
        k = len(path)
        node_k = path[-1] if path else self.tree.root
        # Lock the matched path, then make room for the partial page *before* choosing a copy
        # source, so that no eviction can take the source (a parked slot, a cached page) away.
        self.tree.lock(path)
        room = self._make_room(1)
        t0 = 0 if k == 0 else lay.chunk_end(k - 1)  # first token after the matched chunks
        best_m, src = lay.tokens_in_pages(k), None  # src: bytes of page k beyond the path
        cap = lay.tokens_in_pages(k + 1)
        if t0 < n and room:
            for child in self.tree.partial_children(node_k, token_ids[t0]):
                m = min(t0 + _lcp(child.key, token_ids, t0), cap)
                if m > best_m:
                    best_m, src = m, child
            for sid in node_k.tails:
                o = self._slots[sid]
                if o.state not in (SlotState.ACTIVE, SlotState.PARKED) or len(o.tokens) <= t0:
                    continue
                m = min(t0 + _lcp(o.tokens[t0:], token_ids, t0), cap)
                if m > best_m:
                    best_m, src = m, o
        m = min(best_m, n - 1)
        a = lay.full_pages(m)  # pages entirely inside the bytes of tokens [0, m): aliased
        partial = lay.token_byte(m) - a * ps
        if partial and not room:
            m = a = partial = 0  # rare (pool exhausted): recompute everything
        if partial:
            source = path[a] if a < k else src
            if isinstance(source, RadixNode) and a == k:
                self.tree.lock([source])  # its parent path is locked: the invariant holds
                self._copy_partial(s.index, a, partial, source)
                self.tree.unlock([source])
            else:
                self._copy_partial(s.index, a, partial, source)
        self.tree.unlock(path[a:])
        if m == 0:
            return 0
        if a:
            self.stats["map_ops"] += a
            pages = [node.page for node in path[:a]]
            self._required.append(self.vt.map_pages(self._sp(s.index), pages))
        s.path = path[:a]
        s.tree_mapped = a
        s.mapped = a + (1 if partial else 0)
        s.tokens = list(token_ids[:m])
        s.num_tokens = m
        self._set_tail(s, self._deepest(s))
        self.stats["prefix_hit_tokens"] += m
        self.stats["prefix_hit_pages"] += a
        return m

    def _copy_partial(self, slot: int, page: int, nbytes: int, source: object) -> None:
        """Fresh page `page` of `slot` gets the first nbytes of the same page of `source` (a
        tree node, read through the scratch mapping, or another slot's private page)."""
        ps = self.page_size
        self._map(slot, page, page + 1).wait()
        dst = self._bytes[self._sp(slot, page) * ps :][:nbytes]
        if isinstance(source, _Slot):
            off = self._sp(source.index, page) * ps
            dst.copy_(self._bytes[off : off + nbytes], non_blocking=True)
        else:
            assert isinstance(source, RadixNode) and source.page is not None
            self._scratch.map_pages(0, [source.page]).wait()
            self.stats["map_ops"] += 1
            dst.copy_(self._scratch.view(torch.uint8, (nbytes,)), non_blocking=True)
            self._scratch.unmap(0, 1, after=self.backend.record_event())
            self.stats["unmap_ops"] += 1
        self.stats["copies"] += 1
        self.stats["copy_bytes"] += nbytes

    def ensure(self, slot: int, num_tokens: int) -> bool:
        # fast path (most decode steps): the pages through num_tokens + lookahead are mapped and
        # no pending lookahead work is needed yet; the general case below gives the same result
        s = self._slots[slot] if 0 <= slot < self.num_slots else None
        if (
            s is not None
            and s.state is SlotState.ACTIVE
            and num_tokens >= 0
            and num_tokens + self.lookahead_tokens <= self._fast_limit(s.mapped)
            and (s.pending is None or num_tokens <= self._fast_limit(s.pending_first))
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
        if s.pending is not None and need > s.pending_first:
            if not s.pending.done():  # usually done long ago: that is what lookahead is for
                self._required.append(s.pending)  # FIFO: covers earlier lookahead work too
            s.pending = None
        if need > s.mapped:
            if not self._make_room(need - s.mapped):
                self.stats["ensure_failures"] += 1
                return False
            last = want if self._make_room(want - s.mapped) else need
            self._required.append(self._map(slot, s.mapped, last))
            s.mapped, s.pending = last, None  # FIFO: this ticket covers earlier lookahead work
        elif want > s.mapped and self._make_room(want - s.mapped):
            # lookahead only: nobody waits for it unless a later ensure() needs these pages
            t = self._map(slot, s.mapped, want)
            if s.pending is None:
                s.pending_first = s.mapped
            s.pending, s.mapped = t, want
        s.num_tokens = max(s.num_tokens, num_tokens)
        return True

    def _fast_limit(self, pages: int) -> int:
        """Tokens fully inside slot pages [0, pages) (the whole slot: any valid length)."""
        if pages >= self.layout.pages_per_slot:
            return self.max_tokens + self.lookahead_tokens
        return pages * self.page_size // self.layout.bytes_per_token

    def wait_ready(self) -> None:
        """Block until the map work the next step needs is done (lookahead work may run on)."""
        required, self._required = self._required, []
        for t in required:
            t.wait()
        self.maybe_trim()

    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> None:
        s = self._slot(slot, SlotState.ACTIVE)
        n, lay = len(token_ids), self.layout
        if n > self.max_tokens or lay.pages_for(n) > s.mapped:
            raise ValueError(f"slot {slot}: {n} tokens but only {s.mapped} pages mapped")
        v = len(s.tokens)
        if n < v or list(token_ids[:v]) != s.tokens:
            raise ValueError(f"slot {slot}: token_ids do not extend the slot's valid tokens")
        if self.enable_prefix_cache:
            node = self._deepest(s)
            for j in range(len(s.path), lay.full_pages(n)):
                key = self.tree.chunk(token_ids, j)
                child = node.children.get(key)
                if child is None:
                    page = self.vt.page(self._sp(slot, j))
                    self.pool.incref(page)  # the tree's reference
                    child = self.tree.insert(node, key, page)
                    s.tree_mapped += 1
                else:
                    # same tokens computed twice (both requests missed the cache): keep our
                    # private duplicate, share the path so later pages still get published
                    self.tree.lock([child])
                s.path.append(child)
                node = child
            self._set_tail(s, node)
        s.tokens = list(token_ids)
        s.num_tokens = max(s.num_tokens, n)

    def release(self, slot: int, token_ids: Sequence[int], park: bool = True) -> None:
        s = self._slot(slot, SlotState.ACTIVE)
        if len(token_ids):
            self.cache_prefix(slot, token_ids)
        if not (park and self.enable_prefix_cache and s.tokens):
            self._drop(s)
            return
        # keep pages through the valid tokens + lookahead: the next turn continues from there
        keep = self.layout.pages_for(min(len(s.tokens) + self.lookahead_tokens, self.max_tokens))
        if s.mapped > keep:
            self._unmap_runs(slot, range(keep, s.mapped), self.backend.record_event())
            s.mapped = keep
        s.state, s.request_id = SlotState.PARKED, None
        s.pending = None
        s.num_tokens = len(s.tokens)
        self.tree.unpin(s.path)
        self.tree.clock += 1
        s.parked_at = self.tree.clock
        s.parked_private = s.mapped - s.tree_mapped
        self._parked_private += s.parked_private
        self._parked[slot] = None
        self.maybe_trim()

    def free(self, slot: int) -> None:
        s = self._slot(slot)
        if s.state != SlotState.FREE:
            self._drop(s)

    def _drop(self, s: _Slot) -> None:
        """Unmap everything of the slot (after the GPU is done with it), unlock its path."""
        if s.mapped:
            mapped = [j for j in range(s.mapped) if self.vt.is_mapped(self._sp(s.index, j))]
            self._unmap_runs(s.index, mapped, self.backend.record_event())
        if s.state == SlotState.PARKED:
            del self._parked[s.index]
            self._parked_private -= s.parked_private
        self.tree.unlock(s.path, pinned=s.state != SlotState.PARKED)
        self._set_tail(s, None)
        s.state, s.request_id = SlotState.FREE, None
        s.mapped = s.tree_mapped = s.num_tokens = s.parked_private = 0
        s.path, s.tokens, s.swap_pages = [], [], []
        s.pending, s.swap_buf = None, None
        self._free_slots.insert(0, s.index)

    def _private_pages(self, s: _Slot) -> list[int]:
        out = []
        for j in range(s.mapped):
            page = self.vt.page(self._sp(s.index, j))
            if page is not None and not (j < len(s.path) and s.path[j].page is page):
                out.append(j)
        return out

    def swap_out(self, slot: int) -> None:
        """Private pages -> (pinned) host memory, then unmapped; shared pages stay mapped."""
        s = self._slot(slot, SlotState.ACTIVE)
        self.wait_ready()  # the pages must be mapped (and written) before we read them
        if s.pending is not None:  # lookahead pages too: they are copied like the others
            s.pending.wait()
            s.pending = None
        ps = self.page_size
        pages = self._private_pages(s)
        pin = self.backend.name == "cuda" and torch.cuda.is_available()
        buf = torch.empty(len(pages) * ps, dtype=torch.uint8, pin_memory=pin)
        for i, j in enumerate(pages):
            off = self._sp(slot, j) * ps
            buf[i * ps : (i + 1) * ps].copy_(self._bytes[off : off + ps], non_blocking=True)
        self._unmap_runs(slot, pages, self.backend.record_event())  # after the copies
        s.swap_pages, s.swap_buf = pages, buf
        s.pending = None
        s.state = SlotState.SWAPPED
        self._set_tail(s, None)  # its partial page is gone: no longer a copy source
        self.stats["swap_outs"] += 1
        self.stats["swap_bytes"] += len(pages) * ps

    def swap_in(self, slot: int) -> bool:
        """Fresh pages at the same virtual addresses, data copied back. False: no room."""
        s = self._slot(slot, SlotState.SWAPPED)
        pages, buf, ps = s.swap_pages, s.swap_buf, self.page_size
        if not self._make_room(len(pages)):
            return False
        tickets = []
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j] == pages[j - 1] + 1:
                j += 1
            tickets.append(self._map(slot, pages[i], pages[j - 1] + 1))
            i = j
        for t in tickets:
            t.wait()
        assert buf is not None
        for i, j in enumerate(pages):
            off = self._sp(slot, j) * ps
            self._bytes[off : off + ps].copy_(buf[i * ps : (i + 1) * ps], non_blocking=True)
        s.swap_pages, s.swap_buf = [], None
        s.state = SlotState.ACTIVE
        if self.enable_prefix_cache and s.tokens:
            self._set_tail(s, self._deepest(s))
        self.stats["swap_ins"] += 1
        return True

    def num_free_pages(self) -> int:
        """Pages obtainable now: free within the budget + evictable (cached, parked)."""
        return min(self._avail() + self.tree.num_unpinned + self._parked_private, 1 << 62)

    # ---- elasticity ----
    def maybe_trim(self, now: float | None = None) -> int:
        """Give idle free pages back to the driver once nothing was allocated for a while."""
        if self.idle_trim_seconds is None or self._closed or not self.pool.num_free():
            return 0
        now = time.monotonic() if now is None else now
        if now - self._last_alloc < self.idle_trim_seconds:
            return 0
        return self.trim()

    def trim(self) -> int:
        n = self.pool.trim(0)
        self.stats["trimmed_pages"] += n
        return n

    # ---- telemetry ----
    def snapshot(self) -> dict:
        """Telemetry. pages_*: created (ever), live (exist now: in use + idle in the pool),
        in_use (mapped or cached), free (idle in the pool, trimmed after idle_trim_seconds),
        cached (only the radix tree holds them), in_tree / shared (tree pages a slot uses),
        evictable (cached + what parked slots would give back). bytes_physical = live pages,
        bytes_mapped = pages in use, bytes_live_tokens = what active requests' tokens need
        (mapped - live = fragmentation + prefix cache + parked). Counters: see `stats`."""
        ps, bpt = self.page_size, self.layout.bytes_per_token
        pst = self.pool.stats()
        live = [s for s in self._slots if s.state in (SlotState.ACTIVE, SlotState.SWAPPED)]
        live_tokens = sum(s.num_tokens for s in live)
        nodes = self.tree.num_nodes
        cached_only = len(self.tree.evictable)
        in_use = pst["in_use"]
        snap = {
            "page_size": ps,
            "bytes_per_token": bpt,
            "pages_created": pst["created"],
            "pages_live": pst["live"],
            "pages_in_use": in_use,
            "pages_free": pst["free"],
            "pages_cached": cached_only,
            "pages_in_tree": nodes,
            "pages_shared": nodes - cached_only,
            "pages_evictable": self.tree.num_unpinned + self._parked_private,
            "budget_pages": pst["budget_pages"],
            "bytes_physical": pst["live"] * ps,
            "bytes_mapped": in_use * ps,
            "bytes_live_tokens": live_tokens * bpt,
            "slots_active": sum(s.state == SlotState.ACTIVE for s in self._slots),
            "slots_parked": len(self._parked),
            "slots_swapped": sum(s.state == SlotState.SWAPPED for s in self._slots),
            "mapper_wait_s": self.mapper.wait_seconds if self.mapper is not None else 0.0,
            **self.stats,
        }
        q = self.stats["query_tokens"]
        snap["prefix_hit_rate"] = self.stats["prefix_hit_tokens"] / q if q else 0.0
        return snap

    def record(self, t: float | None = None) -> dict:
        """Append a snapshot (with time t) to `series`, for plots."""
        snap = self.snapshot()
        snap["t"] = time.monotonic() if t is None else t
        self.series.append(snap)
        return snap

    # ---- integrity ----
    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless every page is exactly one of free / owned / shared /
        cached and all refcounts, locks and counters add up (see vtensor/kv/integrity.py)."""
        from vtensor.kv.integrity import check_cache

        check_cache(self)

    # ---- teardown ----
    def close(self) -> None:
        """Free every slot and cached page, then give all memory back. Raises VmmError (from
        the pool) if any page leaked."""
        if self._closed:
            return
        for s in self._slots:
            if s.state != SlotState.FREE:
                self._drop(s)
        while self.tree.evictable:
            self.pool.decref(self.tree.evict_one())
        self._required = []
        self._scratch.close()
        self.vt.close()
        if self.mapper is not None:
            self.mapper.close()
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


def _lcp(a: Sequence[int], b: Sequence[int], b_start: int) -> int:
    """Length of the common prefix of a and b[b_start:]."""
    n = min(len(a), len(b) - b_start)
    i = 0
    while i < n and a[i] == b[b_start + i]:
        i += 1
    return i
