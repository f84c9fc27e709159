"""Per-shape tuning of the split-K decode kernel, for BOTH layouts (virtual and paged).

    python -m vtensor.bench.decode_tune --out DIR [--budget-s 420]

For each (batch, context) of the grid, a coordinate search over the launch config: first the
structural flags (grid order, staggered tiles, fused merge), then block/warps/stages, then
the split count (x1/4 .. x4 of `plan_splits`). The paged layout gets exactly the same search,
so the baseline is tuned as hard as ours. Timing as `vtensor.bench.kernels` (CUDA graph over
L layers' buffers, L2 flushed). Writes decode_tune_<gpu>.json with every measurement and the
best config per shape and layout; `vtensor/ops/decode_configs.json` is made from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace
from functools import partial

import torch

from vtensor.bench.kernels import HKV, _log, _over, _time_ms, decode_cases, gpu_tag

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CTXS = [1024, 4096, 8192, 16384, 32768]


def _measure(cases, cfg, paged: bool) -> float:
    from vtensor.ops.triton_decode import decode_triton

    c = cases[0]

    def one(x):
        k, v, sl, bt = (x.kb, x.vb, None, x.table) if paged else (x.k, x.v, x.slots, None)
        decode_triton(x.q, k, v, slot_ids=sl, block_table=bt, seq_lens=x.lens,
                      max_seq_len=x.ctx, scale=0.1, config=cfg)  # fmt: skip

    ms, _ = _time_ms(partial(_over, one, cases))
    return c.kv_bytes * len(cases) / ms / 1e6


def tune_shape(b: int, ctx: int, paged: bool, log: list) -> dict:
    from vtensor.ops.triton_decode import DecodeConfig, _num_sms, plan_splits

    cases = decode_cases(b, ctx)
    seen: dict = {}

    def score(cfg) -> float:
        key = tuple(asdict(cfg).values())
        if key not in seen:
            try:
                seen[key] = _measure(cases, cfg, paged)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip
                seen[key] = 0.0
                _log(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}")
            log.append({"batch": b, "ctx": ctx, "paged": paged, **asdict(cfg),
                        "gbps": seen[key]})  # fmt: skip
        return seen[key]

    best = DecodeConfig()
    default = score(best)
    for hf in (False, True):
        for rot in (False, True):
            for fu in (False, True):
                c = replace(best, head_fast=hf, rotate=rot, fused=fu)
                best = c if score(c) > score(best) else best
    for bn in (32, 64, 128):
        for nw, ns in ((4, 2), (4, 3), (4, 4), (8, 3), (8, 4)):
            c = replace(best, block_n=bn, num_warps=nw, num_stages=ns)
            best = c if score(c) > score(best) else best
    planned, _ = plan_splits(b, HKV, ctx, best.block_n, _num_sms(torch.device("cuda")))
    tiles = math.ceil(ctx / best.block_n)
    for f in (0.25, 0.5, 2, 4):
        n = max(1, min(tiles, round(planned * f)))
        c = replace(best, num_splits=n)
        best = c if score(c) > score(best) else best
    cases.clear()
    torch.cuda.empty_cache()
    return {"default_gbps": default, "planned_splits": planned, "seen": seen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--ctxs", default=",".join(map(str, CTXS)))
    ap.add_argument("--update-table", action="store_true",
                    help="write the best configs into vtensor/ops/decode_configs.json")  # fmt: skip
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    ctxs = [int(x) for x in args.ctxs.split(",")]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    path = os.path.join(args.out, f"decode_tune_{gpu_tag()}.json")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "best": [], "log": []}  # fmt: skip
    # the target region first, so a spent budget loses the least useful points
    shapes = sorted(((b, c) for b in batches for c in ctxs if b * c * 4096 <= 60e9),
                    key=lambda s: (s[1] < 4096, -s[1] * s[0] if s[0] >= 32 else -s[1]))  # fmt: skip
    for b, ctx in shapes:
        if time.time() - t0 > args.budget_s:
            _log(f"budget spent; skipping b={b} ctx={ctx} and the rest")
            break
        for paged in (False, True):
            r = tune_shape(b, ctx, paged, result["log"])
            row = {"batch": b, "ctx": ctx, "paged": paged, "default_gbps": r["default_gbps"],
                   "best_gbps": max(r["seen"].values()), "planned_splits": r["planned_splits"],
                   "best": asdict(_best_cfg(r))}  # fmt: skip
            result["best"].append(row)
            lay = "paged" if paged else "virtual"
            _log(f"b={b} ctx={ctx} {lay}: default {row['default_gbps']:.0f} -> "
                 f"{row['best_gbps']:.0f} GB/s {row['best']}")  # fmt: skip
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    _log(f"wrote {path}")
    if args.update_table:
        update_table(result["best"], torch.cuda.get_device_name(), path)
    return 0


def update_table(best: list[dict], device_name: str, source: str) -> None:
    """Replace the tuned shapes' rows of this GPU's table, one JSON row per line."""
    from vtensor.ops.triton_decode import _TABLE_PATH

    tables = json.loads(_TABLE_PATH.read_text())
    t = tables.setdefault(device_name, {"source": "", "virtual": [], "paged": []})
    t["source"] = f"{t['source']}; {source}".strip("; ")
    for r in best:
        rows = t["paged" if r["paged"] else "virtual"]
        rows[:] = [x for x in rows if (x["batch"], x["ctx"]) != (r["batch"], r["ctx"])]
        rows.append({"batch": r["batch"], "ctx": r["ctx"], **r["best"]})
        rows.sort(key=lambda x: (x["batch"], x["ctx"]))
    lines = []
    for name, g in tables.items():
        body = [f'  "source": {json.dumps(g["source"])}']
        for lay in ("virtual", "paged"):
            rows = ",\n".join("   " + json.dumps(x) for x in g[lay])
            body.append(f'  "{lay}": [\n{rows}\n  ]')
        lines.append(f" {json.dumps(name)}: {{\n" + ",\n".join(body) + "\n }")
    _TABLE_PATH.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    _clear_caches()
    _log(f"updated {_TABLE_PATH}")


def _clear_caches() -> None:
    from vtensor.ops.triton_decode import _tables, tuned_config

    _tables.cache_clear()
    tuned_config.cache_clear()


def _best_cfg(r: dict):
    from vtensor.ops.triton_decode import DecodeConfig

    key = max(r["seen"], key=r["seen"].get)
    return DecodeConfig(*key)


if __name__ == "__main__":
    raise SystemExit(main())
