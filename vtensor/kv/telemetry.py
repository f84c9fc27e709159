"""KVCache telemetry (snapshot, series for plots) and elasticity (idle pages back to the driver)."""

from __future__ import annotations

import time

from vtensor.kv.plan import Release
from vtensor.kv.slots import KVCacheBase, SlotState


class Telemetry(KVCacheBase):
    def maybe_trim(self, now: float | None = None) -> int:
        """Give idle free pages back to the driver once nothing was allocated for a while."""
        if self.idle_trim_seconds is None or self._closed or not self.pool.num_free():
            return 0
        now = time.monotonic() if now is None else now
        if now - self._last_alloc < self.idle_trim_seconds:
            return 0
        return self.trim()

    def trim(self) -> int:
        """Free ids go (accounting), and this device gives their memory back now: the pending
        plan is applied with the Release last (trim is device-side, like wait_ready)."""
        ids = self.pool.trim_pages(0)
        if ids:
            self.table.record(Release(tuple(ids)))
            self.stats["trimmed_pages"] += len(ids)
        if self.table.plan:
            self.apply(self.take_plan())
        return len(ids)

    def snapshot(self) -> dict:
        """Telemetry. pages_*: created (ever), live (exist now: in use + idle in the pool),
        in_use (mapped or cached), free (idle in the pool, trimmed after idle_trim_seconds),
        cached (only the radix tree holds them), in_tree / shared (tree pages a slot uses),
        evictable (cached + what parked slots would give back). bytes_physical = live pages,
        bytes_mapped = pages in use, bytes_live_tokens = what active requests' tokens need
        (mapped - live = fragmentation + prefix cache + parked). Counters: see `stats`."""
        ps, bpt = self.page_size, self.layout.bytes_per_token
        pst = self.pool.stats()
        mapper = self.applier.mapper
        live = [s for s in self.slots if s.state in (SlotState.ACTIVE, SlotState.SWAPPED)]
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
            "pages_evictable": self.tree.num_unpinned + self.parked_private_pages,
            "budget_pages": pst["budget_pages"],
            "bytes_physical": pst["live"] * ps,
            "bytes_mapped": in_use * ps,
            "bytes_live_tokens": live_tokens * bpt,
            "slots_active": sum(s.state == SlotState.ACTIVE for s in self.slots),
            "slots_parked": len(self.parked),
            "slots_swapped": sum(s.state == SlotState.SWAPPED for s in self.slots),
            "mapper_wait_s": mapper.wait_seconds if mapper is not None else 0.0,
            "mapper_busy_s": mapper.busy_seconds if mapper is not None else 0.0,
            "unmap_event_wait_s": self.applier.vt.event_wait_seconds,
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
