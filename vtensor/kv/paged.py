"""PagedKVCache: the vLLM-like baseline for kv="paged".

One pool of `num_blocks` blocks of `block_size` (16) tokens, preallocated up front (like vLLM's
90%-of-GPU cache), per layer `[num_blocks, block_size, kv_heads, head_dim]` for K and V. Each
sequence owns a block table. Prefix caching follows vLLM v1: a full block's hash chains on its
parent's hash (`BlockHash`), hits are verified against the block's tokens, freed blocks keep
their hash and sit in an LRU free queue (intrusive doubly-linked list with sentinels, O(1)
removal on a hit) until reused; a sequence frees its blocks tail first, so the tail of a prompt
is evicted before its (more shareable) head. No parking: `release(park=True)` just frees.
Its page plans are trivial (no maps: the blocks exist from the start): swap copies by block id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vtensor.kv.block_pool import Block, BlockHash, FreeQueue
from vtensor.kv.budget import resolve_budget
from vtensor.kv.layout import KVConfigError, KVSpec
from vtensor.kv.manager import Allocation, KVIntegrityError, SlotStateError
from vtensor.kv.plan import PagePlan, SwapDrop, SwapIn, SwapOut


@dataclass(slots=True, eq=False)
class _Seq:
    index: int
    active: bool = False
    swapped: bool = False
    request_id: str | None = None
    blocks: list[Block] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of its full, published blocks
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is valid
    num_tokens: int = 0
    swap_pos: list[int] = field(default_factory=list)  # block positions swapped out


class PagedKVCache:
    def __init__(
        self,
        spec: KVSpec,
        *,
        device: torch.device,
        max_tokens: int,
        num_slots: int,
        budget_bytes: int | float | None = None,
        num_blocks: int | None = None,
        enable_prefix_cache: bool = True,
        block_size: int = 16,
    ) -> None:
        """Pool size: num_blocks, else budget_bytes (bytes, or a fraction of free GPU memory;
        None: KV_MEMORY_FRACTION of it on CUDA; on host a budget in bytes is required)."""
        if block_size <= 0 or max_tokens <= 0 or num_slots <= 0:
            raise KVConfigError("block_size, max_tokens and num_slots must be positive")
        dev = torch.device(device)
        self.spec, self.device, self.block_size = spec, dev, block_size
        self.max_tokens, self.num_slots = max_tokens, num_slots
        self.enable_prefix_cache = enable_prefix_cache
        self.bytes_per_block = block_size * spec.bytes_per_token
        if num_blocks is None:
            if dev.type != "cuda" and (budget_bytes is None or isinstance(budget_bytes, float)):
                raise KVConfigError("PagedKVCache on host needs budget_bytes (bytes) or num_blocks")
            budget = resolve_budget(budget_bytes, dev)
            assert budget is not None
            num_blocks = budget // self.bytes_per_block
        if num_blocks <= 0:
            raise KVConfigError(f"budget gives {num_blocks} blocks of {self.bytes_per_block} B")
        self.num_blocks = num_blocks
        self.max_blocks = -(-max_tokens // block_size)
        self.kv_index_width = self.max_blocks
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        # kv: [layers, 2, num_blocks, block_size, kv_heads, head_dim], all allocated up front
        self.kv = torch.empty((L, 2, num_blocks, block_size, H, D), dtype=spec.dtype, device=dev)
        self.kv_views = [(self.kv[i, 0], self.kv[i, 1]) for i in range(L)]
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free = FreeQueue(self._blocks)
        self._cached: dict[BlockHash, Block] = {}
        self._seqs = [_Seq(i) for i in range(num_slots)]
        self._free_seqs = list(range(num_slots - 1, -1, -1))
        self._plan = PagePlan()  # pending: only swaps (the blocks are preallocated)
        self._swap: dict[int, torch.Tensor] = {}  # slot -> [blocks, layers, 2, block, heads, dim]
        self._closed = False
        self.series: list[dict] = []
        self.stats = dict.fromkeys(
            ("requests", "query_tokens", "prefix_hit_tokens", "prefix_hit_pages",
             "evicted_pages", "swap_outs", "swap_ins", "swap_bytes", "ensure_failures"),
            0,
        )  # fmt: skip

    # ---- helpers ----
    def _seq(self, slot: int, active: bool = True) -> _Seq:
        if not 0 <= slot < self.num_slots:
            raise SlotStateError(f"slot {slot} out of range [0, {self.num_slots})")
        s = self._seqs[slot]
        if active and not (s.active and not s.swapped):
            raise SlotStateError(f"slot {slot} is not an active (resident) sequence")
        return s

    @staticmethod
    def _hash(parent: BlockHash | None, tokens: tuple[int, ...]) -> BlockHash:
        return BlockHash(hash((parent, tokens)))

    def _pop_free(self) -> Block:
        b = self._free.popleft()
        if b.block_hash is not None:  # reusing a cached block evicts it from the cache
            if self._cached.get(b.block_hash) is b:
                del self._cached[b.block_hash]
            b.block_hash, b.tokens = None, None
            self.stats["evicted_pages"] += 1
        b.ref_cnt = 1
        return b

    def _decref(self, b: Block) -> None:
        b.ref_cnt -= 1
        assert b.ref_cnt >= 0
        if b.ref_cnt == 0:
            self._free.append(b)

    # ---- engine API ----
    def acquire(self, request_id: str, token_ids: Sequence[int]) -> Allocation | None:
        n = len(token_ids)
        if n == 0 or n > self.max_tokens:
            raise ValueError(f"prompt of {n} tokens: need 1..{self.max_tokens}")
        if not self._free_seqs:
            return None
        s = self._seqs[self._free_seqs.pop()]
        s.active, s.request_id = True, request_id
        self.stats["requests"] += 1
        self.stats["query_tokens"] += n
        if self.enable_prefix_cache:
            bs, parent = self.block_size, None
            for j in range((n - 1) // bs):  # always recompute the last prompt token
                chunk = tuple(token_ids[j * bs : (j + 1) * bs])
                h = self._hash(parent, chunk)
                b = self._cached.get(h)
                if b is None or b.tokens != chunk:  # verify tokens, not just the hash
                    break
                if b.ref_cnt == 0:
                    self._free.remove(b)
                b.ref_cnt += 1
                s.blocks.append(b)
                s.hashes.append(h)
                parent = h
            m = len(s.blocks) * bs
            s.tokens = list(token_ids[:m])
            s.num_tokens = m
            self.stats["prefix_hit_tokens"] += m
            self.stats["prefix_hit_pages"] += len(s.blocks)
        return Allocation(s.index, len(s.tokens))

    def ensure(self, slot: int, num_tokens: int) -> bool:
        s = self._seq(slot)
        if not 0 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens={num_tokens} outside [0, {self.max_tokens}]")
        need = -(-num_tokens // self.block_size) - len(s.blocks)
        if need > self._free.size:
            self.stats["ensure_failures"] += 1
            return False
        for _ in range(max(need, 0)):
            s.blocks.append(self._pop_free())
        s.num_tokens = max(s.num_tokens, num_tokens)
        return True

    def take_plan(self) -> PagePlan:
        plan, self._plan = self._plan, PagePlan()
        return plan

    def apply(self, plan: PagePlan) -> None:
        """The swap copies, in plan order, on the stream (blocks need no maps)."""
        for op in plan.ops:
            if isinstance(op, SwapOut):
                ids = torch.tensor(op.pages, dtype=torch.long, device=self.device)
                data = self.kv.index_select(2, ids).movedim(2, 0).contiguous()
                pin = self.device.type == "cuda"
                buf = torch.empty(data.shape, dtype=data.dtype, pin_memory=pin)
                self._swap[op.slot] = buf.copy_(data, non_blocking=True)
            elif isinstance(op, SwapIn):
                ids = torch.tensor(op.pages, dtype=torch.long, device=self.device)
                buf = self._swap.pop(op.slot).to(self.device, non_blocking=True)
                self.kv.index_copy_(2, ids, buf.movedim(0, 2))
            elif isinstance(op, SwapDrop):
                self._swap.pop(op.slot, None)
            else:
                raise TypeError(f"PagedKVCache plans hold only swaps, not {op!r}")

    def wait_ready(self) -> None:
        """Nothing to wait for: the pool is preallocated, swap copies are stream-ordered."""

    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> None:
        s = self._seq(slot)
        n, bs = len(token_ids), self.block_size
        if -(-n // bs) > len(s.blocks):
            raise ValueError(f"slot {slot}: {n} tokens but only {len(s.blocks)} blocks")
        v = len(s.tokens)
        if n < v or list(token_ids[:v]) != s.tokens:
            raise ValueError(f"slot {slot}: token_ids do not extend the slot's valid tokens")
        if self.enable_prefix_cache:
            parent = s.hashes[-1] if s.hashes else None
            for j in range(len(s.hashes), n // bs):
                chunk = tuple(token_ids[j * bs : (j + 1) * bs])
                h = self._hash(parent, chunk)
                b = s.blocks[j]
                if h not in self._cached and b.block_hash is None:
                    b.block_hash, b.tokens = h, chunk
                    self._cached[h] = b
                s.hashes.append(h)
                parent = h
        s.tokens = list(token_ids)
        s.num_tokens = max(s.num_tokens, n)

    def release(self, slot: int, token_ids: Sequence[int], park: bool = True) -> None:
        self._seq(slot)
        if len(token_ids):
            self.cache_prefix(slot, token_ids)
        self.free(slot)

    def free(self, slot: int) -> None:
        s = self._seq(slot, active=False)
        if not s.active:
            return
        for b in reversed(s.blocks):  # tail first: evicted before the shareable head
            if b is not None:
                self._decref(b)
        if s.swapped:
            self._plan.ops.append(SwapDrop(slot))
        s.active = s.swapped = False
        s.request_id = None
        s.blocks, s.hashes, s.tokens, s.swap_pos = [], [], [], []
        s.num_tokens = 0
        self._free_seqs.append(s.index)

    def swap_out(self, slot: int) -> None:
        """Blocks only this sequence uses -> host memory (pinned on CUDA), then freed: the
        plan copies them out before a later op or step can reuse them."""
        s = self._seq(slot)
        pos = [j for j, b in enumerate(s.blocks) if b.ref_cnt == 1]
        self._plan.ops.append(SwapOut(slot, tuple(s.blocks[j].block_id for j in pos)))
        for j in reversed(pos):
            b = s.blocks[j]
            self._decref(b)
            s.blocks[j] = None  # type: ignore[call-overload]
        s.swap_pos, s.swapped = pos, True
        self.stats["swap_outs"] += 1
        self.stats["swap_bytes"] += len(pos) * self.bytes_per_block

    def swap_in(self, slot: int) -> bool:
        s = self._seq(slot, active=False)
        if not s.swapped:
            raise SlotStateError(f"slot {slot} is not swapped out")
        if len(s.swap_pos) > self._free.size:
            return False
        for j in s.swap_pos:
            s.blocks[j] = self._pop_free()
        self._plan.ops.append(SwapIn(slot, tuple(s.blocks[j].block_id for j in s.swap_pos)))
        s.swap_pos, s.swapped = [], False
        self.stats["swap_ins"] += 1
        return True

    def num_free_pages(self) -> int:
        return self._free.size

    def token_capacity(self) -> int:
        return min(self.max_tokens, self.num_blocks * self.block_size)  # whole blocks

    def store_targets(
        self, slots: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """(block id, offset in the block) of each new token."""
        bs = self.block_size
        a: list[int] = []
        b: list[int] = []
        for slot, start, n in zip(slots, starts, counts, strict=True):
            blocks = self._seq(slot).blocks
            for p in range(start, start + n):
                a.append(blocks[p // bs].block_id)
                b.append(p % bs)
        return a, b

    def kv_index(self, slots: Sequence[int]) -> torch.Tensor:
        """Block tables [len(slots), max_blocks] int32 (host), padded with block 0."""
        rows = []
        for slot in slots:
            ids = [b.block_id for b in self._seq(slot).blocks]
            rows.append(ids + [0] * (self.max_blocks - len(ids)))
        return torch.tensor(rows, dtype=torch.int32).view(len(slots), self.max_blocks)

    def blocks(self, slot: int) -> list[int]:
        return [b.block_id for b in self._seq(slot).blocks]

    def maybe_trim(self) -> int:
        """Nothing to trim: the pool is preallocated (vLLM's design)."""
        return 0

    def trim(self) -> int:
        return 0

    def reset_prefix_cache(self) -> int:
        n = 0
        for h, b in list(self._cached.items()):
            if b.ref_cnt == 0:  # free already; only its hash made it reusable
                del self._cached[h]
                b.block_hash, b.tokens = None, None
                n += 1
        return n

    # ---- telemetry ----
    def snapshot(self) -> dict:
        in_use = self.num_blocks - self._free.size
        cached_free = sum(1 for b in self._cached.values() if b.ref_cnt == 0)
        live_tokens = sum(s.num_tokens for s in self._seqs if s.active)
        q = self.stats["query_tokens"]
        return {
            "page_size": self.bytes_per_block,
            "bytes_per_token": self.spec.bytes_per_token,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "pages_in_use": in_use,
            "pages_free": self._free.size - cached_free,
            "pages_cached": cached_free,
            "pages_shared": sum(1 for b in self._blocks if b.ref_cnt > 1),
            "bytes_physical": self.num_blocks * self.bytes_per_block,
            "bytes_mapped": in_use * self.bytes_per_block,
            "bytes_live_tokens": live_tokens * self.spec.bytes_per_token,
            "slots_active": sum(s.active for s in self._seqs),
            "prefix_hit_rate": self.stats["prefix_hit_tokens"] / q if q else 0.0,
            **self.stats,
        }

    def record(self, t: float | None = None) -> dict:
        import time

        snap = self.snapshot()
        snap["t"] = time.monotonic() if t is None else t
        self.series.append(snap)
        return snap

    def check_integrity(self) -> None:
        def fail(msg: str) -> None:
            raise KVIntegrityError(msg)

        refs = [0] * self.num_blocks
        for s in self._seqs:
            if not s.active:
                if s.blocks or s.tokens:
                    fail(f"free sequence {s.index} keeps blocks")
                continue
            seen = set()
            for j, b in enumerate(s.blocks):
                if b is None:
                    if j not in s.swap_pos:
                        fail(f"seq {s.index}: hole at block {j}")
                    continue
                if b.block_id in seen:
                    fail(f"seq {s.index} holds block {b.block_id} twice")
                seen.add(b.block_id)
                refs[b.block_id] += 1
            if len(s.blocks) > -(-max(s.num_tokens, 1) // self.block_size):
                fail(f"seq {s.index}: {len(s.blocks)} blocks for {s.num_tokens} tokens")
        free_ids = set()
        for b in self._free:
            if b.block_id in free_ids:
                fail(f"block {b.block_id} twice in the free queue")
            free_ids.add(b.block_id)
        if len(free_ids) != self._free.size:
            fail("free queue size out of sync")
        for b in self._blocks:
            if b.ref_cnt != refs[b.block_id]:
                fail(f"block {b.block_id}: ref_cnt {b.ref_cnt} != {refs[b.block_id]} users")
            if (b.ref_cnt == 0) != (b.block_id in free_ids):
                fail(f"block {b.block_id}: free queue membership disagrees with ref_cnt")
        for h, b in self._cached.items():
            if b.block_hash != h or b.tokens is None:
                fail(f"cached block {b.block_id} has a stale hash")

    def close(self) -> None:
        if self._closed:
            return
        for s in self._seqs:
            self.free(s.index)
        self._plan, self._swap = PagePlan(), {}
        self._closed = True
        self.kv_views = []
        self.kv = None  # type: ignore[assignment]

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
