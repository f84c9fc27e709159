"""Prefill attention: our Triton kernel against torch SDPA's cuDNN and flash backends, called
per request on strided views of the same packed queries and virtual-slot KV the engine holds
(vtensor.bench.kernels' PrefillCase, CUDA-graph timing where it captures, L2 flushed).
Question: is cuDNN's Hopper kernel far enough ahead of ours (~400-440 TFLOP/s) on the
long-context prompts to route them there, and does it take our strides and GQA as they are?
    PYTHONPATH=. python3 bench/results/2026-11-30f/diag/prefill_cudnn.py --out F.json
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from vtensor.bench.kernels import HKV, HQ, D, PrefillCase, _time_ms
from vtensor.ops.triton_prefill import prefill_triton

SHAPES = [(1, 0, 4096), (3, 0, 5120), (1, 0, 8192), (4, 0, 2048), (16, 0, 512), (1, 4096, 4096),
          (2, 2048, 1024)]  # fmt: skip
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_runner(c: PrefillCase, backend, gqa: str):
    """Per-request SDPA into one packed output; gqa 'native' (enable_gqa) or 'expand'."""
    slots = c.slots.tolist()
    o = torch.empty_like(c.q)
    mask = None if c.pre == 0 else causal_lower_right(c.new, c.n)

    def run():
        for i, s in enumerate(slots):
            q = c.q[i * c.new:(i + 1) * c.new].transpose(0, 1).unsqueeze(0)
            k = c.k[s, :c.n].transpose(0, 1).unsqueeze(0)
            v = c.v[s, :c.n].transpose(0, 1).unsqueeze(0)
            if gqa == "expand":
                k = k.repeat_interleave(HQ // HKV, dim=1)
                v = v.repeat_interleave(HQ // HKV, dim=1)
            with sdpa_kernel([backend]):
                if mask is None:
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5,
                                                         enable_gqa=gqa == "native")  # fmt: skip
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5,
                                                         enable_gqa=gqa == "native")  # fmt: skip
            o[i * c.new:(i + 1) * c.new] = out[0].transpose(0, 1)
        return o

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    for b, pre, new in SHAPES:
        c = PrefillCase(b, pre, new)

        def ours(c=c, new=new):
            return prefill_triton(c.q, c.k, c.v, slot_ids=c.slots, block_table=None,
                                  prefix_lens=c.prefix, cu_seqlens_q=c.cu, max_seqlen_q=new,
                                  scale=D**-0.5)  # fmt: skip

        ref = ours().float()
        row = {"batch": b, "prefix": pre, "new": new}
        fns = {"triton": ours}
        for name, be in BACKENDS.items():
            for gqa in ("native", "expand"):
                fns[f"{name}_{gqa}"] = sdpa_runner(c, be, gqa)
        for name, fn in fns.items():
            try:
                diff = float((fn().float() - ref).abs().max())
                ms, how = _time_ms(fn)
                row[name] = {"tflops": c.flops / ms / 1e9, "ms": ms, "timing": how,
                             "max_abs_diff": diff}  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a backend that refuses the inputs
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(f"b={b} prefix={pre} new={new}: " + ", ".join(
            f"{k} {v['tflops']:.0f} TF (diff {v['max_abs_diff']:.1e}, {v['timing'][:5]})"
            if "tflops" in v else f"{k} ERR {v['error'][:90]}"
            for k, v in row.items() if isinstance(v, dict)), flush=True)  # fmt: skip
        del c, fns
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cudnn": torch.backends.cudnn.version(), "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
