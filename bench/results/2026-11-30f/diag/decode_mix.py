"""Decode attention on batches that MIX lengths, as the engine's are: the split-K kernel's
launch config searched per batch against length spreads drawn like the long-context and
ShareGPT-like workloads' decode phases (all with the engine's static max_seq_len bound), the
engine's tuned choice (made on uniform lengths) measured first. Split options: spread each
sequence over n programs (the kernel's default), or fixed chunks of c tokens per program
(`DecodeConfig.chunk_tokens`). Timing as vtensor.bench.kernels (CUDA graph, L2 flushed).
    PYTHONPATH=. python3 bench/results/2026-11-30f/diag/decode_mix.py --out F.json \
        [--write-table]   # also put each batch's best into vtensor/ops/decode_configs.json
"""

import argparse
import json
import time
from dataclasses import asdict, replace

import torch

from vtensor.bench.kernels import HKV, DecodeCase, _time_ms
from vtensor.ops import triton_decode as td

MAX_LEN = 8192
SPREADS = {"long": (4500, 7800), "sharegpt": (100, 2500), "uniform6k": (6000, 6000)}
BATCHES = {16: ["long"], 32: ["long"], 64: ["long", "sharegpt", "uniform6k"],
           128: ["sharegpt"], 256: ["sharegpt"]}  # fmt: skip
SPLITS = [("n", 1), ("n", 2), ("n", 4), ("c", 512), ("c", 1024), ("c", 2048)]
TILES = [(64, 2), (64, 3), (128, 2), (128, 3), (32, 4)]
T0 = time.time()


def cases(b: int, spread: str) -> list[DecodeCase]:
    lo, hi = SPREADS[spread]
    out = []
    for i in range(max(1, min(4, (256 << 20) // (b * lo * 2 * HKV * 128 * 2)))):
        c = DecodeCase(b, MAX_LEN, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        c.lens = torch.randint(lo, hi + 1, (b,), generator=g).to(torch.int32).cuda()
        c.kv_bytes = int(c.lens.sum()) * 2 * HKV * 128 * 2
        out.append(c)
    return out


def with_split(cfg: td.DecodeConfig, s: tuple[str, int]) -> td.DecodeConfig:
    if s[0] == "c":
        return replace(cfg, chunk_tokens=s[1], num_splits=None, fused=True)
    return replace(cfg, chunk_tokens=0, num_splits=s[1], fused=s[1] > 1)


def measure(cs: list[DecodeCase], cfg: td.DecodeConfig) -> tuple[float, float]:
    """(ms per layer, GB/s)."""

    def run():
        for c in cs:
            td.decode_triton(c.q, c.k, c.v, slot_ids=c.slots, block_table=None, seq_lens=c.lens,
                             max_seq_len=MAX_LEN, scale=0.1, config=cfg)  # fmt: skip

    ms, _ = _time_ms(run)
    return ms / len(cs), sum(c.kv_bytes for c in cs) / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--write-table", action="store_true")
    a = p.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "max_seq_len": MAX_LEN, "spreads": SPREADS,
           "batches": []}  # fmt: skip
    for b, spreads in BATCHES.items():
        data = {s: cases(b, s) for s in spreads}
        seen: dict = {}

        def score(cfg, data=data, seen=seen, b=b) -> float:
            key = tuple(asdict(cfg).values())
            if key not in seen:
                per = {}
                try:
                    for s, cs in data.items():
                        per[s] = measure(cs, cfg)
                    total = sum(v[0] for v in per.values())
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"  b={b} {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    total = float("inf")
                seen[key] = (total, cfg, per)
            return seen[key][0]

        engine = td.default_config(b, HKV, MAX_LEN, 128, False, dev)
        score(engine)
        best = engine
        for s in SPLITS:
            c = with_split(best, s)
            best = c if score(c) < score(best) else best
        for bn, st in TILES:
            c = replace(best, block_n=bn, num_stages=st)
            best = c if score(c) < score(best) else best
        c = replace(best, head_fast=not best.head_fast)
        best = c if score(c) < score(best) else best
        for s in SPLITS:
            c = with_split(best, s)
            best = c if score(c) < score(best) else best
        rows = [{"config": asdict(v[1]), "ms_total": v[0],
                 "per_spread": {s: {"ms": m, "gbps": g} for s, (m, g) in v[2].items()}}
                for v in seen.values()]  # fmt: skip
        en = seen[tuple(asdict(engine).values())]
        w = seen[tuple(asdict(best).values())]
        res["batches"].append({"batch": b, "engine": asdict(engine), "best": asdict(best),
                               "speedup": en[0] / w[0], "engine_per_spread": en[2],
                               "best_per_spread": w[2], "all": rows})  # fmt: skip
        gb = ", ".join(f"{s} {en[2][s][1]:.0f}->{w[2][s][1]:.0f} GB/s" for s in spreads)
        print(f"[{time.time() - T0:5.0f}s] b={b}: x{en[0] / w[0]:.3f} ({gb}); best {best}",
              flush=True)
        data.clear()
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    if a.write_table:
        path = td._TABLE_PATH
        table = json.loads(path.read_text())
        rows = table[res["device"]]["virtual"]
        for r in res["batches"]:
            for row in rows:
                if row["batch"] == r["batch"] and row["ctx"] == MAX_LEN:
                    row.update({k: v for k, v in r["best"].items()})
        path.write_text(json.dumps(table, indent=1))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
