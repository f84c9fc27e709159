"""Fused layer ops on CUDA: GB/s of each Triton kernel vs the unfused torch sequence it
replaces, and CUDA launches per decoder layer in one eager decode step of a dummy model.

    python -m vtensor.bench.fused kernels [--out FILE]      # Llama-3-8B shapes, bf16
    python -m vtensor.bench.fused launches [--batch 32]     # dummy llama-3-8b, enforce_eager

GB/s counts the bytes an op must move at least (each input read once, each output written
once), so the fused and unfused columns are comparable: the unfused one pays for its
intermediates in time only. Launch counting needs eager decode (graph replays run no Python
hooks): each DecoderLayer call is wrapped in a profiler range and the kernel launches (runtime
and driver API, Triton's included) whose CPU start falls in the range are counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from vtensor.ops import fused

# Llama-3-8B
HIDDEN, INTER, HQ, HK, D, EPS = 4096, 14336, 32, 8, 128, 1e-5
TOKENS = (1, 32, 256, 1024, 8192)  # decode batches up to a prefill chunk


def _time_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))  # flushes L2 between runs: DRAM bandwidth


def _row(op: str, n: int, nbytes: int, fused_fn, torch_fn) -> dict[str, Any]:
    t_f, t_t = _time_ms(fused_fn), _time_ms(torch_fn)
    return {
        "op": op, "tokens": n, "bytes": nbytes,
        "fused_us": round(t_f * 1e3, 2), "torch_us": round(t_t * 1e3, 2),
        "fused_gbs": round(nbytes / t_f / 1e6, 1), "torch_gbs": round(nbytes / t_t / 1e6, 1),
        "speedup": round(t_t / t_f, 2),
    }  # fmt: skip


def bench_kernels(tokens: tuple[int, ...] = TOKENS, dtype: torch.dtype = torch.bfloat16):
    """One row per (op, tokens): fused Triton vs unfused torch, time and GB/s."""
    dev, es = "cuda", torch.empty(0, dtype=dtype).element_size()
    rows = []
    for n in tokens:
        x = torch.randn(n, HIDDEN, device=dev, dtype=dtype)
        res = torch.randn(n, HIDDEN, device=dev, dtype=dtype)
        w = torch.randn(HIDDEN, device=dev, dtype=dtype)
        rows.append(_row(
            "add_rms_norm", n, (4 * n * HIDDEN + HIDDEN) * es,
            lambda x=x, res=res, w=w: fused.fused_add_rms_norm(x, res, w, EPS),
            lambda x=x, res=res, w=w: fused.fused_add_rms_norm_torch(x, res, w, EPS),
        ))  # fmt: skip
        rows.append(_row(
            "rms_norm", n, (2 * n * HIDDEN + HIDDEN) * es,
            lambda x=x, w=w: fused.rms_norm(x, w, EPS),
            lambda x=x, w=w: fused.rms_norm_torch(x, w, EPS),
        ))  # fmt: skip
        gu = torch.randn(n, 2 * INTER, device=dev, dtype=dtype)
        rows.append(_row(
            "silu_mul", n, 3 * n * INTER * es,
            lambda gu=gu: fused.silu_mul(gu), lambda gu=gu: fused.silu_mul_torch(gu),
        ))  # fmt: skip
        rows.append(_rope_row(n, dtype))
        del x, res, gu
    return rows


def _rope_row(n: int, dtype: torch.dtype) -> dict[str, Any]:
    dev, es = "cuda", torch.empty(0, dtype=dtype).element_size()
    qkv = torch.randn(n, (HQ + 2 * HK) * D, device=dev, dtype=dtype)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    q, k, v = q.view(n, HQ, D), k.view(n, HK, D), v.view(n, HK, D)
    max_pos = 8192
    cos = torch.randn(max_pos, D // 2, device=dev, dtype=dtype)
    sin = torch.randn(max_pos, D // 2, device=dev, dtype=dtype)
    pos = torch.randint(0, max_pos, (n,), device=dev)
    # the engine's layout: [slots, tokens, layers, 2, Hk, D], one layer's views
    slots = max(n, 1)
    tok = 64
    base = torch.empty(slots, tok, 2, 2, HK, D, device=dev, dtype=dtype)
    kc, vc = base[:, :, 1, 0], base[:, :, 1, 1]
    da = torch.randperm(slots, device=dev)[:n].to(torch.int32)
    db = torch.randint(0, tok, (n,), device=dev, dtype=torch.int32)
    nbytes = n * D * (2 * HQ + 4 * HK + 1) * es  # q,k,v + cos,sin in; q_rot, k, v out
    args = (q, k, v, pos, cos, sin, kc, vc, da, db)
    return _row(
        "rope_store_kv", n, nbytes,
        lambda: fused.rope_store_kv(*args), lambda: fused.rope_store_kv_torch(*args),
    )  # fmt: skip


# ---- launches per layer ----

_LAUNCH_NAMES = ("LaunchKernel", "cuLaunch", "cudaGraphLaunch")  # runtime + driver (Triton)
_COPY_NAMES = ("MemcpyAsync", "MemsetAsync")


def count_launches(
    model: str = "llama-3-8b", batch: int = 32, prompt_len: int = 64, **engine_kw: Any
) -> dict[str, Any]:
    """Launches per DecoderLayer call in eager decode steps of `model` (dummy weights).

    Runs prompts of `prompt_len` tokens for 3 output tokens; layer calls with `batch` rows
    are decode calls. Returns per-layer launches (median, min, max), the kernel names of one
    decode layer call, and all GPU kernels of the profiled run (a cross-check). On the CPU it
    runs (a smoke test of this function) and counts nothing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from vtensor import LLM, SamplingParams
    from vtensor.model.llama import DecoderLayer

    kw = dict(dtype="bfloat16", load_format="dummy", enforce_eager=True, max_model_len=1024)
    kw.update(engine_kw)
    llm = LLM(model, **kw)
    net = llm.llm_engine.model
    ranges: list[Any] = []

    def pre(mod: torch.nn.Module, args: tuple) -> None:
        rows = args[1].shape[0]  # forward(positions, x, residual)
        rf = record_function(f"vtensor_layer rows={rows}")
        rf.__enter__()
        ranges.append(rf)

    def post(mod: torch.nn.Module, args: tuple, out: Any) -> None:
        ranges.pop().__exit__(None, None, None)

    hooks = []
    for m in net.modules():
        if isinstance(m, DecoderLayer):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up: Triton compiles, cuBLAS heuristics
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    try:
        with profile(activities=acts) as prof:
            llm.generate(prompts, params)
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
        llm.close()
    events = list(prof.events())
    want = f"vtensor_layer rows={batch}"
    layers = sorted((e for e in events if e.name == want), key=lambda e: e.time_range.start)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    launches = [e for e in cpu if any(s in e.name for s in _LAUNCH_NAMES)]
    copies = [e for e in cpu if any(s in e.name for s in _COPY_NAMES)]
    kernel_of = {e.id: e.name for e in events if e.device_type == DeviceType.CUDA}
    counts, copy_counts, names = [], [], []
    for lay in layers:
        inside = _within(lay, launches)
        counts.append(len(inside))
        copy_counts.append(len(_within(lay, copies)))
        if not names:  # a runtime call and its kernel share the CUPTI correlation id
            names = [kernel_of.get(e.id, e.name)[:90] for e in inside]
    cfg = net.config
    return {
        "model": model, "batch": batch, "num_layers": cfg.num_layers,
        "decode_layer_calls": len(layers),
        "launches_per_layer": {
            "median": statistics.median(counts) if counts else None,
            "min": min(counts, default=None), "max": max(counts, default=None),
        },
        "copies_per_layer_max": max(copy_counts, default=None),
        "first_layer_call_kernels": names,
        "gpu_kernels_whole_run": len(kernel_of),
    }  # fmt: skip


def _within(lay: Any, calls: list[Any]) -> list[Any]:
    """Calls whose CPU start lies in the layer's range, on its thread when threads match
    (CUPTI runtime events may carry another thread id than the profiler's own ranges)."""
    inside = [c for c in calls if lay.time_range.start <= c.time_range.start <= lay.time_range.end]
    same = [c for c in inside if c.thread == lay.thread]
    return same or inside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.fused")
    p.add_argument("what", choices=["kernels", "launches", "all"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs CUDA")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    if a.what in ("kernels", "all"):
        result["kernels"] = bench_kernels()
        for r in result["kernels"]:
            print(f"{r['op']:>14} n={r['tokens']:>5}  fused {r['fused_us']:>8} us "
                  f"{r['fused_gbs']:>7} GB/s | torch {r['torch_us']:>8} us "
                  f"{r['torch_gbs']:>7} GB/s | x{r['speedup']}")  # fmt: skip
    if a.what in ("launches", "all"):
        result["launches"] = count_launches(a.model, a.batch)
        print(json.dumps(result["launches"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
