"""VMM benchmark: per-operation latency, mapping throughput, mapper interference with a GEMM.

    python -m vtensor.bench.vmm [--backend auto|host|cuda] [--out r.json] [--plot r.png]

1. per-op latency of the driver calls, one page at a time (CUDA: cuMemCreate, cuMemMap,
   cuMemSetAccess, cuMemUnmap, cuMemRelease timed as separate calls; host: memfd slot create,
   mmap MAP_FIXED (map and access in one call), PROT_NONE remap, fallocate punch-hole).
2. mapping throughput through VirtualTensor for batches of 1, 8, 64, 512 pages, inline (no
   mapper) and through the Mapper (submit + wait); pages come from a pre-grown pool.
3. interference: a GEMM loop (CUDA: 8192^2 bf16; host: a small fp32 matmul) timed alone and
   while a second thread keeps the mapper mapping and unmapping 64 pages; slowdown ratio.
4. shared prefix: the same pages (a cached prompt prefix) mapped into many address ranges (the
   requests reusing it), from 1, 2 and 4 threads, while another thread is idle, runs Python
   (the engine's main thread scheduling) or queues GEMMs (CUDA): what admitting a wave of
   prefix-hit requests costs the mapper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from datetime import UTC, datetime
from importlib import metadata

import torch

from vtensor.vmm import Mapper, PagePool, VirtualTensor, make_backend


def _log(msg: str) -> None:
    print(f"[bench.vmm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _summary(samples_s: list[float]) -> dict:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "mean_us": statistics.fmean(us),
        "p90_us": us[min(len(us) - 1, int(0.9 * len(us)))],
        "min_us": us[0],
    }


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ---- 1. per-op latency ----
def per_op(b, n: int) -> dict:
    ps = b.page_size
    addr = b.reserve(n * ps)
    out: dict[str, dict] = {}
    try:
        if b.name == "cuda":
            cu, call = b._cu, b._call
            t_create, handles = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                h = call("cuMemCreate", cu.cuMemCreate(ps, b._prop, 0))
                t_create.append(time.perf_counter() - t0)
                handles.append(h)
            t_map = [_timed(b.map_only, addr + i * ps, h) for i, h in enumerate(handles)]
            t_acc = [_timed(b.set_access, addr + i * ps, ps) for i in range(n)]
            torch.cuda.synchronize()
            t_unmap = [
                _timed(lambda a: call("cuMemUnmap", cu.cuMemUnmap(a, ps)), addr + i * ps)
                for i in range(n)
            ]
            t_rel = [_timed(lambda h: call("cuMemRelease", cu.cuMemRelease(h)), h) for h in handles]
            # the batched form the mapper uses: n maps + ONE cuMemSetAccess over the run
            hs = [b.create() for _ in range(n)]
            t0 = time.perf_counter()
            b.map_range(addr, hs)
            batched = (time.perf_counter() - t0) / n
            for i in range(n):
                b.unmap(addr + i * ps)
            for h in hs:
                b.release(h)
            out.update(create=_summary(t_create), map=_summary(t_map))
            out.update(set_access=_summary(t_acc), unmap=_summary(t_unmap))
            out["release"] = _summary(t_rel)
            out["map_range_batched_per_page"] = _summary([batched])  # one sample: n pages
        else:
            t_create, handles = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                handles.append(b.create())
                t_create.append(time.perf_counter() - t0)
            t_map = [_timed(b.map, addr + i * ps, h) for i, h in enumerate(handles)]
            # touch so that release has real memory to give back
            b.as_tensor(addr, n * ps)[::4096].fill_(1)
            t_unmap = [_timed(b.unmap, addr + i * ps) for i in range(n)]
            t_rel = [_timed(b.release, h) for h in handles]
            out.update(create=_summary(t_create), map_and_access=_summary(t_map))
            out.update(unmap=_summary(t_unmap), release=_summary(t_rel))
    finally:
        b.free_reservation(addr, n * ps)
    return out


# ---- 2. mapping throughput ----
def throughput(b, batches: list[int], pages_per_point: int) -> list[dict]:
    top = max(batches)
    pool = PagePool(b, grow_batch=top)
    pool.reserve_free(top)  # creation is measured in per_op; here only map/unmap
    rows = []
    mapper = Mapper()
    try:
        for mode in ("inline", "mapper"):
            vt = VirtualTensor(pool, top * b.page_size, mapper if mode == "mapper" else None)
            for batch in batches:
                reps = max(2, pages_per_point // batch)
                tm, tu = [], []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    vt.map(0, batch).wait()
                    tm.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    vt.unmap(0, batch).wait()
                    tu.append(time.perf_counter() - t0)
                m, u = statistics.median(tm), statistics.median(tu)
                rows.append(
                    {
                        "mode": mode,
                        "batch_pages": batch,
                        "reps": reps,
                        "map_us_per_page": m / batch * 1e6,
                        "unmap_us_per_page": u / batch * 1e6,
                        "map_gib_per_s": batch * b.page_size / m / 2**30,
                        "unmap_gib_per_s": batch * b.page_size / u / 2**30,
                    }
                )
                r = rows[-1]
                _log(
                    f"  {mode:6s} batch {batch:4d}: map {r['map_us_per_page']:8.2f} us/page "
                    f"({r['map_gib_per_s']:7.1f} GiB/s), unmap {r['unmap_us_per_page']:8.2f} us"
                )
            vt.close()
    finally:
        mapper.close()
        pool.close()
    return rows


# ---- 3. interference ----
def interference(b, trials: int, iters: int, churn_pages: int) -> dict:
    cuda = b.name == "cuda"
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=b.device).manual_seed(0)
    x = torch.randn(n, n, device=b.device, dtype=dtype, generator=g)
    y = torch.randn(n, n, device=b.device, dtype=dtype, generator=g)
    z = torch.empty(n, n, device=b.device, dtype=dtype)

    def gemm_loop() -> float:
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                torch.mm(x, y, out=z)
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(x, y, out=z)
        return time.perf_counter() - t0

    pool = PagePool(b, grow_batch=churn_pages)
    pool.reserve_free(churn_pages)
    mapper = Mapper()
    vt = VirtualTensor(pool, churn_pages * b.page_size, mapper)
    stop = threading.Event()
    cycles = [0]

    def churn() -> None:
        while not stop.is_set():
            vt.map(0, churn_pages).wait()
            vt.unmap(0, churn_pages).wait()
            cycles[0] += 1

    for _ in range(2):
        gemm_loop()  # warm-up (cuBLAS heuristics, clocks)
    alone, busy, busy_cycles, busy_wall = [], [], [], []
    try:
        for _ in range(trials):  # alternate so clock/thermal drift hits both sides alike
            alone.append(gemm_loop())
            stop.clear()
            cycles[0] = 0
            th = threading.Thread(target=churn, daemon=True)
            th.start()
            time.sleep(0.002)  # let the churn get going before the timed region
            t0 = time.perf_counter()
            busy.append(gemm_loop())
            busy_wall.append(time.perf_counter() - t0)
            stop.set()
            th.join()
            busy_cycles.append(cycles[0])
    finally:
        vt.close()
        mapper.close()
        pool.close()
    a, bz = statistics.median(alone), statistics.median(busy)
    flops = 2 * n**3 * iters
    churn_rate = sum(busy_cycles) * 2 * churn_pages / sum(busy_wall)
    return {
        "gemm": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "iters_per_trial": iters,
        "trials": trials,
        "alone_s": alone,
        "busy_s": busy,
        "alone_median_s": a,
        "busy_median_s": bz,
        "alone_tflops": flops / a / 1e12,
        "busy_tflops": flops / bz / 1e12,
        "slowdown": bz / a - 1.0,
        "churn_pages_per_batch": churn_pages,
        "churn_map_unmap_cycles": busy_cycles,
        "churn_page_ops_per_s": churn_rate,
    }


# ---- 4. shared prefix ----
def map_from_threads(b, addrs: list[int], handles: list[int], threads: int) -> float:
    """Seconds to map `handles` at each of `addrs` (split over `threads` threads, one
    map_range per address); unmaps them all again after the clock stops."""
    parts = [addrs[i::threads] for i in range(threads)]

    def work(part: list[int]) -> None:
        for a in part:
            b.map_range(a, handles)

    workers = [threading.Thread(target=work, args=(part,)) for part in parts]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    for a in addrs:
        for i in range(len(handles)):
            b.unmap(a + i * b.page_size)
    return dt


def shared_prefix(b, prefix_pages: int, requests: int, threads: list[int], load: str,
                  label: str = "") -> list[dict]:  # fmt: skip
    """us per page mapping when `requests` ranges each map the same `prefix_pages` pages,
    while another thread is idle, queues GEMMs (CUDA) or runs Python (as the engine's main
    thread does while it schedules and launches: the mapper then waits for the GIL after
    every driver call that released it)."""
    pool = PagePool(b, grow_batch=prefix_pages)
    pages = pool.alloc(prefix_pages)
    handles = [p.handle for p in pages]
    span = prefix_pages * b.page_size
    addrs = [b.reserve(span) for _ in range(requests)]
    stop = threading.Event()
    x = torch.randn(4096, 4096, device=b.device, dtype=torch.bfloat16) if load == "gemms" else None

    def gemm_loop() -> None:
        while not stop.is_set():
            for _ in range(8):
                torch.mm(x, x)
            torch.cuda.synchronize(b.device)

    def python_loop() -> None:
        while not stop.is_set():
            sum(i * i for i in range(1000))

    other = {"gemms": gemm_loop, "python": python_loop}.get(load)
    loader = threading.Thread(target=other, daemon=True) if other else None
    if loader is not None:
        loader.start()
    rows = []
    try:
        for t in threads:
            dt = map_from_threads(b, addrs, handles, t)
            rows.append({"threads": t, "load": load, "prefix_pages": prefix_pages,
                         "requests": requests, "s": dt,
                         "us_per_page": dt / (prefix_pages * requests) * 1e6})  # fmt: skip
            _log(f"  {label} {t} thread(s), {load:6s}: {rows[-1]['us_per_page']:9.2f} us per page "
                 f"mapping ({requests} x {prefix_pages} pages in {dt:.3f} s)")
    finally:
        stop.set()
        if loader is not None:
            loader.join()
        for a in addrs:
            b.free_reservation(a, span)
        for p in pages:
            pool.decref(p)
        pool.close()
    return rows


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ops = res["per_op_latency"]
    names = list(ops)
    axes[0].bar(names, [ops[k]["median_us"] for k in names], color="tab:blue")
    axes[0].set_ylabel("median us / page")
    axes[0].set_title(f"per-op latency ({res['page_size'] >> 20} MiB pages)")
    axes[0].tick_params(axis="x", rotation=30)
    for mode, style in (("inline", "-o"), ("mapper", "--s")):
        rows = [r for r in res["throughput"] if r["mode"] == mode]
        xs = [r["batch_pages"] for r in rows]
        axes[1].plot(xs, [r["map_gib_per_s"] for r in rows], style, label=f"map ({mode})")
        axes[1].plot(xs, [r["unmap_gib_per_s"] for r in rows], style, label=f"unmap ({mode})")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("pages per batch")
    axes[1].set_ylabel("GiB/s")
    axes[1].set_title("mapping throughput")
    axes[1].legend(fontsize=8)
    it = res["interference"]
    axes[2].bar(["GEMM alone", "GEMM + mapper churn"], [it["alone_tflops"], it["busy_tflops"]])
    axes[2].set_ylabel("TFLOP/s" if res["backend"] == "cuda" else "TFLOP/s (CPU)")
    axes[2].set_title(f"interference: {it['gemm']}, slowdown {100 * it['slowdown']:+.2f}%")
    fig.suptitle(f"vtensor VMM on {res['device_name']} ({res['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.vmm", description=__doc__)
    p.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
    p.add_argument("--page-size", type=int, default=None, help="bytes (host; default 2 MiB)")
    p.add_argument("--ops", type=int, default=64, help="pages for the per-op latency stage")
    p.add_argument("--batches", default="1,8,64,512")
    p.add_argument("--trials", type=int, default=7, help="interference trials (each side)")
    p.add_argument("--iters", type=int, default=None, help="GEMMs per interference trial")
    p.add_argument("--prefix-pages", type=int, default=128,
                   help="stage 4: pages of the shared prefix (128 = 2K Llama-3-8B tokens)")
    p.add_argument("--prefix-requests", type=int, default=100,
                   help="stage 4: address ranges (requests) it is mapped into")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    args = p.parse_args(argv)

    b = make_backend(args.backend, args.page_size)
    batches = [int(x) for x in args.batches.split(",")]
    if args.quick:
        batches = [x for x in batches if x <= 64] or [1]
    iters = args.iters or (40 if b.name == "cuda" else 10)
    res: dict = {
        "benchmark": "vmm",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": b.name,
        "device_name": getattr(b, "device_name", str(b.device)),
        "page_size": b.page_size,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_bindings": _version("cuda-bindings"),
    }
    try:
        _log(f"backend {b.name} on {res['device_name']}, page {b.page_size} bytes")
        _log(f"stage 1/4: per-op latency over {args.ops} pages")
        res["per_op_latency"] = per_op(b, 8 if args.quick else args.ops)
        for k, v in res["per_op_latency"].items():
            _log(f"  {k:28s} median {v['median_us']:8.2f} us  p90 {v['p90_us']:8.2f} us")
        _log(f"stage 2/4: mapping throughput, batches {batches}")
        res["throughput"] = throughput(b, batches, 64 if args.quick else 1024)
        _log("stage 3/4: GEMM interference (alone vs. mapper map/unmap churn)")
        res["interference"] = interference(
            b, 1 if args.quick else args.trials, 1 if args.quick else iters, 8 if args.quick else 64
        )
        it = res["interference"]
        _log(
            f"  {it['gemm']}: alone {it['alone_tflops']:.2f} TFLOP/s, with churn "
            f"{it['busy_tflops']:.2f} TFLOP/s -> slowdown {100 * it['slowdown']:+.2f}% "
            f"({it['churn_page_ops_per_s']:.0f} page map/unmaps per s during the GEMMs)"
        )
        pp, reqs = (4, 8) if args.quick else (args.prefix_pages, args.prefix_requests)
        _log(f"stage 4/4: a {pp}-page shared prefix mapped into {reqs} ranges")
        loads = ["idle", "python"] + (["gemms"] if b.name == "cuda" else [])
        drivers = [("default", b)]
        if b.name == "cuda":  # the same calls with the GIL held (vmm/cuda_held.py)
            from vtensor.vmm.cuda import CudaBackend

            drivers.append(("held-gil", CudaBackend(b.device, b.page_size, held_gil=True)))
        res["shared_prefix"] = []
        try:
            for name, d in drivers:
                for load in loads:  # under Python load a map can wait ms for the GIL: fewer
                    n = reqs if load != "python" else max(1, reqs // 20)
                    for row in shared_prefix(d, pp, n, [1, 2, 4], load, name):
                        res["shared_prefix"].append({"driver": name, **row})
        finally:
            for _, d in drivers[1:]:
                d.close()
    finally:
        b.close()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        _log(f"wrote {args.out}")
    if args.plot:
        plot(res, args.plot)
        _log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
