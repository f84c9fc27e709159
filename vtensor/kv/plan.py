"""Page plans: the device work a KV manager's scheduling calls decided, as integers.

The scheduler calls acquire / ensure / release / free / swap_out / swap_in. They do the
accounting at once (which page is where, refcounts, free pages: preemption decisions stay
exact) and only *record* the device work as ops of the pending plan; `take_plan()` hands it
over and `apply(plan)` does it (driver maps and unmaps on the mapper thread, copies on the
stream), op by op in plan order. The engine applies each step's plan right after scheduling,
so the mapper still runs ahead of the GPU; `wait_ready()` then waits for what the step needs.

Units (every field is an int):
    page   a page of the KV reservation, slot * pages_per_slot + j (`KVLayout.slot_page`);
           a block id for PagedKVCache
    id     a logical physical page: the accounting pool's dense `PhysPage.index`. It names
           memory, not a handle: each device maps ids to pages of its own pool, created the
           first time an id is mapped there and given back on `Release`

Why a plan replays on N devices (tensor parallelism: each rank applies the same plans). It
names nothing device-specific: no handles, addresses, tensors, tickets or events. Pages are
offsets into a reservation of the same layout on every rank (each rank holds num_kv_heads / N
heads: one per-rank KVSpec, hence one KVLayout); ids resolve per rank; a copy is (id -> page,
bytes); swap buffers are per rank, keyed by slot; GPU ordering (events after the kernels
queued so far) is the applier's. Apply the same plans in the same order on every rank and all
ranks hold the same ids at the same pages, with the same bytes after the same kernels.
Order matters within a plan: an address may be unmapped and mapped again, an id freed and
reused, a swap-out must read pages before a later op overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Map:
    """KV pages [first, first + len(ids)) get logical pages `ids` (new ones or aliases)."""

    first: int
    ids: tuple[int, ...]
    ahead: bool = False  # lookahead: no step waits for it until a `Need` names its pages


@dataclass(frozen=True, slots=True)
class Need:
    """The next step reads KV pages [first, last), mapped ahead by earlier plans."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """KV pages [first, last) go, once the GPU is done with the kernels queued so far."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Copy:
    """The first `nbytes` of logical page `src` go to the start of KV page `dst` (the partial
    page of a shared prefix). Runs at wait_ready, when both are mapped."""

    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class SwapOut:
    """KV pages (or blocks) `pages` of `slot` to host memory; their Unmap follows."""

    slot: int
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SwapIn:
    """The slot's host copy back into `pages` (mapped before this op, in the same order)."""

    slot: int
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SwapDrop:
    """The slot's host copy is not needed any more (a swapped request was freed)."""

    slot: int


@dataclass(frozen=True, slots=True)
class Release:
    """Logical pages gone (trim): each device gives their memory back to the driver."""

    ids: tuple[int, ...]


PageOp = Map | Need | Unmap | Copy | SwapOut | SwapIn | SwapDrop | Release


@dataclass(slots=True)
class PagePlan:
    ops: list[PageOp] = field(default_factory=list)  # applied in this order

    def __len__(self) -> int:
        return len(self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def num_maps(self) -> int:
        """Pages this plan maps (telemetry, tests)."""
        return sum(len(op.ids) for op in self.ops if isinstance(op, Map))
