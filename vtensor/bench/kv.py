"""KV cache alone on a synthetic multi-turn chat trace: virtual (elastic) vs a vLLM-like pool.

    python -m vtensor.bench.kv --out bench/results/kv [--backend auto] [--quick]

No model runs: a scheduler stand-in drives the cache exactly as the engine does (acquire ->
ensure(prompt) -> apply(take_plan()) -> wait_ready -> cache_prefix; per decode step
ensure(len + 1); release(park) at the end of a turn; free() on preemption), with up to
`--max-active` conversations in flight and a random think time between turns. Conversations
come from `workloads.multi_turn` (ShareGPT-like lengths, whole history resent each turn). KV
spec: Llama-3-8B (32 layers, 8 KV heads, dim 128, bf16 = 128 KiB/token).

Reported: physical KV memory over time (pages that exist in the pool, pages mapped, bytes the
live tokens need) against a preallocated paged pool sized like vLLM's default (90% of device
memory minus the weights); prefix-hit rate (tokens served from cache / prompt tokens) for both;
map operations per generated token; mapper wait. The paged baseline's hit rate comes from the
same trace through PagedKVCache on the `meta` device (bookkeeping only, no memory): its memory
is by definition the preallocated pool. JSON + PNG.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtensor.bench import workloads
from vtensor.kv import KVCache, KVSpec, PagedKVCache
from vtensor.vmm import make_backend

LLAMA3_8B = KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
GIB = 1 << 30


@dataclass(slots=True)
class _Conv:
    users: list[list[int]]
    replies: list[int]
    history: list[int] = field(default_factory=list)  # tokens of finished turns
    turn: int = 0
    tokens: list[int] = field(default_factory=list)  # current turn: prompt + generated so far
    remaining: int = 0  # reply tokens still to generate this turn
    slot: int = -1


def simulate(cache, wl, *, max_active: int, max_think: int, seed: int, record_every: int) -> dict:
    """Drive `cache` (KVCache or PagedKVCache) through the trace; returns counters."""
    rng = random.Random(seed)
    convs = [_Conv(c.user_turns, c.reply_lens) for c in wl.conversations]
    waiting = [(rng.randrange(max_think + 1), i) for i in range(len(convs))]
    heapq.heapify(waiting)
    active: dict[int, _Conv] = {}
    step = generated = prompt_tokens = computed = preemptions = 0
    t0 = time.perf_counter()
    while waiting or active:
        if not active and waiting and waiting[0][0] > step:
            step = waiting[0][0]  # idle: jump to the next arrival
        # admit (prefill): prompt = history + next user message (or the preempted tokens)
        admitted = []
        while waiting and waiting[0][0] <= step and len(active) < max_active:
            _, i = heapq.heappop(waiting)
            c = convs[i]
            if not c.tokens:
                c.tokens = c.history + c.users[c.turn]
                c.remaining = c.replies[c.turn]
            alloc = cache.acquire(f"c{i}t{c.turn}", c.tokens)
            if alloc is None or not cache.ensure(alloc.slot, len(c.tokens)):
                if alloc is not None:
                    cache.free(alloc.slot)
                heapq.heappush(waiting, (step + 1, i))
                break
            c.slot = alloc.slot
            prompt_tokens += len(c.tokens)
            computed += len(c.tokens) - alloc.num_cached_tokens
            active[i] = c
            admitted.append(c)
        cache.apply(cache.take_plan())
        cache.wait_ready()
        for c in admitted:
            cache.cache_prefix(c.slot, c.tokens)  # the prefill "ran"
        # decode: one token per active conversation
        for i in list(active):
            c = active[i]
            c.tokens.append(rng.randrange(*workloads.DEFAULT_TOKEN_RANGE))
            if not cache.ensure(c.slot, len(c.tokens)):
                cache.free(c.slot)  # preempt: recompute later from its tokens
                del active[i]
                preemptions += 1
                heapq.heappush(waiting, (step + 1, i))
                continue
            generated += 1
            c.remaining -= 1
            if c.remaining == 0:
                cache.release(c.slot, c.tokens, park=True)
                del active[i]
                c.history, c.tokens = c.tokens, []
                c.turn += 1
                if c.turn < len(c.users):
                    heapq.heappush(waiting, (step + 1 + rng.randrange(max_think + 1), i))
        cache.apply(cache.take_plan())
        cache.wait_ready()
        if step % record_every == 0:
            cache.record(t=step)
        step += 1
    cache.record(t=step)
    return {
        "steps": step,
        "generated_tokens": generated,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_computed": computed,
        "preemptions": preemptions,
        "wall_s": time.perf_counter() - t0,
    }


def _device_total(backend) -> int | None:
    if backend.name == "cuda":
        return torch.cuda.mem_get_info(backend.device)[1]
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vtensor.bench.kv", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="bench/results/kv", help="output folder (or a .json path)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    p.add_argument("--backend", default="auto", help="auto | cuda | host")
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-active", type=int, default=32, help="conversations in flight")
    p.add_argument("--slots", type=int, default=96, help="KV slots (active + parked)")
    p.add_argument("--max-think", type=int, default=64, help="max steps between turns")
    p.add_argument("--len-scale", type=float, default=1.0)
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--weights-gib", type=float, default=16.0, help="model weights (paged pool)")
    p.add_argument("--pool-gib", type=float, default=None,
                   help="paged pool (default: 90%% of device memory - weights)")  # fmt: skip
    p.add_argument("--idle-trim-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny trace (seconds on the CPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = min(args.conversations, 24), min(args.turns, 3)
        args.max_active, args.slots = min(args.max_active, 8), min(args.slots, 16)
        args.len_scale, args.max_context = min(args.len_scale, 0.25), min(args.max_context, 2048)
        args.max_think = min(args.max_think, 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / "kv.json"
    png_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    backend = make_backend(args.backend)
    spec = LLAMA3_8B
    total = _device_total(backend)
    if args.pool_gib is not None:
        pool_bytes = int(args.pool_gib * GIB)
    elif total is not None:
        pool_bytes = int(0.9 * total - args.weights_gib * GIB)
    else:  # host: a pretend 80 GB device, so the numbers read like an 8B deployment
        pool_bytes = int(0.9 * 80e9 - args.weights_gib * GIB)
    wl = workloads.multi_turn(
        args.conversations, args.turns, seed=args.seed, len_scale=args.len_scale,
        max_context=args.max_context,
    )  # fmt: skip
    record_every = 1 if args.quick else 8
    sim_kw = dict(max_active=args.max_active, max_think=args.max_think, seed=args.seed,
                  record_every=record_every)  # fmt: skip
    print(f"backend={backend.name} page={backend.page_size} pool={pool_bytes / GIB:.1f} GiB "
          f"trace={wl.description}", flush=True)  # fmt: skip

    cache = KVCache(
        spec, backend=backend, max_tokens=args.max_context, num_slots=args.slots,
        budget_bytes=pool_bytes, idle_trim_seconds=args.idle_trim_s,
    )  # fmt: skip
    used0 = 0
    if backend.name == "cuda":
        free, tot = torch.cuda.mem_get_info(backend.device)
        used0 = tot - free
    virt = simulate(cache, wl, **sim_kw)
    cache.check_integrity()
    snap = cache.snapshot()
    series = cache.series
    device_used_peak = None
    if backend.name == "cuda":
        free, tot = torch.cuda.mem_get_info(backend.device)
        device_used_peak = tot - free - used0
    time.sleep(max(0.0, args.idle_trim_s) + 0.05)
    cache.apply(cache.take_plan())
    cache.wait_ready()  # idle long enough: free pages go back to the driver
    after_trim = cache.snapshot()["bytes_physical"]
    cache.close()

    paged = PagedKVCache(spec, max_tokens=args.max_context, num_slots=args.slots,
                         budget_bytes=pool_bytes, device="meta")  # fmt: skip
    base = simulate(paged, wl, **sim_kw)
    psnap = paged.snapshot()
    paged.close()

    gen = max(virt["generated_tokens"], 1)
    peak_phys = max(s["bytes_physical"] for s in series)
    peak_mapped = max(s["bytes_mapped"] for s in series)
    peak_live = max(s["bytes_live_tokens"] for s in series)
    mean_phys = sum(s["bytes_physical"] for s in series) / len(series)
    result = {
        "bench": "kv",
        "command": "python -m vtensor.bench.kv "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": backend.name,
        "device": torch.cuda.get_device_name(backend.device) if backend.name == "cuda" else "host",
        "page_size": backend.page_size,
        "kv_spec": "llama-3-8b: 32 layers, 8 kv heads, dim 128, bf16 (128 KiB/token)",
        "trace": {
            **wl.params,
            "max_active": args.max_active,
            "slots": args.slots,
            "max_think_steps": args.max_think,
        },  # fmt: skip
        "virtual": {
            **virt,
            "peak_bytes_physical": peak_phys,
            "mean_bytes_physical": mean_phys,
            "peak_bytes_mapped": peak_mapped,
            "peak_bytes_live_tokens": peak_live,
            "bytes_physical_end_after_idle_trim": after_trim,
            "device_used_delta_bytes_end": device_used_peak,
            "prefix_hit_rate": snap["prefix_hit_rate"],
            "affinity_hits": snap["affinity_hits"],
            "affinity_tokens": snap["affinity_tokens"],
            "map_ops": snap["map_ops"],
            "unmap_ops": snap["unmap_ops"],
            "map_ops_per_generated_token": snap["map_ops"] / gen,
            "mapper_wait_s": snap["mapper_wait_s"],
            "copies": snap["copies"],
            "copy_bytes": snap["copy_bytes"],
            "evicted_pages": snap["evicted_pages"],
            "evicted_slots": snap["evicted_slots"],
        },
        "paged_baseline": {
            **base,
            "pool_bytes": pool_bytes,
            "num_blocks": psnap["num_blocks"],
            "prefix_hit_rate": psnap["prefix_hit_rate"],
            "note": "vLLM-like preallocated pool (90% of device memory minus weights); hit rate "
            "from the same trace through PagedKVCache on the meta device",
        },
        "memory_saving_peak": 1.0 - peak_phys / pool_bytes,
        "series": [
            {
                k: s[k]
                for k in (
                    "t",
                    "bytes_physical",
                    "bytes_mapped",
                    "bytes_live_tokens",
                    "pages_cached",
                    "pages_evictable",
                    "slots_active",
                    "slots_parked",
                )
            }
            for s in series
        ],  # fmt: skip
    }
    json_path.write_text(json.dumps(result, indent=1))
    _plot(result, png_path)
    v = result["virtual"]
    print(
        f"virtual: peak {peak_phys / GIB:.2f} GiB physical ({peak_mapped / GIB:.2f} mapped, "
        f"{peak_live / GIB:.2f} live) vs paged pool {pool_bytes / GIB:.1f} GiB; "
        f"prefix hit {v['prefix_hit_rate']:.3f} (paged {psnap['prefix_hit_rate']:.3f}); "
        f"{v['map_ops_per_generated_token']:.4f} map ops/token; mapper wait "
        f"{v['mapper_wait_s'] * 1e3:.1f} ms; {gen} tokens in {virt['wall_s']:.2f} s\n"
        f"wrote {json_path} and {png_path}",
        flush=True,
    )
    return 0


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["series"]
    t = [x["t"] for x in s]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    pool = res["paged_baseline"]["pool_bytes"] / GIB
    ax.plot(t, [x["bytes_physical"] / GIB for x in s], label="virtual: physical pages")
    ax.plot(t, [x["bytes_mapped"] / GIB for x in s], label="virtual: in use (incl. prefix cache)")
    ps = res["page_size"]
    pinned = [(x["bytes_mapped"] - x["pages_evictable"] * ps) / GIB for x in s]
    ax.plot(t, pinned, label="virtual: pages live requests hold (not evictable)")
    ax.plot(t, [x["bytes_live_tokens"] / GIB for x in s], label="live tokens need", ls="--")
    ax.axhline(pool, color="k", ls=":", label=f"paged (vLLM-like) pool {pool:.0f} GiB")
    ax.set_yscale("log")
    ax.set_xlabel("engine step (cache-only trace)")
    ax.set_ylabel("GiB")
    ax.set_title(f"KV memory, {res['trace']['num_conversations']} conversations x "
                 f"{res['trace']['num_turns']} turns ({res['backend']})")  # fmt: skip
    ax.legend(fontsize=8)
    v, b = res["virtual"], res["paged_baseline"]
    bars = bx.bar(["virtual", "paged"], [v["prefix_hit_rate"], b["prefix_hit_rate"]],
                  color=["tab:blue", "tab:gray"])  # fmt: skip
    bx.bar_label(bars, fmt="%.2f")
    bx.set_ylim(0, 1)
    bx.set_title("prefix-hit rate (prompt tokens)")
    bx.text(0.5, -0.18, f"{v['map_ops_per_generated_token']:.3f} map ops / token, "
            f"mapper wait {v['mapper_wait_s'] * 1e3:.0f} ms", transform=bx.transAxes,
            ha="center", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
