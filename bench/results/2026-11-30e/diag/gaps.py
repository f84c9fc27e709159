"""Why does the GPU idle ~0.15-0.2 ms per decode step although the host runs a step ahead?
For each GPU idle gap between decode steps (dummy Llama-3-8B, `--batches`), this finds the
host side: the runtime call that issued the work after the gap (and how late), and the host
calls in progress when the GPU ran dry. Profiles `--steps` decode steps per batch with
torch.profiler, writes the chrome traces (gzipped) and a summary.
    PYTHONPATH=. python3 bench/results/2026-11-30e/diag/gaps.py --out DIR [--batches 1,8,32]
"""

import argparse
import gzip
import json
import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vtensor.engine import LLMEngine, SamplingParams

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def analyse(trace: dict, min_gap_us: float = 8.0) -> dict:
    ev = trace["traceEvents"]
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS and "dur" in e), key=lambda e: e["ts"])
    runtime = {e["args"].get("correlation"): e for e in ev
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}  # fmt: skip
    host = [e for e in ev if e.get("cat") in ("cpu_op", "python_function", "user_annotation",
                                              "cuda_runtime", "cuda_driver") and "dur" in e]
    host.sort(key=lambda e: e["ts"])
    gaps = []
    end, prev = None, None
    for e in gpu:
        if end is not None and e["ts"] - end > min_gap_us:
            launch = runtime.get(e.get("args", {}).get("correlation"))
            # host calls running when the GPU ran dry (innermost first: shortest span)
            at = [h for h in host if h["ts"] <= end <= h["ts"] + h["dur"]]
            at.sort(key=lambda h: h["dur"])
            gaps.append({
                "gap_us": round(e["ts"] - end, 1),
                "before": prev["name"][:50],
                "after": e["name"][:50],
                "issued_by": launch["name"] if launch else None,
                # > 0: the work was issued after the GPU ran dry (the GPU waited for the host)
                "issued_late_us": round(launch["ts"] - end, 1) if launch else None,
                "host_at_dry": [f"{h['name'][:60]} ({h['dur']:.0f} us)" for h in at[:6]],
            })
        if end is None or e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    by: dict[str, list[float]] = {}
    for g in gaps:
        key = f"{g['before'][:30]} -> {g['after'][:30]} | issued by {g['issued_by']}"
        by.setdefault(key, []).append(g["gap_us"])
    summary = sorted(((k, len(v), sum(v)) for k, v in by.items()), key=lambda t: -t[2])
    return {"gaps": gaps, "summary": [{"pair": k, "count": n, "us": round(t, 1)}
                                      for k, n, t in summary[:15]]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--engine-args", default="")
    p.add_argument("--model", default="llama-3-8b")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    kw = dict(x.split("=", 1) for x in a.engine_args.split(",") if x)
    kw = {k: (v == "true") if v in ("true", "false") else v for k, v in kw.items()}
    eng = LLMEngine(model=a.model, load_format="dummy", **kw)
    vocab = eng.model_config.vocab_size
    results = {}
    for b in (int(x) for x in a.batches.split(",")):
        rng = random.Random(b)
        params = SamplingParams(temperature=0.0, max_tokens=a.steps + 40, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"g{b}-{i}", [rng.randrange(1000, vocab) for _ in range(a.context)],
                            params)  # fmt: skip
        run = 0
        while run < 8:
            before = eng.counters["prefill_steps"]
            eng.step(finished_only=True)
            run = run + 1 if eng.counters["prefill_steps"] == before else 0
        torch.cuda.synchronize()
        path = os.path.join(a.out, f"trace_b{b}.json")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                eng.step(finished_only=True)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        with gzip.open(path + ".gz", "wt") as f:
            json.dump(trace, f)
        os.remove(path)
        res = analyse(trace)
        idle = sum(g["gap_us"] for g in res["gaps"])
        late = [g for g in res["gaps"] if (g["issued_late_us"] or 0) > 0]
        print(f"b={b}: wall {1e3 * wall / a.steps:.2f} ms/step (profiled), idle gaps "
              f"{idle / a.steps:.0f} us/step in {len(res['gaps'])} gaps, "
              f"{len(late)} issued after the GPU ran dry", flush=True)
        for s in res["summary"][:8]:
            print(f"   {s['us'] / a.steps:7.1f} us/step x{s['count']:3d}  {s['pair']}")
        for g in sorted(res["gaps"], key=lambda g: -g["gap_us"])[:4]:
            print(f"   gap {g['gap_us']} us, issued {g['issued_late_us']} us late by "
                  f"{g['issued_by']}; host at dry: {g['host_at_dry']}")
        results[b] = res
        for rid in list(eng.requests):
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step(finished_only=True)
    with open(os.path.join(a.out, "gaps.json"), "w") as f:
        json.dump(results, f, indent=1)
    eng.close()


if __name__ == "__main__":
    sys.exit(main())
