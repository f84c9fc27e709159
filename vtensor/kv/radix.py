"""Radix tree over token ids at page granularity (the prefix cache of KVCache).

Node j on a path stands for page j of a slot: its key is the chunk of tokens
`[chunk_end(j-1), chunk_end(j))`, i.e. every token with a byte in page j that is not already in
an earlier chunk. Page j's bytes depend (causally) on tokens [0, chunk_end(j)), so a request may
alias the node's physical page iff its tokens match the whole path down to that node; chunks
are compared token by token (dict lookup by tuple key), never by hash alone.

Locks (SGLang style): `lock_ref` counts slots whose path passes through the node (active,
swapped or parked); `pin_ref` counts only the non-parked ones. A slot always locks a whole path
from the root, so lock_ref(parent) >= lock_ref(child). Nodes with lock_ref 0 sit in an
OrderedDict in LRU order; a path is unlocked deepest-first, so a node always sits *behind* its
descendants and the front of the dict is always a leaf: eviction is O(1) per page, no scan.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtensor.vmm.pool import PhysPage


@dataclass(slots=True, eq=False)
class RadixNode:
    key: tuple[int, ...]  # tokens of this page's chunk (empty at the root)
    page: PhysPage | None  # the cached physical page (None at the root); the tree holds 1 ref
    parent: RadixNode | None
    depth: int  # root 0; node of slot page j has depth j + 1
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    by_first: dict[int, list[RadixNode]] = field(default_factory=dict)  # for partial matches
    lock_ref: int = 0  # slots whose path includes this node
    pin_ref: int = 0  # of those, the non-parked ones (pinned: not evictable even indirectly)
    last_use: int = 0  # logical clock of the last unlock (LRU order)
    tails: set[int] = field(default_factory=set)  # slots whose deepest path node this is


class RadixTree:
    def __init__(self, chunk_end: Callable[[int], int]) -> None:
        # page j -> end token of its chunk; memoized: a 2K-token prefix hit asks for 128 of them
        # twice per request (bench/results/2026-11-30d: ~30% of admitting one on the host)
        self.chunk_end = functools.cache(chunk_end)
        self.root = RadixNode(key=(), page=None, parent=None, depth=0)
        self.root.lock_ref = self.root.pin_ref = 1 << 30  # never evicted
        self.evictable: OrderedDict[RadixNode, None] = OrderedDict()  # lock_ref == 0, LRU first
        self.num_nodes = 0
        self.num_unpinned = 0  # nodes with pin_ref == 0: evictable once parked slots go
        self.clock = 0

    def chunk(self, tokens: Sequence[int], page: int) -> tuple[int, ...]:
        start = 0 if page == 0 else self.chunk_end(page - 1)
        return tuple(tokens[start : self.chunk_end(page)])

    # ---- lookup ----
    def match(self, tokens: Sequence[int], max_pages: int | None = None) -> list[RadixNode]:
        """Longest path of full chunks of `tokens` (one node per page), at most max_pages."""
        path: list[RadixNode] = []
        node = self.root
        n = len(tokens)
        end_of = self.chunk_end
        j = start = 0
        while max_pages is None or j < max_pages:
            end = end_of(j)
            if end > n:
                break
            child = node.children.get(tuple(tokens[start:end]))
            if child is None:
                break
            path.append(child)
            node, start = child, end
            j += 1
        return path

    def partial_children(self, node: RadixNode, first_token: int) -> list[RadixNode]:
        return node.by_first.get(first_token, [])

    # ---- insertion ----
    def insert(self, parent: RadixNode, key: tuple[int, ...], page: PhysPage) -> RadixNode:
        """New child holding `page` (the caller increfs it for the tree). It is created locked
        by the caller's slot (lock_ref 1, pinned), so it never enters the evictable dict here."""
        assert key not in parent.children
        node = RadixNode(key=key, page=page, parent=parent, depth=parent.depth + 1)
        node.lock_ref = node.pin_ref = 1
        parent.children[key] = node
        if key:
            parent.by_first.setdefault(key[0], []).append(node)
        self.num_nodes += 1
        return node

    # ---- locks ----
    def lock(self, path: Sequence[RadixNode], pinned: bool = True) -> None:
        for node in path:
            if node.lock_ref == 0:
                self.evictable.pop(node)
            node.lock_ref += 1
            if pinned:
                self._pin(node)

    def unlock(self, path: Sequence[RadixNode], pinned: bool = True) -> None:
        self.clock += 1
        for node in reversed(path):  # deepest first: ancestors end up behind descendants
            node.lock_ref -= 1
            assert node.lock_ref >= 0
            if pinned:
                self._unpin(node)
            if node.lock_ref == 0:
                node.last_use = self.clock
                self.evictable[node] = None

    def pin(self, path: Sequence[RadixNode]) -> None:
        for node in path:
            self._pin(node)

    def unpin(self, path: Sequence[RadixNode]) -> None:
        for node in path:
            self._unpin(node)

    def _pin(self, node: RadixNode) -> None:
        if node.pin_ref == 0:
            self.num_unpinned -= 1
        node.pin_ref += 1

    def _unpin(self, node: RadixNode) -> None:
        node.pin_ref -= 1
        assert node.pin_ref >= 0
        if node.pin_ref == 0:
            self.num_unpinned += 1

    # ---- eviction ----
    def oldest_use(self) -> int | None:
        for node in self.evictable:  # the first entry only
            return node.last_use
        return None

    def evict_one(self) -> PhysPage | None:
        """Detach the LRU unlocked leaf; returns its page (the caller drops the tree's ref)."""
        if not self.evictable:
            return None
        node, _ = self.evictable.popitem(last=False)
        assert not node.children and not node.tails and node.parent is not None, "not a leaf"
        parent = node.parent
        del parent.children[node.key]
        if node.key:
            sibs = parent.by_first[node.key[0]]
            sibs.remove(node)  # siblings sharing a first token: a handful at most
            if not sibs:
                del parent.by_first[node.key[0]]
        node.parent = None
        self.num_nodes -= 1
        self.num_unpinned -= 1  # lock_ref 0 implies pin_ref 0
        page, node.page = node.page, None
        return page

    # ---- introspection ----
    def nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
