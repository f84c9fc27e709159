"""Tune the skinny GEMM against cuBLAS for a model's Linear shapes at decode batch sizes.

    python -m vtensor.bench.skinny_tune --out DIR [--models llama-3-8b,smollm2-135m]
        [--ms 1,8,16,32,64] [--layers qkv,o,gate_up,down] [--budget-s 300] [--install]

For each weight shape (qkv, o, gate_up, down, lm_head) and each M, cuBLAS (F.linear) and the
skinny kernel's candidates are timed the way a decode step runs them: a CUDA graph over enough
distinct weight copies to overflow L2 (each layer reads its own weights from HBM), L2 flushed
before each replay. A search per shape: block_n x block_k x split_k at M = 1, then warps and
stages around the best three; the other M reuse the six best configs (with their block_m).
Writes skinny_tune_<gpu>.json (every timing), skinny_table_<gpu>.json (the table
`vtensor/ops/skinny_configs.json` holds: per shape and M range the winning config, or null
where cuBLAS wins or the kernel is within 3% of it) and a plot; --install merges the table
into vtensor/ops/skinny_configs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from vtensor.bench.kernels import _time_ms, gpu_tag

_T0 = time.time()
_L2_BYTES = 256 * 1024**2  # copies per shape: >= this many weight bytes per graph replay
_WIN = 1.03  # the kernel must beat cuBLAS by this factor to enter the table


def _log(msg: str) -> None:
    print(f"[skinny_tune {time.time() - _T0:6.1f}s] {msg}", flush=True)


def model_shapes(name: str) -> dict[str, tuple[int, int]]:
    """{"qkv": (N, K), ...} of one preset's Linear layers."""
    from vtensor.model import ModelConfig

    c = ModelConfig.from_preset(name)
    return {
        "qkv": (c.q_size + 2 * c.kv_size, c.hidden_size),
        "o": (c.hidden_size, c.q_size),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


class _Shape:
    def __init__(self, n: int, k: int) -> None:
        nbytes = n * k * 2
        copies = max(2, min(16, -(-_L2_BYTES // nbytes)))
        self.n, self.k, self.bytes = n, k, nbytes
        self.ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
                   for _ in range(copies)]  # fmt: skip

    def time_us(self, m: int, cfg) -> float:
        from vtensor.ops.triton_skinny import skinny_linear

        x = torch.randn(m, self.k, device="cuda", dtype=torch.bfloat16)
        if cfg is None:
            def run() -> None:
                for w in self.ws:
                    F.linear(x, w)
        else:
            def run() -> None:
                for w in self.ws:
                    skinny_linear(x, w, None, cfg)
        ms, _ = _time_ms(run)
        return ms * 1000 / len(self.ws)

    def check(self, m: int, cfg) -> float:
        """Max relative error of the kernel against fp32 torch on one weight copy."""
        from vtensor.ops.triton_skinny import skinny_linear

        x = torch.randn(m, self.k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), self.ws[0].float())
        y = skinny_linear(x, self.ws[0], None, cfg).float()
        return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def tune_shape(shape: _Shape, ms: list[int], log: list, deadline: float) -> list[dict]:
    from vtensor.ops.triton_skinny import SkinnyConfig

    seen: dict[tuple, float] = {}

    def score(m: int, cfg: SkinnyConfig) -> float:
        key = (m, *asdict(cfg).values())
        if key not in seen:
            try:
                seen[key] = shape.time_us(m, cfg)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip it
                seen[key] = float("inf")
                _log(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}")
            log.append({"n": shape.n, "k": shape.k, "m": m, **asdict(cfg), "us": seen[key]})
        return seen[key]

    n, k = shape.n, shape.k
    bks = [b for b in (64, 128, 256) if b <= k]
    first = [
        SkinnyConfig(block_m=16, block_n=bn, block_k=bk, split_k=s)
        for bn in (32, 64, 128) for bk in bks for s in (1, 2, 4, 8)
        if k // s >= bk and (s == 1 or n // bn < 4 * 132)  # split only a short grid
    ]  # fmt: skip
    rows = []
    for m in ms:
        if time.time() > deadline:
            _log(f"  budget spent: M >= {m} not tuned")
            break
        base = shape.time_us(m, None)
        bm = _block_m(m)
        if m == ms[0]:
            cands = [replace(c, block_m=bm) for c in first]
            for c in cands:
                score(m, c)
            top = sorted(cands, key=lambda c: score(m, c))[:3]
            for c in top:
                for nw, ns in ((4, 3), (4, 5), (4, 6), (8, 4)):
                    score(m, replace(c, num_warps=nw, num_stages=ns))
        else:
            prev = sorted((r for r in rows if r["config"]), key=lambda r: r["us"])
            seeds = {SkinnyConfig(**r["config"]) for r in prev}
            ranked = sorted(
                ((us, c) for (mm, *vals), us in seen.items() if mm == ms[0]
                 for c in [SkinnyConfig(*vals)]), key=lambda t: t[0],
            )  # fmt: skip
            seeds |= {c for _, c in ranked[:6]}
            for c in seeds:
                c = replace(c, block_m=bm)
                score(m, c)
                if c.split_k > 1:
                    score(m, replace(c, split_k=c.split_k // 2))
        mine = {c: us for (mm, *vals), us in seen.items() if mm == m
                for c in [SkinnyConfig(*vals)]}  # fmt: skip
        cfg, us = min(mine.items(), key=lambda t: t[1])
        err = shape.check(m, cfg)
        win = base / us >= _WIN and err < 2e-2
        rows.append({"m": m, "cublas_us": base, "us": us, "speedup": base / us, "rel_err": err,
                     "config": asdict(cfg) if win else None, "best": asdict(cfg)})  # fmt: skip
        _log(f"  {n}x{k} M={m}: cuBLAS {base:.1f} us ({shape.bytes / base / 1e3:.0f} GB/s), "
             f"skinny {us:.1f} us ({shape.bytes / us / 1e3:.0f} GB/s) x{base / us:.2f} "
             f"{'-> table' if win else ''}")  # fmt: skip
    return rows


def table_of(results: dict) -> dict[str, list[dict]]:
    """{"NxK": [{"max_m", config fields...} or {"max_m", "cublas": true}]} for linear.py."""
    out = {}
    for key, rows in results.items():
        entries = [{"max_m": r["m"], **r["config"]} if r["config"] else
                   {"max_m": r["m"], "cublas": True} for r in rows]  # fmt: skip
        if any("cublas" not in e for e in entries):
            out[key] = entries
    return out


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, rows in results.items():
        ax.plot([r["m"] for r in rows], [r["speedup"] for r in rows], marker="o", label=key)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows: decode batch)")
    ax.set_ylabel("cuBLAS time / skinny time")
    ax.set_title(f"skinny GEMM vs cuBLAS, {torch.cuda.get_device_name()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="llama-3-8b,smollm2-135m")
    p.add_argument("--ms", default="1,8,16,32,64")
    p.add_argument("--layers", default="qkv,o,gate_up,down",
                   help="of qkv,o,gate_up,down,lm_head (cuBLAS reads the head at ~96%%)")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--install", action="store_true",
                   help="merge the table into vtensor/ops/skinny_configs.json")  # fmt: skip
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("skinny_tune needs a GPU")
    os.makedirs(a.out, exist_ok=True)
    ms = sorted(int(x) for x in a.ms.split(","))
    shapes: dict[tuple[int, int], str] = {}
    for model in a.models.split(","):
        for name, nk in model_shapes(model).items():
            if name in a.layers.split(","):
                shapes.setdefault(nk, f"{model}/{name}")
    deadline = time.time() + a.budget_s
    log: list = []
    results: dict[str, list[dict]] = {}
    for i, ((n, k), label) in enumerate(shapes.items()):
        _log(f"shape {i + 1}/{len(shapes)}: {label} {n}x{k}")
        per_shape = deadline - time.time()
        shape_deadline = time.time() + per_shape / (len(shapes) - i)
        results[f"{n}x{k}"] = tune_shape(_Shape(n, k), ms, log, shape_deadline)
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    tag = gpu_tag()
    with open(os.path.join(a.out, f"skinny_tune_{tag}.json"), "w") as f:
        json.dump({"device": gpu, "torch": torch.__version__, "shapes": {f"{n}x{k}": lbl
                   for (n, k), lbl in shapes.items()}, "results": results, "log": log}, f,
                  indent=1)  # fmt: skip
    table = table_of(results)
    with open(os.path.join(a.out, f"skinny_table_{tag}.json"), "w") as f:
        json.dump({gpu: table}, f, indent=1)
    plot(results, os.path.join(a.out, f"skinny_tune_{tag}.png"))
    if a.install:
        from vtensor.ops.linear import _TABLE_PATH

        full = json.loads(_TABLE_PATH.read_text()) if _TABLE_PATH.exists() else {}
        full[gpu] = table
        _TABLE_PATH.write_text(json.dumps(full, indent=1) + "\n")
        _log(f"installed {len(table)} shapes into {_TABLE_PATH}")


if __name__ == "__main__":
    main()
