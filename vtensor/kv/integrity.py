"""check_integrity() for KVCache: recomputes every count from scratch and compares.

Every physical page must be exactly one of free (pool) / owned (one slot, refcount 1) / shared
(tree and/or several slots) / cached (tree only); refcount == slot mappings + tree reference;
lock_ref / pin_ref == slots whose path holds the node; once every plan was applied, the
device maps exactly the page table's ids; the evictable dict keeps LRU order with
descendants first; live-request waste <= one page + lookahead. O(pages): tests call it after
every step, the engine when it goes idle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vtensor.kv.cache import SlotState
from vtensor.kv.manager import KVIntegrityError

if TYPE_CHECKING:
    from vtensor.kv.cache import KVCache


def check_cache(cache: KVCache) -> None:
    def fail(msg: str) -> None:
        raise KVIntegrityError(msg)

    lay = cache.layout
    maps: dict[int, int] = {}  # id(page) -> mappings by slots
    pages: dict[int, object] = {}
    for s in cache.slots:
        base = cache.slot_page(s.index)
        for j in range(lay.pages_per_slot):
            p = cache.table.page(base + j)
            if p is None:
                continue
            if j >= s.mapped or s.state == SlotState.FREE:
                fail(f"slot {s.index} ({s.state.name}) maps page {j} beyond mapped={s.mapped}")
            maps[id(p)] = maps.get(id(p), 0) + 1
            pages[id(p)] = p
        if s.state == SlotState.FREE:
            if s.path or s.tokens or s.tail is not None:
                fail(f"free slot {s.index} keeps state")
            continue
        # live-request waste: at most one partial page + lookahead beyond the need
        need = lay.pages_for(max(s.num_tokens, len(s.tokens)))
        slack = lay.pages_for(cache.lookahead_tokens) + 1
        if s.mapped > need + slack:
            fail(f"slot {s.index}: {s.mapped} pages mapped for {need} needed")
        if s.state == SlotState.PARKED and s.mapped > lay.pages_for(len(s.tokens)):
            fail(f"parked slot {s.index} keeps {s.mapped} pages for {len(s.tokens)} tokens")
        if len(s.path) > lay.full_pages(len(s.tokens)):
            fail(f"slot {s.index}: path of {len(s.path)} pages beyond its valid tokens")
        tm = 0
        for j, node in enumerate(s.path):
            if node.depth != j + 1 or (j and node.parent is not s.path[j - 1]):
                fail(f"slot {s.index}: broken path at page {j}")
            if node.key != cache.tree.chunk(s.tokens, j):
                fail(f"slot {s.index}: path page {j} tokens differ from the slot's")
            p = cache.table.page(base + j)
            if p is node.page:
                tm += 1
            elif p is None and s.state != SlotState.SWAPPED:
                fail(f"slot {s.index}: path page {j} not mapped")
        if tm != s.tree_mapped:
            fail(f"slot {s.index}: tree_mapped {s.tree_mapped} != {tm}")
        if s.state == SlotState.SWAPPED:
            if any(cache.table.is_mapped(base + j) for j in s.swap_pages):
                fail(f"swapped slot {s.index} still maps a swapped-out page")
        elif cache.enable_prefix_cache and s.tokens and s.tail is not cache.deepest(s):
            fail(f"slot {s.index}: tail registration is stale")
    tree_nodes = cache.tree.nodes()
    locks: dict[int, int] = {}
    pins: dict[int, int] = {}
    for s in cache.slots:
        for node in s.path:
            locks[id(node)] = locks.get(id(node), 0) + 1
            if s.state != SlotState.PARKED:
                pins[id(node)] = pins.get(id(node), 0) + 1
    tree_refs: dict[int, int] = {}
    unpinned = 0
    for node in tree_nodes:
        p = node.page
        if p is None:
            fail("tree node without a page")
        tree_refs[id(p)] = tree_refs.get(id(p), 0) + 1
        pages[id(p)] = p
        if node.lock_ref != locks.get(id(node), 0) or node.pin_ref != pins.get(id(node), 0):
            fail(f"node depth {node.depth}: lock/pin refs {node.lock_ref}/{node.pin_ref}")
        if (node.lock_ref == 0) != (node in cache.tree.evictable):
            fail(f"node depth {node.depth}: evictable set out of sync")
        unpinned += node.pin_ref == 0
        for sid in node.tails:
            if cache.slots[sid].tail is not node:
                fail(f"node depth {node.depth}: stale tail slot {sid}")
    if unpinned != cache.tree.num_unpinned or len(tree_nodes) != cache.tree.num_nodes:
        fail("tree counters out of sync")
    if len(cache.tree.evictable) != sum(n.lock_ref == 0 for n in tree_nodes):
        fail("evictable set holds nodes no longer in the tree")
    # LRU order: a node always sits behind all of its evictable descendants
    pos = {id(n): i for i, n in enumerate(cache.tree.evictable)}
    for node in cache.tree.evictable:
        parent = node.parent
        if parent is not None and id(parent) in pos and pos[id(parent)] < pos[id(node)]:
            fail("evictable order puts a parent before its child")
    holds: dict[int, int] = {}  # copy sources held until their copy ran
    for p in cache.copy_refs + cache.taken_refs:
        holds[id(p)] = holds.get(id(p), 0) + 1
        pages[id(p)] = p
    for key, p in pages.items():
        m, t, h = maps.get(key, 0), tree_refs.get(key, 0), holds.get(key, 0)
        if t > 1:
            fail(f"page {p.index} cached twice in the tree")
        if p.refcount != m + t + h:
            fail(f"page {p.index}: refcount {p.refcount} != {m} mappings + {t} tree refs + {h}")
    if cache.table.num_mapped() != sum(maps.values()):
        fail("page table count out of sync")
    if not cache.table.plan and not cache.taken_refs:
        # everything recorded was applied and its copies ran: the device holds what the
        # accounting says, id for id
        if cache.applier.num_scratch_mapped():
            fail("scratch page still mapped")
        if cache.applier.ids() != cache.table.ids():
            fail("the device's pages differ from the page table")
    if cache.pool.num_in_use() != len(pages):
        fail(f"pool has {cache.pool.num_in_use()} pages in use, cache accounts {len(pages)}")
    parked_private = sum(s.parked_private for s in cache.slots)
    if parked_private != cache.parked_private_pages:
        fail("parked private page counter out of sync")
    if sorted(cache.parked) != sorted(s.index for s in cache.slots if s.state == SlotState.PARKED):
        fail("parked set out of sync")
    free = sorted(s.index for s in cache.slots if s.state == SlotState.FREE)
    if sorted(cache.free_slots) != free:
        fail("free slot list out of sync")
    cache.pool.check_integrity()
    cache.applier.pool.check_integrity()
