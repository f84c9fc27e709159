"""Offline throughput: N requests with ShareGPT-like lengths through kv=virtual, kv=paged and
HF transformers `generate`, in one run; tokens/s and peak GPU memory per system, JSON out.

    python -m vtensor.bench.throughput --out throughput.json        # H200: dummy Llama-3-8B
    python -m vtensor.bench.throughput --quick --out /tmp/t.json    # CPU smoke test (seconds)

Every request is greedy with EOS ignored, so each system does exactly the same work and
virtual / paged must produce the same tokens (reported as `same_tokens`). Memory: the device's
used memory (mem_get_info, sampled during the run, minus what was used before the system was
built), torch's peak allocation, and the KV cache's peak physical bytes (virtual KV pages come
from the driver, outside torch's allocator, so torch's number alone would flatter them).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time

import torch

PRESETS_DUMMY = ("llama-3-8b", "llama-3.1-8b", "llama-3.2-1b", "llama-2-7b", "mistral-7b",
                 "qwen2.5-7b", "qwen3-8b", "smollm2-135m")  # fmt: skip


def make_workload(n: int, len_scale: float, max_input: int, max_output: int, seed: int):
    from vtensor.bench.workloads import sharegpt

    wl = sharegpt(n, seed=seed, len_scale=len_scale)
    prompts = [r.prompt_token_ids[:max_input] for r in wl.requests]
    outs = [max(1, min(r.max_tokens, max_output)) for r in wl.requests]
    return prompts, outs


def _device_used(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(dev)
    return total - free


def _clean(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def run_engine(kv: str, args, prompts, max_tokens, dev, preloaded=None) -> dict:
    """One engine run. `preloaded` (model, config, tokenizer) skips a second model load; its
    weights are then already in `base`, so they are added back to the memory figure."""
    from tqdm import tqdm

    from vtensor.engine import LLM, SamplingParams

    _clean(dev)
    base = _device_used(dev)
    weights = 0
    if preloaded is not None:
        weights = sum(p.numel() * p.element_size() for p in preloaded[0].parameters())
        base -= weights if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=str(dev),
              kv=kv, kv_memory=args.kv_memory, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
              preloaded=preloaded)  # fmt: skip
    load_s = time.perf_counter() - t0
    eng = llm.llm_engine
    # warm-up (kernels, autotuning, allocator) outside the timed run
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"{kv}-{i}", p, sp)
    out_ids: dict[str, list[int]] = {}
    peak_used, peak_kv, steps = base, 0, 0
    deadline = None if args.time_cap is None else time.perf_counter() + args.time_cap
    complete = True
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"kv={kv}", unit="req", file=sys.stderr) as bar:
        while eng.has_unfinished_requests():
            if deadline is not None and time.perf_counter() > deadline:
                complete = False
                for i in range(len(prompts)):
                    eng.abort_request(f"{kv}-{i}")
            for o in eng.step(finished_only=True):
                if o.finished:
                    out_ids[o.request_id] = o.outputs[0].token_ids
                    bar.update(1)
            steps += 1
            if steps % 16 == 0:
                peak_used = max(peak_used, _device_used(dev))
                peak_kv = max(peak_kv, int(eng.kv_cache.snapshot().get("bytes_physical", 0)))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t1
    peak_used = max(peak_used, _device_used(dev))
    snap = eng.kv_cache.snapshot()
    peak_kv = max(peak_kv, int(snap.get("bytes_physical", 0)))
    ids = [out_ids.get(f"{kv}-{i}", []) for i in range(len(prompts))]
    n_out = sum(len(x) for x in ids)
    res = {
        "system": f"vtensor kv={kv}", "complete": complete, "load_s": round(load_s, 2),
        "weights_shared_with_previous_run": preloaded is not None,
        "elapsed_s": round(dt, 3), "requests": len(prompts), "output_tokens": n_out,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens_per_s": n_out / dt, "total_tokens_per_s": (n_out + eng.counters[
            "prompt_tokens_computed"]) / dt,
        "steps": eng.counters["steps"], "preemptions": eng.scheduler.num_preemptions,
        "cuda_graphs": len(eng.runner.graphs), "graph_capture_s": round(eng.runner.capture_s, 2),
        "peak_device_used_bytes": peak_used - base,
        "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
        else 0,
        "kv_peak_physical_bytes": peak_kv, "kv_snapshot": snap,
    }  # fmt: skip
    res["_model"] = (eng.model, eng.model_config, eng.tokenizer)
    llm.close()
    del llm, eng
    _clean(dev)
    res["_ids"] = ids
    return res


def run_hf(args, prompts, max_tokens, dev) -> dict:
    from tqdm import tqdm

    from vtensor.bench.hf_runner import HFRunner

    n = min(len(prompts), args.hf_requests)
    prompts, max_tokens = prompts[:n], max_tokens[:n]
    _clean(dev)
    base = _device_used(dev)
    t0 = time.perf_counter()
    hf = HFRunner(args.model, dtype=args.dtype, device=str(dev), load_format=args.load_format)
    load_s = time.perf_counter() - t0
    hf.generate([prompts[0][:16]], [2], batch_size=1)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    with tqdm(total=n, desc="hf generate", unit="req", file=sys.stderr) as bar:
        ids = hf.generate(prompts, max_tokens, batch_size=args.hf_batch_size, bar=bar)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t1
    n_out = sum(len(x) for x in ids)
    res = {
        "system": "hf transformers generate", "complete": True, "load_s": round(load_s, 2),
        "elapsed_s": round(dt, 3), "requests": n, "output_tokens": n_out,
        "prompt_tokens": sum(map(len, prompts)), "output_tokens_per_s": n_out / dt,
        "batch_size": args.hf_batch_size,
        "peak_device_used_bytes": max(_device_used(dev) - base, 0),
        "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
        else 0,
        "note": "static padded batches; a subset of the requests (HF is slow)" if n < args.n
        else "static padded batches",
    }  # fmt: skip
    hf.close()
    del hf
    _clean(dev)
    return res


def run_vllm(args, prompts, max_tokens, dev) -> dict:
    """vLLM 0.26 in its own process (vllm_system.py) on the same requests; {"skipped": why}
    where it cannot run."""
    import os
    import tempfile

    from vtensor.bench.systems import model_dir
    from vtensor.bench.vllm_system import run_offline_subprocess, vllm_unavailable
    from vtensor.bench.workloads import Request, Workload
    from vtensor.model import PRESETS

    why = vllm_unavailable()
    if why is None and args.load_format == "dummy" and args.model in PRESETS:
        folder = model_dir(args.model, PRESETS[args.model], args.max_model_len)
    elif why is None and args.model and os.path.isdir(args.model):
        folder = args.model
    elif why is None:
        why = "vllm: skipped, needs an HF folder or a dummy preset (not the embedded GGUF)"
    if why:
        return {"skipped": why}
    pairs = zip(prompts, max_tokens, strict=True)
    reqs = [Request(f"r{i}", p, m) for i, (p, m) in enumerate(pairs)]
    wl = Workload("throughput", "sharegpt-like", reqs)
    base = _device_used(dev)  # this process's own context: not vLLM's
    with tempfile.TemporaryDirectory() as tmp:
        res = run_offline_subprocess(folder, [wl], max_model_len=args.max_model_len,
                                     out_path=os.path.join(tmp, "vllm.json"),
                                     timeout=(args.time_cap or 1200) + 180,
                                     dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                                     load_format=args.load_format)  # fmt: skip
    r = res.get("workloads", {}).get("throughput")
    if not r or "error" in r:
        return {"skipped": "; ".join(res.get("notes", [])) or (r or {}).get("error", "failed")}
    peak = (r.get("memory") or {}).get("device_used_peak") or 0
    return {
        "system": f"vllm {res.get('version')}", "complete": r["complete"],
        "load_s": res.get("startup_s"), "elapsed_s": round(r["elapsed_s"], 3),
        "requests": len(prompts), "output_tokens": r["output_tokens"],
        "prompt_tokens": r["prompt_tokens"], "output_tokens_per_s": r["output_tokens_per_s"],
        "peak_device_used_bytes": max(peak - base, 0), "config": res.get("config", {}),
        "notes": res.get("notes", []),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default=None, help="default: llama-3-8b (dummy) on CUDA, the "
                   "embedded SmolLM2 otherwise; 'embedded' for the embedded model")  # fmt: skip
    p.add_argument("--load-format", default=None, help="default: dummy for presets, else auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("-n", "--num-requests", dest="n", type=int, default=256)
    p.add_argument("--len-scale", type=float, default=1.0, help="scale ShareGPT-like lengths")
    p.add_argument("--max-input", type=int, default=1024, help="cap on prompt tokens")
    p.add_argument("--max-output", type=int, default=512, help="cap on output tokens")
    p.add_argument("--systems", default="virtual,paged,hf")
    p.add_argument("--hf-requests", type=int, default=64, help="requests given to HF generate")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--kv-memory", default=None, help="KV budget for both KV modes")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--time-cap", type=float, default=None, help="seconds per engine run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized run (seconds)")
    p.add_argument("--out", default=None, help="JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from vtensor.model import resolve_device

    args = parse_args(argv)
    dev = resolve_device(args.device)
    if args.model is None:
        args.model = "llama-3-8b" if dev.type == "cuda" and not args.quick else "embedded"
    if args.model in ("embedded", "default"):
        args.model = None
    if args.load_format is None:
        args.load_format = "dummy" if args.model in PRESETS_DUMMY else "auto"
    if args.quick:
        args.n, args.len_scale = min(args.n, 8), min(args.len_scale, 0.1)
        args.max_output, args.hf_requests = min(args.max_output, 8), min(args.hf_requests, 4)
        args.max_input = min(args.max_input, 128)
    if args.max_model_len is None:
        args.max_model_len = args.max_input + args.max_output + 16
    prompts, max_tokens = make_workload(
        args.n, args.len_scale, args.max_input, args.max_output, args.seed
    )
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = set(systems) - {"virtual", "paged", "hf", "vllm"}
    if bad:
        print(f"unknown systems {sorted(bad)} (use virtual, paged, hf, vllm)", file=sys.stderr)
        return 2
    # vLLM takes 90% of the GPU at start: it runs last, after this process let go of its model
    systems = [s for s in systems if s != "vllm"] + (["vllm"] if "vllm" in systems else [])
    skipped: dict[str, str] = {}
    results: dict[str, dict] = {}
    loaded = None  # both KV modes share one loaded model
    for s in systems:
        print(f"[throughput] {s}: {len(prompts)} requests", file=sys.stderr)
        if s == "vllm":
            loaded = None
            for r in results.values():
                r.pop("_model", None)
            _clean(dev)
            got = run_vllm(args, prompts, max_tokens, dev)
            if "skipped" in got:
                skipped[s] = got["skipped"]
                print(f"[throughput] {got['skipped']}", file=sys.stderr)
            else:
                results[s] = got
        elif s == "hf":
            loaded = None  # free the engine's weights before HF loads its own
            for r in results.values():
                r.pop("_model", None)
            _clean(dev)
            results[s] = run_hf(args, prompts, max_tokens, dev)
        else:
            results[s] = run_engine(s, args, prompts, max_tokens, dev, loaded)
            loaded = results[s].pop("_model")
    same = None
    if "virtual" in results and "paged" in results:
        same = results["virtual"]["_ids"] == results["paged"]["_ids"]
    for r in results.values():
        r.pop("_ids", None)

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[b].get(key):
            return results[a][key] / results[b][key]
        return None

    report = {
        "bench": "throughput",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        or "cpu",
        "torch": torch.__version__,
        "model": args.model or "embedded SmolLM2-135M-Instruct (GGUF)",
        "load_format": args.load_format,
        "workload": {
            "kind": "sharegpt-like", "requests": len(prompts), "len_scale": args.len_scale,
            "max_input": args.max_input, "max_output": args.max_output, "seed": args.seed,
            "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(max_tokens),
        },
        "systems": results,
        "same_tokens_virtual_paged": same,
        "skipped": skipped,
        "ratios": {
            "tokens_per_s_virtual_vs_paged": ratio("virtual", "paged", "output_tokens_per_s"),
            "tokens_per_s_virtual_vs_hf": ratio("virtual", "hf", "output_tokens_per_s"),
            "tokens_per_s_virtual_vs_vllm": ratio("virtual", "vllm", "output_tokens_per_s"),
            "peak_device_mem_vllm_vs_virtual": ratio("vllm", "virtual",
                                                     "peak_device_used_bytes"),
            "peak_device_mem_paged_vs_virtual": ratio("paged", "virtual",
                                                      "peak_device_used_bytes"),
        },
    }  # fmt: skip
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    for name, r in results.items():
        print(f"{name:8s} {r['output_tokens_per_s']:10.1f} out tok/s  "
              f"peak dev mem {r['peak_device_used_bytes'] / 2**30:6.2f} GiB  "
              f"({r['requests']} req, {r['elapsed_s']:.1f} s)", file=sys.stderr)  # fmt: skip
    if same is False:
        print("WARNING: kv=virtual and kv=paged produced different tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
