"""`vtensor bench steps`: the anatomy of an engine's step time, for the workloads that decode
at small batches (multi-turn waves, long context).

Two measurements, one engine (dummy weights):

- **decode sweep**: for each batch size B, B requests of `--context` prompt tokens decode in
  lock step; after the prefill, a window of decode steps is timed (wall per step, and over a
  shorter torch.profiler window the GPU kernel time per step and the GPU-busy share). Each
  point is set against its memory floor: the bytes a decode step must read (the weights except
  the embedding table, plus B x context tokens of KV) at the HBM bandwidth measured in the same
  process (a device-to-device copy).
- **trace**: a workload (default multi_turn, run in waves the way bench e2e runs it), with
  every step's wall time, kind (with prefill or decode only), running count and tokens
  recorded; the report splits the run's time into prefill steps and decode steps by batch size,
  so the time spent in the tail of each wave shows.

    python -m vtensor.bench.steps --model llama-3-8b --out steps.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KV_COUNTERS = ("pages_created", "evicted_pages", "evicted_slots", "mapper_wait_s",
               "mapper_busy_s", "unmap_event_wait_s")  # fmt: skip


def hbm_bandwidth(device: torch.device, nbytes: int = 2**31) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del a, b
    return 2 * nbytes / best


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: all but input embedding tables (rows gathered)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embed)


def _sync(eng: Any) -> None:
    if eng.device.type == "cuda":
        torch.cuda.synchronize()


def _drain(eng: Any) -> None:
    for rid in list(eng.requests):
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step(finished_only=True)


def decode_point(
    eng: Any,
    batch: int,
    context: int,
    steps: int,
    gpu_steps: int,
    bytes_per_token: int,
    weight_bytes: int,
    bw: float | None,
) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from vtensor.bench.profile import kernel_stats, settled_window
    from vtensor.engine import SamplingParams

    rng = random.Random(f"steps:{batch}:{context}")
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + gpu_steps + 16, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(vocab // 4, vocab) for _ in range(context)]
        eng.add_request(f"d{batch}-{i}", ids, params)
    decode_run = 0
    while decode_run < 3:  # past the prefill: three decode-only steps in a row
        before = eng.counters["prefill_steps"]
        eng.step(finished_only=True)
        decode_run = decode_run + 1 if eng.counters["prefill_steps"] == before else 0
    _sync(eng)
    kv0, tm0 = eng.kv_cache.snapshot(), dict(eng.timing)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step(finished_only=True)
    _sync(eng)
    wall = (time.perf_counter() - t0) / steps
    kv1 = eng.kv_cache.snapshot()
    res: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall,
        "host_ms_per_step": {k[:-2]: 1e3 * (v - tm0[k]) / steps for k, v in eng.timing.items()},
        # page work inside the window (maps, evictions, waits): what the KV cache cost
        "kv_delta": {
            k: kv1[k] - kv0[k]
            for k in KV_COUNTERS
            if isinstance(kv1.get(k), int | float) and isinstance(kv0.get(k), int | float)
        },
    }
    kv_bytes = batch * context * bytes_per_token
    if bw:
        floor = (weight_bytes + kv_bytes) / bw
        res |= {"floor_ms_per_step": 1e3 * floor, "floor_fraction": floor / wall}
    if eng.device.type == "cuda" and gpu_steps:
        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=acts, schedule=settled_window(gpu_steps)) as prof:
            eng.step(finished_only=True)  # the profiler's start-up stalls land in this step
            prof.step()
            t1 = time.perf_counter()
            for _ in range(gpu_steps):
                eng.step(finished_only=True)
            torch.cuda.synchronize()
            w = time.perf_counter() - t1
        ks = kernel_stats(list(prof.events()), w * 1e6, top=40)
        res |= {
            "gpu_ms_per_step": ks["kernel_time_us"] / 1e3 / gpu_steps,
            "gpu_busy_fraction": ks["gpu_busy_fraction"],
            "kernels_per_step": ks["num_kernels"] / gpu_steps,
            "top_kernels_us": ks["top_kernels_us"],  # all of a step's kinds, with calls
            "gaps": ks["gaps"],
        }
    _drain(eng)
    return res


_ALLOC = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
_HOST_ALLOC = ("num_host_alloc", "num_host_free")


def allocator_counters(device: torch.device) -> dict[str, int]:
    """torch's CUDA caching allocator (cudaMalloc / cudaFree calls, retries that freed the
    cache, whole-device syncs) and pinned host allocator counters: a step that allocates or
    syncs shows up here. Empty off CUDA."""
    if device.type != "cuda":
        return {}
    st = torch.cuda.memory_stats(device)
    out = {k: int(st.get(k, 0)) for k in _ALLOC}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        hs = host()
        out |= {k: int(hs.get(k, 0)) for k in _HOST_ALLOC}
    return out


def touch_slots(eng: Any) -> int:
    """Map one KV page into every free slot and free them again (public KVManager calls), so
    that each slot's address range has been mapped once before a trace. Returns the count."""
    kv, slots = eng.kv_cache, []
    while (a := kv.acquire(f"__touch{len(slots)}", [len(slots)])) is not None:
        slots.append(a.slot)
        if not kv.ensure(a.slot, 1):
            break
    kv.apply(kv.take_plan())
    kv.wait_ready()
    for s in slots:
        kv.free(s)
    kv.apply(kv.take_plan())
    kv.wait_ready()
    return len(slots)


def trace_workload(eng: Any, wl: Any) -> list[dict[str, Any]]:
    """Run `wl` (waves for multi-turn, as bench e2e) and record every step."""
    from vtensor.engine import SamplingParams

    rows: list[dict[str, Any]] = []
    waves: list[list[tuple[list[int], int, int]]] = []  # (prompt, max_tokens, conversation)
    if wl.multi_turn:
        for t in range(max(len(c.user_turns) for c in wl.conversations)):
            waves.append(
                [
                    (c.user_turns[t], c.reply_lens[t], i)
                    for i, c in enumerate(wl.conversations)
                    if t < len(c.user_turns)
                ]
            )
    else:
        waves.append([(r.prompt_token_ids, r.max_tokens, -1) for r in wl.requests])
    history: dict[int, list[int]] = {}
    t_start = time.perf_counter()
    for w, wave in enumerate(waves):
        ids = {}
        for j, (msg, max_tokens, conv) in enumerate(wave):
            prompt = history.get(conv, []) + list(msg)
            rid = f"w{w}-{j}"
            ids[rid] = (conv, prompt)
            p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            eng.add_request(rid, prompt, p)
        last = time.perf_counter()
        a0 = allocator_counters(eng.device)
        while eng.has_unfinished_requests():
            c0, tm0 = dict(eng.counters), dict(eng.timing)
            running = len(eng.scheduler.running) + len(eng.scheduler.waiting)
            outs = eng.step(finished_only=True)
            now = time.perf_counter()
            a1 = allocator_counters(eng.device)
            d = {
                k: eng.counters[k] - c0[k]
                for k in (
                    "prefill_steps",
                    "decode_steps",
                    "prompt_tokens_computed",
                    "generation_tokens",
                )
            }
            rows.append(
                {
                    "wave": w,
                    "t": now - t_start,
                    "ms": 1e3 * (now - last),
                    "running": running,
                    "prefill": d["prefill_steps"] > 0,
                    "prompt_tokens": d["prompt_tokens_computed"],
                    "generated": d["generation_tokens"],
                    # host time of the step, and how much of it was blocked on the GPU: a
                    # step whose wait is ~0 was bound by the host, not the GPU
                    **{k[:-2] + "_ms": 1e3 * (eng.timing[k] - tm0[k]) for k in eng.timing},
                    # allocator calls / syncs during the step (only those that happened)
                    "alloc": {k: a1[k] - a0[k] for k in a1 if a1[k] != a0[k]},
                }
            )
            a0, last = a1, time.perf_counter()  # the counters' own time is not the next step's
            for o in outs:
                conv, prompt = ids[o.request_id]
                if conv >= 0:
                    history[conv] = prompt + list(o.outputs[0].token_ids)
    return rows


def summarize_trace(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(r["ms"] for r in rows)
    pre = [r for r in rows if r["prefill"]]
    dec = [r for r in rows if not r["prefill"]]
    by: dict[int, list[float]] = {}
    waits: dict[int, list[float]] = {}
    for r in dec:
        b = next(x for x in BUCKETS if r["running"] <= x)
        by.setdefault(b, []).append(r["ms"])
        if "wait_ms" in r:  # (runs before 2026-11-30b did not record it)
            waits.setdefault(b, []).append(r["wait_ms"])
    waves: dict[int, float] = {}
    alloc: dict[str, int] = {}
    for r in rows:
        waves[r["wave"]] = waves.get(r["wave"], 0.0) + r["ms"]
        for k, v in r.get("alloc", {}).items():
            alloc[k] = alloc.get(k, 0) + v
    return {
        "total_s": total / 1e3,
        "steps": len(rows),
        "prefill_steps": {
            "n": len(pre),
            "s": sum(r["ms"] for r in pre) / 1e3,
            "prompt_tokens": sum(r["prompt_tokens"] for r in pre),
        },
        "decode_steps_by_running": {
            f"<={b}": {
                "n": len(v),
                "s": sum(v) / 1e3,
                "ms_per_step": sum(v) / len(v),
                # blocked on the GPU
                "wait_ms_per_step": sum(waits[b]) / len(v) if b in waits else None,
            }
            for b, v in sorted(by.items())
        },
        "wave_s": [waves[w] / 1e3 for w in sorted(waves)],
        "allocator": alloc,  # cudaMalloc / cudaFree / retries / syncs / pinned allocs, summed
    }


def format_report(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']} on {res['device']}; HBM copy "
        f"{(res['hbm_bytes_per_s'] or 0) / 1e12:.2f} TB/s; weights read per step "
        f"{res['weight_bytes_read'] / 2**30:.2f} GiB"
    ]
    for p in res["decode"]:
        s = f"  decode b={p['batch']:4d} ctx={p['context']}: {p['wall_ms_per_step']:.2f} ms/step"
        if "floor_ms_per_step" in p:
            s += f" (floor {p['floor_ms_per_step']:.2f}, {100 * p['floor_fraction']:.0f}%)"
        if "gpu_ms_per_step" in p:
            s += (
                f", GPU {p['gpu_ms_per_step']:.2f} ms, busy "
                f"{100 * (p['gpu_busy_fraction'] or 0):.0f}%"
            )
        lines.append(s)
    for name, t in res.get("traces", {}).items():
        s = t["summary"]
        lines.append(
            f"  trace {name}: {s['total_s']:.2f} s in {s['steps']} steps; waves "
            + ", ".join(f"{x:.2f}" for x in s["wave_s"])
        )
        p = s["prefill_steps"]
        lines.append(
            f"    steps with prefill: {p['n']} taking {p['s']:.2f} s "
            f"({p['prompt_tokens']} prompt tokens)"
        )
        if alloc := s.get("allocator"):
            lines.append("    allocator: " + ", ".join(f"{k} {v}" for k, v in alloc.items()))
        for b, v in s["decode_steps_by_running"].items():
            lines.append(
                f"    decode, running {b:>6}: {v['n']:5d} steps, {v['s']:.2f} s, "
                f"{v['ms_per_step']:.2f} ms/step"
                + (f" ({w:.2f} waiting on the GPU)" if (w := v.get("wait_ms_per_step")) else "")
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    """Left: decode ms/step per batch against its memory floor. Right: each traced step's
    wall time over the run (prefill steps marked), one panel row per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(res.get("traces", {}).items())
    fig, axes = plt.subplots(1, 1 + len(traces), figsize=(5 + 6 * len(traces), 4.2), squeeze=False)
    ax = axes[0][0]
    pts = res["decode"]
    xs = [p["batch"] for p in pts]
    ax.plot(xs, [p["wall_ms_per_step"] for p in pts], "o-", label="wall")
    if any("gpu_ms_per_step" in p for p in pts):
        ax.plot(xs, [p.get("gpu_ms_per_step") for p in pts], "s--", label="GPU kernels")
    if any("floor_ms_per_step" in p for p in pts):
        ax.plot(xs, [p.get("floor_ms_per_step") for p in pts], "k:", label="memory floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"batch (context {pts[0]['context'] if pts else '?'})")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{res['model']}: decode step time")
    ax.legend(fontsize=8)
    for i, (name, t) in enumerate(traces, start=1):
        a = axes[0][i]
        rows = t["rows"]
        dec = [r for r in rows if not r["prefill"]]
        pre = [r for r in rows if r["prefill"]]
        a.scatter([r["t"] for r in dec], [r["ms"] for r in dec], s=2, label="decode step")
        a.scatter([r["t"] for r in pre], [r["ms"] for r in pre], s=12, c="tab:red",
                  label="step with prefill")  # fmt: skip
        b = a.twinx()
        b.plot([r["t"] for r in rows], [r["running"] for r in rows], "g-", lw=0.6, alpha=0.6)
        b.set_ylabel("running requests", color="g")
        a.set_yscale("log")
        a.set_xlabel("time (s)")
        a.set_ylabel("ms per step")
        a.set_title(f"{name}: {t['summary']['total_s']:.1f} s, {t['summary']['steps']} steps")
        a.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vtensor bench steps", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="dummy-weight preset")
    p.add_argument("--batches", default="1,4,16,64,128,256", help="decode sweep batch sizes")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=48, help="timed decode steps per point")
    p.add_argument("--gpu-steps", type=int, default=8, help="profiled decode steps per point")
    p.add_argument(
        "--trace",
        default="multi_turn",
        help="workloads to trace (vs_vllm sizes), comma-separated; '' for none",
    )
    p.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep the prefix cache between points (new pages evict old ones)",
    )
    p.add_argument(
        "--trim",
        action="store_true",
        help="before each trace give the free KV pages back to the driver (as bench vs_vllm "
        "does between workloads): the trace then creates its pages afresh",
    )
    p.add_argument(
        "--touch-slots",
        action="store_true",
        help="before the traces map a page into every KV slot once (then free it): a first "
        "pass with each slot's address range already mapped once",
    )
    p.add_argument("--size", default="full", choices=("full", "quick"), help="workload sizes")
    p.add_argument("--engine-args", default="", help="k=v,... passed to the engine")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    p.add_argument("--out", default=None, help="also write the JSON (and a .png) here")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="re-plot a saved run")
    a = p.parse_args(argv)
    if a.plot_only:
        res = json.loads(Path(a.plot_only).read_text())
        print(format_report(res))
        print(plot(res, Path(a.plot_only).with_suffix(".png")))
        return 0

    from vtensor.bench.profile import engine_kwargs
    from vtensor.bench.vs_vllm import build_workloads, spec_for
    from vtensor.engine import LLMEngine

    traces = [t for t in a.trace.split(",") if t]
    wls = build_workloads(a.model, traces, a.size) if traces else []
    batches = [int(x) for x in a.batches.split(",") if x]
    max_len = max([a.context + a.steps + a.gpu_steps + 32] + [w.max_context() + 8 for w in wls])
    spec = spec_for(a.model)  # "tiny": a CPU smoke model folder
    kw: dict[str, Any] = dict(
        model=spec.model, load_format=spec.load_format, dtype=spec.dtype, max_model_len=max_len
    )
    kw.update(engine_kwargs(a.engine_args, a.layers))
    eng = LLMEngine(**kw)
    cfg = eng.model_config
    bpt = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * eng.model.dtype.itemsize
    bw = hbm_bandwidth(eng.device)
    res: dict[str, Any] = {
        "model": a.model,
        "device": torch.cuda.get_device_name() if eng.device.type == "cuda" else "cpu",
        "engine_config": eng.config.describe(),
        "trim_before_traces": a.trim,
        "hbm_bytes_per_s": bw,
        "weight_bytes_read": weight_bytes_read(eng.model),
        "kv_bytes_per_token": bpt,
        "decode": [],
        "traces": {},
    }
    for b in batches:
        if not a.keep_cache:  # each point from a clean cache (else: evicting the last's pages)
            eng.reset_prefix_cache()
        pt = decode_point(
            eng, b, a.context, a.steps, a.gpu_steps, bpt, res["weight_bytes_read"], bw
        )
        res["decode"].append(pt)
        print(f"[steps] decode b={b}: {pt['wall_ms_per_step']:.2f} ms/step", flush=True)
    if a.touch_slots:
        res["touched_slots"] = touch_slots(eng)
    for name, wl in zip(traces, wls, strict=True):
        eng.reset_prefix_cache(trim=a.trim)
        rows = trace_workload(eng, wl)
        if name in res["traces"]:  # traced again (e.g. with the page pool warm this time)
            name = f"{name}#{sum(k.split('#')[0] == name for k in res['traces']) + 1}"
        res["traces"][name] = {"summary": summarize_trace(rows), "rows": rows}
        print(f"[steps] trace {name}: {len(rows)} steps", flush=True)
    eng.close()
    print(format_report(res), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
        plot(res, Path(a.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
