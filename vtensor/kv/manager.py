"""KVManager: the one interface the engine has to a KV cache, virtual (`KVCache`) or paged
(`PagedKVCache`). The scheduler decides with it (acquire / ensure / release / free / swap):
those calls do the accounting at once and only record their device work (page maps and
unmaps, partial-page copies, swap copies) in a page plan of integers (plan.py). The scheduler
hands the step's plan over (`take_plan`, in `ScheduledBatch.plan`), the engine applies it
(`apply`, right after scheduling: the mapper thread runs ahead while the inputs are built),
waits for it (`wait_ready`), and the runner builds each step's attention inputs from the
manager's integers (`store_targets`, `kv_index`). A plan names no device object, so the same
plans can be applied on several devices (tensor-parallel ranks; see plan.py).

Slots: a request holds one slot from `acquire` until `release` / `free`. Token ids passed in
are the request's tokens whose KV is (or will be, once this step ran) valid in the slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from vtensor.kv.plan import PagePlan


class KVIntegrityError(RuntimeError):
    """check_integrity() found inconsistent page bookkeeping (always a bug)."""


class SlotStateError(RuntimeError):
    """An operation on a slot in the wrong state (e.g. ensure on a free slot)."""


@dataclass(slots=True)
class Allocation:
    slot: int
    num_cached_tokens: int  # prefix tokens whose KV is already in the slot


class KVManager(Protocol):
    # per layer (k, v): [slots, max_tokens, kv_heads, d] (virtual) or [blocks, block_size,
    # kv_heads, d] (paged); the base address never moves (CUDA graphs stay valid)
    kv_views: list[tuple[torch.Tensor, torch.Tensor]]
    num_slots: int
    max_tokens: int  # per slot
    kv_index_width: int  # columns of kv_index(): 1 (virtual: the slot) or max blocks (paged)

    # ---- scheduling (integers only, no device work: it is recorded in the pending plan) ----
    def acquire(self, request_id: str, token_ids: Sequence[int]) -> Allocation | None:
        """A slot for a new request (None: no free slot). Reuses KV of a cached prefix or of a
        parked conversation slot; always leaves >= 1 token to compute."""
        ...

    def ensure(self, slot: int, num_tokens: int) -> bool:
        """Room for tokens [0, num_tokens) of the slot, evicting cached pages if needed. False
        when even eviction cannot give it (the caller preempts); never partial."""
        ...

    def num_free_pages(self) -> int:
        """Pages obtainable now: free + evictable."""
        ...

    def token_capacity(self) -> int:
        """Most tokens one request can ever hold, with the cache to itself: max_tokens, or
        fewer when the page (block) budget cannot hold that many. A longer request never runs."""
        ...

    # ---- prefix sharing, lifetime ----
    def cache_prefix(self, slot: int, token_ids: Sequence[int]) -> None:
        """token_ids' KV is now valid in the slot: publish its full pages for prefix reuse."""
        ...

    def release(self, slot: int, token_ids: Sequence[int], park: bool = True) -> None:
        """The request finished; token_ids' KV is valid. `park`: keep the slot's pages for a
        follow-up turn (conversation affinity) where the cache supports it."""
        ...

    def free(self, slot: int) -> None:
        """Drop the slot's KV at once (abort, recompute preemption): its pages count as free
        now; the plan unmaps them once the GPU is done with the kernels queued before it."""
        ...

    def swap_out(self, slot: int) -> None:
        """The slot's private pages to host memory (swap preemption); the pages count as free
        at once, the plan copies them out before anything can reuse them."""
        ...

    def swap_in(self, slot: int) -> bool:
        """Back from host memory; False: no room yet."""
        ...

    # ---- plans, device side ----
    def take_plan(self) -> PagePlan:
        """The device work the calls above recorded since the last take, in order."""
        ...

    def apply(self, plan: PagePlan) -> None:
        """Start a plan's device work (maps on the mapper thread, no waiting for them). Plans
        are applied in the order they were taken, each once per device."""
        ...

    def wait_ready(self) -> None:
        """Block until the device work of the applied plans that the next step needs is done
        and their copies are queued on the stream (before the step runs)."""
        ...

    def store_targets(
        self, slots: Sequence[int], starts: Sequence[int], counts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """(store_a, store_b) of tokens [starts[i], starts[i] + counts[i]) of each slot, in
        order: token t's K/V go to k_cache[store_a[t], store_b[t]]."""
        ...

    def kv_index(self, slots: Sequence[int]) -> torch.Tensor:
        """Host int32 [len(slots), kv_index_width]: where each slot's KV lives."""
        ...

    # ---- telemetry, checks, teardown ----
    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix and parked conversation (as vLLM's reset_prefix_cache);
        running requests keep their KV. Returns the pages (blocks) made free."""
        ...

    def trim(self) -> int:
        """Give free memory back to the driver now (device side: applies the pending plan with
        the releases last); pages trimmed (0 for a preallocated pool)."""
        ...

    def maybe_trim(self) -> int:
        """Give idle free memory back (called while the engine is idle); pages trimmed."""
        ...

    def snapshot(self) -> dict:
        """Telemetry (pages_*, bytes_*, slots_*, counters, prefix_hit_rate)."""
        ...

    def record(self, t: float | None = None) -> dict:
        """Append a snapshot (with time t) to `series`, for plots."""
        ...

    def check_integrity(self) -> None:
        """Raise KVIntegrityError unless all bookkeeping adds up."""
        ...

    def close(self) -> None: ...
