"""Prefix sharing for KVCache: alias the radix tree's full pages, copy the partial page, and
conversation affinity (a parked slot whose tokens prefix a new request's is reused as is).

Shared pages are immutable: a slot only aliases pages that lie entirely before the first token
it will write, and the page holding the last matched bytes is a private copy (<= 1 page of
device copy).

    slot pages: | aliased (tree) | aliased | partial copy | fresh ... | lookahead |
                 <-- bytes of num_cached_tokens -->^first byte written
"""

from __future__ import annotations

from collections.abc import Sequence

from vtensor.kv.manager import Allocation
from vtensor.kv.plan import Copy
from vtensor.kv.radix import RadixNode
from vtensor.kv.slots import KVCacheBase, Slot, SlotState


class PrefixSharing(KVCacheBase):
    def _take_parked(self, request_id: str, token_ids: Sequence[int]) -> Allocation | None:
        """Conversation affinity: a parked slot whose valid tokens prefix token_ids."""
        if not self.parked:
            return None
        n, lay = len(token_ids), self.layout
        best: Slot | None = None
        for node in [self.tree.root, *self.tree.match(token_ids)]:
            if not node.tails:
                continue
            start = 0 if node.depth == 0 else self.tree.chunk_end(node.depth - 1)
            for sid in node.tails:
                s = self.slots[sid]
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
        del self.parked[s.index]
        self.parked_private_pages -= s.parked_private
        s.parked_private = 0
        self.tree.pin(s.path)
        s.state, s.request_id = SlotState.ACTIVE, request_id
        del s.tokens[m:]
        s.num_tokens = m
        self.stats["affinity_hits"] += 1
        self.stats["affinity_tokens"] += m
        self.stats["prefix_hit_tokens"] += m
        return Allocation(s.index, m)

    def _share_prefix(self, s: Slot, token_ids: Sequence[int]) -> int:
        """Alias the tree's full pages, copy the partial page; returns num_cached_tokens."""
        lay, ps, n = self.layout, self.page_size, len(token_ids)
        path = self.tree.match(token_ids)
        k = len(path)
        node_k = path[-1] if path else self.tree.root
        # Lock the matched path, then make room for the partial page *before* choosing a copy
        # source, so that no eviction can take the source (a parked slot, a cached page) away.
        self.tree.lock(path)
        room = self._make_room(1)
        t0 = 0 if k == 0 else self.tree.chunk_end(k - 1)  # first token after the matched chunks
        best_m, src = lay.tokens_in_pages(k), None  # src: bytes of page k beyond the path
        cap = lay.tokens_in_pages(k + 1)
        if t0 < n and room:
            for child in self.tree.partial_children(node_k, token_ids[t0]):
                m = min(t0 + _lcp(child.key, token_ids, t0), cap)
                if m > best_m:
                    best_m, src = m, child
            for sid in node_k.tails:
                o = self.slots[sid]
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
            self.table.map_pages(self.slot_page(s.index), [node.page for node in path[:a]])
        s.path = path[:a]
        s.tree_mapped = a
        s.mapped = a + (1 if partial else 0)
        s.tokens = list(token_ids[:m])
        s.num_tokens = m
        self._set_tail(s, self.deepest(s))
        self.stats["prefix_hit_tokens"] += m
        self.stats["prefix_hit_pages"] += a
        return m

    def _copy_partial(self, slot: int, page: int, nbytes: int, source: object) -> None:
        """Fresh page `page` of `slot` gets the first nbytes of the same page of `source` (a
        tree node, or another slot's page). The source is held (an eviction cannot free it)
        until the copy ran: wait_ready() after the plan was taken and applied."""
        if isinstance(source, Slot):
            src = self.table.page(self.slot_page(source.index, page))
        else:
            assert isinstance(source, RadixNode)
            src = source.page
        assert src is not None
        self.pool.incref(src)
        self.copy_refs.append(src)
        self._map(slot, page, page + 1)
        self.table.record(Copy(src.index, self.slot_page(slot, page), nbytes))
        self.stats["map_ops"] += 1  # the device maps the source into a scratch page...
        self.stats["unmap_ops"] += 1  # ...and unmaps it behind the copy
        self.stats["copies"] += 1
        self.stats["copy_bytes"] += nbytes

    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> None:
        s = self._slot(slot, SlotState.ACTIVE)
        n, lay = len(token_ids), self.layout
        if n > self.max_tokens or lay.pages_for(n) > s.mapped:
            raise ValueError(f"slot {slot}: {n} tokens but only {s.mapped} pages mapped")
        v = len(s.tokens)
        if n < v or list(token_ids[:v]) != s.tokens:
            raise ValueError(f"slot {slot}: token_ids do not extend the slot's valid tokens")
        if self.enable_prefix_cache:
            node = self.deepest(s)
            for j in range(len(s.path), lay.full_pages(n)):
                key = self.tree.chunk(token_ids, j)
                child = node.children.get(key)
                if child is None:
                    page = self.table.page(self.slot_page(slot, j))
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


def _lcp(a: Sequence[int], b: Sequence[int], b_start: int) -> int:
    """Length of the common prefix of a and b[b_start:]."""
    n = min(len(a), len(b) - b_start)
    i = 0
    while i < n and a[i] == b[b_start + i]:
        i += 1
    return i
