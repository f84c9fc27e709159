"""What does mapping a shared prefix cost on the driver, and what does that cost follow?
Times cuMemMap and cuMemSetAccess separately for (a) fresh pages, (b) pages already mapped
into other ranges (a cached prefix reused), with 2 MiB and 32 MiB pages at the same bytes,
and (c) the shared prefix mapped from 1, 2, 4 and 8 threads; for both driver paths
(cuda-bindings, and ctypes with the GIL held).
    PYTHONPATH=. python3 bench/results/2026-11-30e/diag/vmmscale.py --out F.json
"""

import argparse
import json
import time

import torch

from vtensor.bench.vmm import map_from_threads
from vtensor.vmm.cuda import CudaBackend

MIB = 1 << 20


def run(held: bool, page_mib: int, total_mib: int, ranges: int, threads: list[int]) -> dict:
    b = CudaBackend(torch.device("cuda", 0), page_size=page_mib * MIB, held_gil=held)
    n = total_mib // page_mib
    handles = [b.create() for _ in range(n)]
    span = n * b.page_size
    addrs = [b.reserve(span) for _ in range(ranges + 1)]
    out: dict = {"held_gil": held, "page_mib": page_mib, "pages": n, "ranges": ranges}

    def split(addr: int) -> tuple[float, float]:
        """One range: n cuMemMap, then one cuMemSetAccess over it (the mapper's batch)."""
        objs = [b._objs[h] for h in handles]
        t0 = time.perf_counter()
        with b._current():
            for i, o in enumerate(objs):
                b.map_only(addr + i * b.page_size, o)
            t1 = time.perf_counter()
            b.set_access(addr, span)
        t2 = time.perf_counter()
        with b._lock:
            for i, h in enumerate(handles):
                b._mapped[addr + i * b.page_size] = h
                b._handles[h] += 1
        return t1 - t0, t2 - t1

    m, s = split(addrs[0])  # first mapping of fresh pages
    out["fresh"] = {"map_us_per_page": 1e6 * m / n, "set_access_us_per_page": 1e6 * s / n,
                    "set_access_us_per_mib": 1e6 * s / total_mib}  # fmt: skip
    ms, ss = [], []
    for a in addrs[1:]:  # the same pages into more ranges (a shared prefix)
        m, s = split(a)
        ms.append(m)
        ss.append(s)
    out["shared"] = {"map_us_per_page": 1e6 * sum(ms) / (n * ranges),
                     "set_access_us_per_page": 1e6 * sum(ss) / (n * ranges),
                     "set_access_us_per_mib": 1e6 * sum(ss) / (total_mib * ranges)}  # fmt: skip
    for a in addrs[1:]:
        for i in range(n):
            b.unmap(a + i * b.page_size)
    out["threads"] = []
    for t in threads:
        dt = map_from_threads(b, addrs[1:], handles, t)
        out["threads"].append({"threads": t, "us_per_page": 1e6 * dt / (n * ranges),
                               "us_per_mib": 1e6 * dt / (total_mib * ranges)})  # fmt: skip
    for i in range(n):
        b.unmap(addrs[0] + i * b.page_size)
    for a in addrs:
        b.free_reservation(a, span)
    for h in handles:
        b.release(h)
    b.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--total-mib", type=int, default=256)
    p.add_argument("--ranges", type=int, default=48)
    a = p.parse_args()
    rows = []
    for held in (False, True):
        for page in (2, 32):
            r = run(held, page, a.total_mib, a.ranges, [1, 2, 4, 8])
            rows.append(r)
            th = ", ".join(f"{x['threads']}t {x['us_per_mib']:.1f}" for x in r["threads"])
            fresh = r["fresh"]
            print(f"held={held!s:5} page {page:2d} MiB: fresh map {fresh['map_us_per_page']:.1f}"
                  f" + access {fresh['set_access_us_per_page']:.1f} us/page; shared map "
                  f"{r['shared']['map_us_per_page']:.1f} + access "
                  f"{r['shared']['set_access_us_per_page']:.1f} us/page "
                  f"({r['shared']['set_access_us_per_mib']:.2f} us/MiB); threads us/MiB: {th}",
                  flush=True)  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
