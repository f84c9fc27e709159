"""Attention kernel benchmark: virtual-contiguous KV vs paged baselines (Llama-3-8B shapes, bf16).

    python -m vtensor.bench.kernels --out DIR [--quick]

1. HBM read bandwidth, measured in this run by a read-only Triton kernel (the roofline).
2. decode, batch x context: GB/s of KV read and its fraction of (1) for ours (auto), our
   split-K Triton kernel, FA2 varlen on the virtual views, the same Triton kernel on a
   block-table layout (block 16) and FlexAttention's paged attention (subset of points: it
   compiles per shape). Virtual and paged runs read the SAME buffer: paged through a random
   block permutation (a fragmented pool), virtual through shuffled slot ids.
3. prefix-prefill, prefix x new x batch: TFLOP/s of FA2 on the virtual views, our Triton
   kernel, the Triton kernel on the paged layout, and FA2 on densely packed copies (ceiling).
4. a small config sweep of the Triton kernels (both layouts, same configs) on two shapes.
Writes kernels_h200.json (or kernels_<gpu>.json), kernels_decode.png, kernels_prefill.png.
Timings: median of CUDA-graph replays with L2 flushed before each (eager if capture fails).
Decode is timed as the engine runs it: one graph holds the call for L "layers", each over its
own buffer (L = 256 MiB / KV bytes, 1..8, so small caches are not served from L2), and the
time per call is the graph's time / L; all contenders get the same treatment. One layer's
cache is [slots, tokens, 2, kv_heads, dim] (token-major, K/V interleaved per token; more
layers only grow the token stride).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import UTC, datetime
from functools import partial

import torch

HQ, HKV, D = 32, 8, 128  # Llama-3-8B
DT = torch.bfloat16
BS = 16
T0 = time.time()


def _log(msg: str) -> None:
    print(f"[bench.kernels {time.time() - T0:6.1f}s] {msg}", flush=True)


_FLUSH: torch.Tensor | None = None


def _time_ms(fn, graph: bool = True) -> tuple[float, str]:
    """Median ms of fn with the L2 flushed before each run (as triton's do_bench does), replayed
    from a CUDA graph when it captures (no launch overhead), else called eagerly."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024**2, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    run, how = fn, "eager"
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run, how = g.replay, "cudagraph"
        except Exception as e:  # noqa: BLE001 - capture can fail (e.g. compiled flex)
            torch.cuda.synchronize()
            how = f"eager (capture failed: {type(e).__name__}: {str(e)[:160]})"
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / 3
    n = max(5, min(100, int(0.03 / max(est, 1e-6))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(n)]  # fmt: skip
    for a, b in ev:
        _FLUSH.zero_()
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2], how


def measure_hbm_read() -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def _read(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + pid, tl.sum(x.to(tl.float32)))

    x = torch.randn(2 * 1024**3 // 2, dtype=DT, device="cuda")  # 2 GiB
    best = 0.0
    for block in (2048, 4096, 8192):
        grid = triton.cdiv(x.numel(), block)
        out = torch.empty(grid, dtype=torch.float32, device="cuda")
        ms, _ = _time_ms(partial(_read[(grid,)], x, out, x.numel(), BLOCK=block))
        best = max(best, x.numel() * 2 / ms / 1e6)
    return {"read_gbps": best, "bytes": 2 * 1024**3}


class DecodeCase:
    def __init__(self, b: int, ctx: int, seed: int = 0) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.b, self.ctx = b, ctx
        self.buf = torch.empty(b, ctx, 2, HKV, D, dtype=DT, device="cuda")
        self.buf.normal_(generator=g)
        self.k, self.v = self.buf[:, :, 0], self.buf[:, :, 1]
        self.slots = torch.randperm(b, device="cuda", generator=g).to(torch.int32)
        nblk = b * ctx // BS
        blocks = self.buf.view(nblk, BS, 2, HKV, D)
        self.kb, self.vb = blocks[:, :, 0], blocks[:, :, 1]
        perm = torch.randperm(nblk, device="cuda", generator=g).to(torch.int32)
        self.table = perm.view(b, ctx // BS)
        self.lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        self.q = torch.randn(b, HQ, D, dtype=DT, device="cuda", generator=g)
        self.kv_bytes = b * ctx * 2 * HKV * D * 2


def decode_cases(b: int, ctx: int) -> list[DecodeCase]:
    """One case per "layer" of a timed graph: L = 256 MiB / KV bytes (1..8) separate buffers,
    so small caches are not served from L2."""
    one = b * ctx * 2 * HKV * D * 2
    layers = max(1, min(8, math.ceil(256 * 1024**2 / one)))
    return [DecodeCase(b, ctx, seed=i) for i in range(layers)]


def gpu_tag() -> str:
    """Short GPU name for result file names (kernels_h200.json)."""
    name = torch.cuda.get_device_name()
    return "h200" if "H200" in name else name.split()[-1].lower()


def _flex_decode(case: DecodeCase):
    """FlexAttention paged decode (torch.nn.attention.experimental._paged_attention)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask

    b, ctx = case.b, case.ctx
    n_pages = b * ctx // BS
    pa = PagedAttention(n_pages, BS, b, device="cuda")
    for i in range(b):
        pa.reserve(torch.tensor(i, device="cuda"), torch.tensor(ctx, device="cuda"))
    kc = torch.randn(1, HKV, n_pages * BS, D, dtype=DT, device="cuda")
    vc = torch.randn(1, HKV, n_pages * BS, D, dtype=DT, device="cuda")
    logical = create_block_mask(noop_mask, b, None, 1, ctx, device="cuda", BLOCK_SIZE=(16, BS))
    mask = pa.convert_logical_block_mask(logical)
    q = case.q.unsqueeze(2)  # [b, HQ, 1, D]
    fn = torch.compile(flex_attention, dynamic=False)
    opts = {"BLOCK_N": BS}

    def run():
        return fn(q, kc, vc, block_mask=mask, enable_gqa=True, kernel_options=opts)

    return run


def _over(call, cases: list) -> None:
    for x in cases:
        call(x)


def bench_decode(quick: bool, hbm: float) -> list[dict]:
    from vtensor import ops
    from vtensor.ops import paged

    batches = [1, 8, 32, 128] if quick else [1, 4, 8, 32, 64, 128, 256]
    ctxs = [2048, 8192, 32768] if quick else [512, 2048, 4096, 8192, 16384, 32768]
    flex_points = {(1, 16384), (8, 8192), (32, 4096), (128, 4096)}
    flex_budget_s = 45.0
    flex_spent = 0.0
    rows = []
    for ctx in ctxs:
        for b in batches:
            if b * ctx * 4096 > 60e9:
                continue
            cases = decode_cases(b, ctx)
            layers = len(cases)
            c = cases[0]
            kw = dict(seq_lens=c.lens, max_seq_len=ctx, scale=D**-0.5)

            per_case = {
                "ours": lambda x, kw=kw: ops.decode_attention(
                    x.q, x.k, x.v, slot_ids=x.slots, **kw
                ),
                "triton": lambda x, kw=kw: ops.decode_attention(
                    x.q, x.k, x.v, slot_ids=x.slots, backend="triton", **kw
                ),
                "fa2_virtual": lambda x, kw=kw: ops.decode_attention(
                    x.q, x.k, x.v, slot_ids=x.slots, backend="flash", **kw
                ),
                "paged_triton": lambda x, kw=kw: paged.paged_decode_attention(
                    x.q, x.kb, x.vb, block_table=x.table, **kw
                ),
            }
            fns = {n: partial(_over, f, cases) for n, f in per_case.items()}
            row = {"batch": b, "ctx": ctx, "kv_bytes": c.kv_bytes, "layers": layers}
            for name, fn in fns.items():
                try:
                    ms, how = _time_ms(fn)
                    ms /= layers
                    row[name] = {"ms": ms, "gbps": c.kv_bytes / ms / 1e6, "timing": how}
                    row[name]["frac_hbm"] = row[name]["gbps"] / hbm
                except Exception as e:  # noqa: BLE001 - record and go on
                    row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if (b, ctx) in flex_points or (quick and (b, ctx) == (8, 8192)):
                if flex_spent < flex_budget_s:
                    t = time.time()
                    try:
                        fn = _flex_decode(c)
                        ms, how = _time_ms(fn, graph=False)
                        gbps = c.kv_bytes / ms / 1e6
                        row["flex_paged"] = {"ms": ms, "gbps": gbps, "frac_hbm": gbps / hbm,
                                             "timing": f"{how}, one layer"}  # fmt: skip
                    except Exception as e:  # noqa: BLE001
                        row["flex_paged"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    flex_spent += time.time() - t
                else:
                    row["flex_paged"] = {"error": "skipped: flex compile budget spent"}
            del c, cases, fns
            torch.cuda.empty_cache()
            parts = [
                f"{k}={v['gbps']:.0f}GB/s" if "gbps" in v else f"{k}=ERR"
                for k, v in row.items()
                if isinstance(v, dict)
            ]
            _log(f"decode b={b} ctx={ctx}: " + " ".join(parts))
            rows.append(row)
    return rows


class PrefillCase:
    def __init__(self, b: int, prefix: int, new: int, seed: int = 0) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        n = prefix + new
        t = math.ceil(n / BS) * BS
        self.buf = torch.empty(b, t, 2, HKV, D, dtype=DT, device="cuda")
        self.buf.normal_(generator=g)
        self.k, self.v = self.buf[:, :, 0], self.buf[:, :, 1]
        self.slots = torch.randperm(b, device="cuda", generator=g).to(torch.int32)
        nblk = b * t // BS
        blocks = self.buf.view(nblk, BS, 2, HKV, D)
        perm = torch.randperm(nblk, device="cuda", generator=g).to(torch.int32).view(b, t // BS)
        # a separate paged pool holding the same data as the virtual slots, blocks shuffled
        pool = torch.empty_like(blocks)
        pool[perm.long().flatten()] = self.buf[self.slots.long()].view(nblk, BS, 2, HKV, D)
        self.kb, self.vb = pool[:, :, 0], pool[:, :, 1]
        self.table = perm
        self.q = torch.randn(b * new, HQ, D, dtype=DT, device="cuda", generator=g)
        self.prefix = torch.full((b,), prefix, dtype=torch.int32, device="cuda")
        self.cu = torch.arange(0, b + 1, dtype=torch.int32, device="cuda") * new
        # dense packed copy for the FA2 ceiling
        s = self.slots.long()
        self.kd = self.k[s, :n].reshape(b * n, HKV, D).contiguous()
        self.vd = self.v[s, :n].reshape(b * n, HKV, D).contiguous()
        self.cuk = torch.arange(0, b + 1, dtype=torch.int32, device="cuda") * n
        self.b, self.pre, self.new, self.n = b, prefix, new, n
        # causal FLOPs: 2 matmuls x 2 flop, row j sees prefix + j + 1 keys
        self.flops = 4 * b * HQ * D * (new * prefix + new * (new + 1) / 2)


def bench_prefill(quick: bool) -> list[dict]:
    from vtensor import ops
    from vtensor.ops import paged

    prefixes = [0, 4096] if quick else [0, 1024, 4096, 16384]
    news = [128, 1024] if quick else [128, 1024, 4096]
    batches = [1, 4] if quick else [1, 4, 16]
    rows = []
    for pre in prefixes:
        for new in news:
            for b in batches:
                if 4 * b * HQ * D * new * (pre + new / 2) > 6e12:
                    continue  # subsample: keep each call under ~20 ms
                c = PrefillCase(b, pre, new)
                kw = dict(prefix_lens=c.prefix, cu_seqlens_q=c.cu, max_seqlen_q=new,
                          max_seqlen_k=c.n, scale=D**-0.5)  # fmt: skip
                fns = {
                    "fa2_virtual": lambda c=c, kw=kw: ops.prefill_attention(
                        c.q, c.k, c.v, slot_ids=c.slots, backend="flash", **kw
                    ),
                    "triton": lambda c=c, kw=kw: ops.prefill_attention(
                        c.q, c.k, c.v, slot_ids=c.slots, backend="triton", **kw
                    ),
                    "paged_triton": lambda c=c, kw=kw: paged.paged_prefill_attention(
                        c.q, c.kb, c.vb, block_table=c.table, **kw
                    ),
                    "fa2_dense": lambda c=c: torch.ops.aten._flash_attention_forward(
                        c.q,
                        c.kd,
                        c.vd,
                        c.cu,
                        c.cuk,
                        c.new,
                        c.n,
                        0.0,
                        True,
                        False,
                        scale=D**-0.5,
                    ),  # fmt: skip
                }
                row = {"batch": b, "prefix": pre, "new": new, "flops": c.flops}
                ref = None
                for name, fn in fns.items():
                    try:
                        ms, how = _time_ms(fn)
                        row[name] = {"ms": ms, "tflops": c.flops / ms / 1e9, "timing": how}
                        o = fn()
                        o = o[0] if isinstance(o, tuple) else o
                        if ref is None:
                            ref = o.float()
                        row[name]["max_abs_diff_vs_first"] = (o.float() - ref).abs().max().item()
                    except Exception as e:  # noqa: BLE001
                        row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                del c, fns
                torch.cuda.empty_cache()
                parts = [
                    f"{k}={v['tflops']:.0f}TF" if "tflops" in v else f"{k}=ERR"
                    for k, v in row.items()
                    if isinstance(v, dict)
                ]
                _log(f"prefill b={b} prefix={pre} new={new}: " + " ".join(parts))
                rows.append(row)
    return rows


def sweep_configs() -> dict:
    """Same configs for the virtual and the paged layout: honest tuning of both."""
    from vtensor.ops.triton_decode import DecodeConfig, decode_triton
    from vtensor.ops.triton_prefill import prefill_triton

    out: dict = {"decode": [], "prefill": []}
    for b, ctx in ((8, 16384), (64, 4096)):
        c = DecodeCase(b, ctx, seed=1)
        layouts = {"virtual": (c.k, c.v, c.slots, None), "paged": (c.kb, c.vb, None, c.table)}
        for bn in (32, 64, 128):
            for nw, ns in ((4, 2), (4, 3), (8, 3), (4, 4)):
                r = {"batch": b, "ctx": ctx, "block_n": bn, "warps": nw, "stages": ns}
                for lay, (k, v, sl, bt) in layouts.items():
                    fn = partial(
                        decode_triton, c.q, k, v, slot_ids=sl, block_table=bt, seq_lens=c.lens,
                        max_seq_len=ctx, scale=0.1,
                        config=DecodeConfig(block_n=bn, num_warps=nw, num_stages=ns),
                    )  # fmt: skip
                    try:
                        r[lay + "_gbps"] = c.kv_bytes / _time_ms(fn)[0] / 1e6
                    except Exception as e:  # noqa: BLE001
                        r[lay + "_error"] = f"{type(e).__name__}: {e}"[:200]
                out["decode"].append(r)
        del c, layouts
    # split count for small batches (latency bound): the heuristic vs fixed counts
    out["splits"] = []
    for b, ctx in ((1, 8192), (1, 32768), (4, 8192)):
        c = DecodeCase(b, ctx, seed=2)
        for ns in (None, 8, 16, 32, 64, 128):
            fn = partial(
                decode_triton, c.q, c.k, c.v, slot_ids=c.slots, block_table=None,
                seq_lens=c.lens, max_seq_len=ctx, scale=0.1, num_splits=ns,
            )  # fmt: skip
            gbps = c.kv_bytes / _time_ms(fn)[0] / 1e6
            out["splits"].append({"batch": b, "ctx": ctx, "num_splits": ns, "gbps": gbps})
        del c
    _log("split sweep: " + json.dumps(out["splits"]))
    best = sorted(out["decode"], key=lambda r: -r.get("virtual_gbps", 0))[:3]
    _log("decode sweep (best virtual): " + json.dumps(best))
    c = PrefillCase(4, 4096, 1024, seed=1)
    layouts = {"virtual": (c.k, c.v, c.slots, None), "paged": (c.kb, c.vb, None, c.table)}
    for bm, bn, nw, ns in ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                           (128, 32, 4, 4), (64, 128, 8, 3)):  # fmt: skip
        r = {"block_m": bm, "block_n": bn, "warps": nw, "stages": ns}
        for lay, (k, v, sl, bt) in layouts.items():
            fn = partial(
                prefill_triton, c.q, k, v, slot_ids=sl, block_table=bt, prefix_lens=c.prefix,
                cu_seqlens_q=c.cu, max_seqlen_q=c.new, scale=0.1, block_m=bm, block_n=bn,
                num_warps=nw, num_stages=ns,
            )  # fmt: skip
            try:
                r[lay + "_tflops"] = c.flops / _time_ms(fn)[0] / 1e9
            except Exception as e:  # noqa: BLE001
                r[lay + "_error"] = f"{type(e).__name__}: {e}"[:200]
        out["prefill"].append(r)
    _log("prefill sweep: " + json.dumps(out["prefill"]))
    return out


def plot(result: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["decode"]
    ctxs = sorted({r["ctx"] for r in rows})
    ncol = min(3, len(ctxs))
    nrow = math.ceil(len(ctxs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    names = ("ours", "fa2_virtual", "paged_triton", "flex_paged")
    for ax, ctx in zip(axes.flat, ctxs, strict=False):
        rs = [r for r in rows if r["ctx"] == ctx]
        for name in names:
            pts = [(r["batch"], r[name]["frac_hbm"]) for r in rs if "frac_hbm" in r.get(name, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"context {ctx}")
        ax.set_xlabel("batch")
        ax.set_ylabel("fraction of HBM read BW")
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles))
    hbm = result["hbm"]["read_gbps"]
    fig.suptitle(f"decode, Llama-3-8B shapes bf16, HBM read {hbm:.0f} GB/s ({result['device']})")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(os.path.join(out_dir, "kernels_decode.png"), dpi=110)
    plt.close(fig)

    rows = result["prefill"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
    xs = range(len(rows))
    names = ("fa2_dense", "fa2_virtual", "triton", "paged_triton")
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * w for x in xs], [r.get(name, {}).get("tflops", 0) for r in rows], w,
               label=name)  # fmt: skip
    ax.set_xticks([x + 0.4 for x in xs])
    ax.set_xticklabels([f"b{r['batch']} p{r['prefix']} n{r['new']}" for r in rows], rotation=90,
                       fontsize=7)  # fmt: skip
    ax.set_ylabel("TFLOP/s")
    ax.set_title("prefix-prefill, Llama-3-8B shapes bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels_prefill.png"), dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="bench/results", help="folder for JSON + PNG")
    p.add_argument("--quick", action="store_true", help="fewer points")
    p.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plots from a result JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.out)
        return 0
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU")
        return 2
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    tag = gpu_tag()
    result: dict = {
        "device": name, "torch": torch.__version__, "date": datetime.now(UTC).isoformat(),
        "shapes": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bf16",
                   "paged_block_size": BS},
    }  # fmt: skip
    import triton

    result["triton"] = triton.__version__
    result["hbm"] = measure_hbm_read()
    hbm = result["hbm"]["read_gbps"]
    _log(f"HBM read bandwidth (read-only Triton kernel): {hbm:.0f} GB/s")
    path = os.path.join(args.out, f"kernels_{tag}.json")

    def save() -> None:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    if not args.no_sweep:
        result["sweep"] = sweep_configs()
        save()
    result["decode"] = bench_decode(args.quick, hbm)
    save()
    result["prefill"] = bench_prefill(args.quick)
    save()
    try:
        plot(result, args.out)
    except Exception as e:  # noqa: BLE001 - plots are a nicety; the JSON is the result
        _log(f"plot failed: {e}")
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
