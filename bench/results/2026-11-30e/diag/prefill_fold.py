"""A/B of the prefill kernel's softmax: the scale folded into the exponent's FMA (fold) or
applied in its own pass over each score tile (the kernel before 2026-11-30e), same process,
same inputs (vtensor.bench.kernels' PrefillCase, CUDA-graph timing, L2 flushed), alternating
the two sides; also checks both give the same output.
    PYTHONPATH=. python3 bench/results/2026-11-30e/diag/prefill_fold.py --out F.json
"""

import argparse
import json

import torch

from vtensor.bench.kernels import D, PrefillCase, _time_ms
from vtensor.ops.triton_prefill import prefill_triton

SHAPES = [(1, 0, 4096), (4, 0, 4096), (3, 0, 5120), (1, 4096, 4096), (16, 0, 1024),
          (4, 1024, 1024), (16, 4096, 128), (64, 0, 256)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    for b, pre, new in SHAPES:
        c = PrefillCase(b, pre, new)

        def run(fold: bool, c=c, new=new) -> torch.Tensor:
            return prefill_triton(c.q, c.k, c.v, slot_ids=c.slots, block_table=None,
                                  prefix_lens=c.prefix, cu_seqlens_q=c.cu, max_seqlen_q=new,
                                  scale=D**-0.5, fold_scale=fold)  # fmt: skip

        diff = float((run(True).float() - run(False).float()).abs().max())
        ms = {True: [], False: []}
        for _ in range(3):  # alternate: drift on the machine hits both sides
            for fold in (False, True):
                ms[fold].append(_time_ms(lambda fold=fold: run(fold))[0])
        row = {"batch": b, "prefix": pre, "new": new, "max_abs_diff": diff,
               "tflops_before": c.flops / min(ms[False]) / 1e9,
               "tflops_fold": c.flops / min(ms[True]) / 1e9}  # fmt: skip
        row["speedup"] = row["tflops_fold"] / row["tflops_before"]
        rows.append(row)
        print(f"b={b:3d} prefix={pre:5d} new={new:5d}: {row['tflops_before']:6.1f} -> "
              f"{row['tflops_fold']:6.1f} TFLOP/s (x{row['speedup']:.3f}), diff {diff:.2e}",
              flush=True)  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
