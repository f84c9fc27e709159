"""Admitting R prefix-hit requests on the host backend: host time per shared page mapped, split
into scheduling (acquire / ensure / take_plan) and device work (apply, then the wait for the
mapper). Llama-3-8B KV shapes (128 KiB a token, 16 tokens a 2 MiB page), a 2048-token prefix.
    PYTHONPATH=. python3 bench/results/2026-11-30d/diag/prefix_admit.py [R] [--profile]
"""

import cProfile
import pstats
import sys
import time

import torch

from vtensor.kv import KVCache, KVSpec
from vtensor.vmm import HostBackend

SPEC = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
PREFIX = 2048
R = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 100
PAGE = 2 << 20

cache = KVCache(SPEC, backend=HostBackend(page_size=PAGE), max_tokens=8192, num_slots=R + 2,
                budget_bytes=(PREFIX // 16 + 4 * (R + 2)) * PAGE)  # fmt: skip
prefix = list(range(1, PREFIX + 1))
seed = cache.acquire("seed", [*prefix, 9])
assert seed is not None and cache.ensure(seed.slot, PREFIX + 1)
cache.apply(cache.take_plan())
cache.wait_ready()
cache.release(seed.slot, [*prefix, 9])  # cached in the radix tree, the slot parked
cache.apply(cache.take_plan())
cache.wait_ready()

prof = cProfile.Profile() if "--profile" in sys.argv else None
if prof:
    prof.enable()
t_sched = t_apply = 0.0
for i in range(R):
    toks = [*prefix, 10 + i, 11 + i]
    t0 = time.perf_counter()
    a = cache.acquire(f"r{i}", toks)
    assert a is not None and a.num_cached_tokens >= PREFIX - 16
    assert cache.ensure(a.slot, len(toks))
    plan = cache.take_plan()
    t1 = time.perf_counter()
    cache.apply(plan)
    t_sched += t1 - t0
    t_apply += time.perf_counter() - t1
t0 = time.perf_counter()
cache.wait_ready()
t_wait = time.perf_counter() - t0
if prof:
    prof.disable()
pages = R * PREFIX // 16
print(f"{R} requests x {PREFIX // 16} shared pages, us per page: schedule "
      f"{1e6 * t_sched / pages:.2f}, apply {1e6 * t_apply / pages:.2f}, "
      f"wait {1e6 * t_wait / pages:.2f} (map ops {cache.stats['map_ops']})")  # fmt: skip
if prof:
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
