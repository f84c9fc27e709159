"""Launch-config sweep of the prefix-prefill Triton kernel, both layouts, same configs.

    python -m vtensor.bench.prefill_tune --out DIR

Short chunks (new tokens <= 256) leave few query blocks per sequence, so the default
128-row tiles may not fill the GPU; this measures which tiles each shape wants. Timing as
`vtensor.bench.kernels`. Writes prefill_tune_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch

from vtensor.bench.kernels import PrefillCase, _log, _time_ms, gpu_tag

CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
           (32, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)]  # fmt: skip
SHAPES = [(b, p, n) for n in (128, 256, 512) for b in (1, 4, 16) for p in (0, 1024, 4096, 16384)]


def main(argv: list[str] | None = None) -> int:
    from vtensor.ops.triton_prefill import prefill_triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for b, pre, new in SHAPES:
        c = PrefillCase(b, pre, new, seed=1)
        lay = {"virtual": (c.k, c.v, c.slots, None), "paged": (c.kb, c.vb, None, c.table)}
        for name, (k, v, sl, bt) in lay.items():
            r = {"batch": b, "prefix": pre, "new": new, "layout": name, "tflops": {}}
            for bm, bn, nw, ns in CONFIGS:
                fn = partial(
                    prefill_triton, c.q, k, v, slot_ids=sl, block_table=bt, prefix_lens=c.prefix,
                    cu_seqlens_q=c.cu, max_seqlen_q=new, scale=0.1, block_m=bm, block_n=bn,
                    num_warps=nw, num_stages=ns,
                )  # fmt: skip
                try:
                    r["tflops"][f"{bm},{bn},{nw},{ns}"] = c.flops / _time_ms(fn)[0] / 1e9
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    r["tflops"][f"{bm},{bn},{nw},{ns}"] = 0.0
                    _log(f"  {bm},{bn},{nw},{ns}: {type(e).__name__}: {str(e)[:100]}")
            best = max(r["tflops"], key=r["tflops"].get)
            t = r["tflops"]
            _log(f"b={b} prefix={pre} new={new} {name}: 128,64,8,3 {t['128,64,8,3']:.0f}, "
                 f"best {best} {t[best]:.0f} TF/s")  # fmt: skip
            rows.append(r)
        del c, lay
        torch.cuda.empty_cache()
    path = os.path.join(args.out, f"prefill_tune_{gpu_tag()}.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    _log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
