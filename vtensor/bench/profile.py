"""`vtensor bench profile`: where an engine step's time goes, so regressions show.

Runs a workload offline (dummy weights) and, over a window of steps in the middle of the run,
records with torch.profiler: wall time per step, GPU kernel time per step, the GPU-busy fraction
(union of kernel intervals / wall: how much of the time the GPU had work), kernels launched per
step and per layer, and the engine's own host timing (schedule / launch / process, and the time
blocked waiting for the GPU). Then, separately, launches per decoder layer in an eager decode
step (bench.fused.count_launches). On the CPU it runs (a smoke test) without kernel figures.

    python -m vtensor.bench.profile --model llama-3-8b --workload sharegpt --requests 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 10) -> dict[str, Any]:
    """GPU idle time between device activities [(start, end, name)], by the (before, after)
    pair it sits between: where the stream waits on the host, a copy or a launch."""
    idle, by_pair = 0.0, {}
    end, prev = float("inf"), ""
    for a, b, name in sorted(kernels):
        if a > end:
            key = f"{prev[:40]} -> {name[:40]}"
            n, t = by_pair.get(key, (0, 0.0))
            by_pair[key] = (n + 1, t + a - end)
            idle += a - end
        if end == float("inf") or b > end:
            end, prev = b, name
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1][1])[:top]
    top_pairs = [{"between": k, "count": n, "us": round(t, 1)} for k, (n, t) in pairs]
    return {"idle_us": round(idle, 1), "top": top_pairs}


def settled_window(steps: int) -> Any:
    """A profiler schedule that records one step unkept, then `steps` kept: call prof.step()
    once after the first engine step. Starting CUPTI stalls the host for ~1 ms; inside the
    window that showed as idle GPU in front of the first step (2026-11-30c's "0.35 ms idle per
    decode step" was that, bench/results/2026-11-30e/diag/gaps.py)."""
    from torch.profiler import schedule

    return schedule(wait=0, warmup=1, active=max(1, steps), repeat=1)


def kernel_stats(events: list[Any], wall_us: float, top: int = 12) -> dict[str, Any]:
    """GPU kernel figures from profiler events (FunctionEvent-like: device_type, name,
    time_range.start/end in us): the `top` kernels by time with their call counts, and the
    idle gaps between device activities."""
    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    busy = _busy_union(spans)
    by_name: dict[str, tuple[int, float]] = {}
    for e in kernels:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.time_range.end - e.time_range.start)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "num_kernels": len(kernels),
        "kernel_time_us": sum(b - a for a, b in spans),
        "gpu_busy_us": busy,
        "gpu_busy_fraction": busy / wall_us if wall_us > 0 else None,
        "top_kernels_us": [{"name": n[:100], "calls": c, "us": round(t, 1)}
                           for n, (c, t) in ranked],  # fmt: skip
        "gaps": idle_gaps([(*sp, e.name) for sp, e in zip(spans, kernels, strict=True)]),
    }


def host_op_stats(prof: Any, top: int = 15, stacks: bool = False) -> list[dict[str, Any]]:
    """The host calls that took the window's CPU time (self time: a blocking runtime call such
    as cudaStreamSynchronize or cudaFree shows here, not in its caller). stacks: the profile
    recorded Python frames; each entry then also gives the vtensor call chains of its calls,
    heaviest first."""
    avgs = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
    chains: dict[str, dict[str, float]] = {}
    if stacks:
        names = {a.key for a in avgs}
        for e in prof.events():
            if e.name not in names:
                continue
            frames, p = [], e.cpu_parent
            while p is not None:
                if "vtensor/" in p.name:
                    frames.append(p.name.split("vtensor/", 1)[1][:70])
                p = p.cpu_parent
            key = " < ".join(frames[:6])
            by = chains.setdefault(e.name, {})
            by[key] = by.get(key, 0.0) + e.self_cpu_time_total / 1e3
    out = []
    for a in avgs:
        ms = round(a.self_cpu_time_total / 1e3, 2)
        row: dict[str, Any] = {"name": a.key[:80], "calls": a.count, "self_ms": ms}
        if stacks:
            top3 = sorted(chains.get(a.key, {}).items(), key=lambda kv: -kv[1])[:3]
            row["stacks"] = [{"ms": round(t, 2), "chain": c} for c, t in top3]
        out.append(row)
    return out


def profile_run(
    model: str,
    workload: str,
    num_requests: int,
    warmup_steps: int,
    window_steps: int,
    engine_kw: dict[str, Any],
    stacks: bool = False,
) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from vtensor.bench import workloads as W
    from vtensor.engine import LLMEngine, SamplingParams

    wl = W.GENERATORS[workload](num_requests, seed=0) if workload == "sharegpt" else (
        W.GENERATORS[workload](seed=0))  # fmt: skip
    if wl.multi_turn:
        raise SystemExit("profile runs single-shot workloads (sharegpt, shared_prefix, ...)")
    max_len = wl.max_context() + 8
    kw = dict(model=model, load_format="dummy", dtype="bfloat16", max_model_len=max_len)
    kw.update(engine_kw)
    t0 = time.perf_counter()
    eng = LLMEngine(**kw)
    startup_s = time.perf_counter() - t0
    for r in wl.requests:
        p = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        eng.add_request(r.request_id, r.prompt_token_ids, p)
    cuda = eng.device.type == "cuda"
    for _ in range(warmup_steps):
        eng.step(finished_only=True)
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    steps = 0
    with profile(activities=acts, with_stack=stacks, schedule=settled_window(window_steps)) as prof:
        if eng.has_unfinished_requests():
            eng.step(finished_only=True)  # the profiler's start-up stalls land in this step
        prof.step()
        before = dict(eng.counters), dict(eng.timing)
        t1 = time.perf_counter()
        while steps < window_steps and eng.has_unfinished_requests():
            eng.step(finished_only=True)
            steps += 1
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t1
    delta = {k: eng.counters[k] - before[0][k] for k in eng.counters}
    timing = {k: eng.timing[k] - before[1][k] for k in eng.timing}
    for rid in list(eng.requests):  # the rest of the run is not measured: end it now
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step(finished_only=True)
    layers = eng.model_config.num_layers
    res: dict[str, Any] = {
        "model": model, "workload": workload, "num_requests": len(wl.requests),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "engine_config": eng.config.describe(),
        "startup_s": startup_s, "window_steps": steps, "wall_s": wall,
        "wall_ms_per_step": 1e3 * wall / max(steps, 1),
        "tokens_per_step": {
            "generated": delta["generation_tokens"] / max(steps, 1),
            "prompt": delta["prompt_tokens_computed"] / max(steps, 1),
        },
        "decode_steps": delta["decode_steps"], "prefill_steps": delta["prefill_steps"],
        "host_ms_per_step": {k[:-2]: 1e3 * v / max(steps, 1) for k, v in timing.items()},
    }  # fmt: skip
    res["host_ops"] = host_op_stats(prof, stacks=stacks)
    if cuda:
        ks = kernel_stats(list(prof.events()), wall * 1e6)
        ks["gpu_ms_per_step"] = ks["kernel_time_us"] / 1e3 / max(steps, 1)
        ks["kernels_per_step"] = ks["num_kernels"] / max(steps, 1)
        ks["kernels_per_layer_step"] = ks["kernels_per_step"] / layers
        res["gpu"] = ks
    eng.close()
    return res


def format_report(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']} / {res['workload']} ({res['num_requests']} req) on {res['device']}: "
        f"{res['window_steps']} steps profiled ({res['decode_steps']} decode, "
        f"{res['prefill_steps']} with prefill)",
        f"  wall {res['wall_ms_per_step']:.2f} ms/step; tokens/step: "
        f"{res['tokens_per_step']['generated']:.0f} generated, "
        f"{res['tokens_per_step']['prompt']:.0f} prompt",
        "  host ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in res["host_ms_per_step"].items()),
    ]
    if res.get("host_ops"):
        ops = res["host_ops"][:5]
        lines.append("  host self time: " + "; ".join(
            f"{o['name'][:32]} {o['self_ms']:.1f} ms x{o['calls']}" for o in ops))  # fmt: skip
    g = res.get("gpu")
    if g:
        lines += [
            f"  GPU kernel time {g['gpu_ms_per_step']:.2f} ms/step, busy "
            f"{100 * g['gpu_busy_fraction']:.1f}% of wall; {g['kernels_per_step']:.0f} "
            f"kernels/step ({g['kernels_per_layer_step']:.1f} per layer)",
            "  top kernels: " + "; ".join(
                f"{k['name'][:40]} {k['us'] / 1e3:.1f} ms" for k in g["top_kernels_us"][:5]),
        ]  # fmt: skip
    lp = res.get("launches")
    if lp and lp.get("launches_per_layer", {}).get("median") is not None:
        lines.append(
            f"  eager decode, batch {lp['batch']}: "
            f"{lp['launches_per_layer']['median']} launches per decoder layer"
        )
    return "\n".join(lines)


def engine_kwargs(text: str, layers: int | None = None) -> dict[str, Any]:
    """`--engine-args k=v,...` (ints and true/false converted) and `--layers N` -> LLMEngine
    keyword arguments."""
    kw: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        kw[k] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v.lower(), v)
    if layers:
        kw["config_overrides"] = {"num_layers": layers}
    return kw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vtensor bench profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="dummy-weight preset")
    p.add_argument("--workload", default="sharegpt", help="single-shot workload of bench")
    p.add_argument("--requests", type=int, default=512, help="requests (sharegpt)")
    p.add_argument("--warmup-steps", type=int, default=30, help="steps before the window")
    p.add_argument("--steps", type=int, default=60, help="steps profiled")
    p.add_argument("--engine-args", default="", help="k=v,... passed to the engine")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    p.add_argument("--no-launches", action="store_true", help="skip the per-layer count")
    p.add_argument("--stacks", action="store_true",
                   help="Python stacks in host_ops, to find what blocks")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    kw = engine_kwargs(a.engine_args, a.layers)
    res = profile_run(a.model, a.workload, a.requests, a.warmup_steps, a.steps, kw, a.stacks)
    if not a.no_launches and torch.cuda.is_available():
        from vtensor.bench.fused import count_launches

        res["launches"] = count_launches(a.model)
    print(format_report(res), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
