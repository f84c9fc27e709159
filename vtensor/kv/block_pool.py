"""The paged baseline's block pool pieces (vLLM v1's block_pool.py): block records and the
LRU free queue. A free block keeps its hash (still a prefix-cache hit) until it is reused;
the queue's order is the eviction order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", int)


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0  # sequences using it; 0 = in the free queue (maybe still cached)
    block_hash: BlockHash | None = None  # set once full and published
    tokens: tuple[int, ...] | None = None  # the block's tokens, to verify a hash hit
    prev: Block | None = None  # free-queue links
    next: Block | None = None


class FreeQueue:
    """Doubly-linked list with sentinels: LRU order, O(1) popleft / remove / append."""

    def __init__(self, blocks: list[Block]) -> None:
        self.head = Block(-1)
        self.tail = Block(-1)
        self.head.next, self.tail.prev = self.tail, self.head
        self.size = 0
        for b in blocks:
            self.append(b)

    def append(self, b: Block) -> None:
        last = self.tail.prev
        assert last is not None
        b.prev, b.next = last, self.tail
        last.next = b
        self.tail.prev = b
        self.size += 1

    def remove(self, b: Block) -> None:
        assert b.prev is not None and b.next is not None, "block not in the free queue"
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.size -= 1

    def popleft(self) -> Block:
        b = self.head.next
        assert b is not None and b is not self.tail, "free queue empty"
        self.remove(b)
        return b

    def __iter__(self) -> Iterator[Block]:
        b = self.head.next
        while b is not None and b is not self.tail:
            yield b
            b = b.next
