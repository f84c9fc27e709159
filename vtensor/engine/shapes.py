"""Step shapes on CUDA: the token counts a step's GEMMs may see, padded to a fixed set.

Why: cuBLAS blocks the host until the GPU drains the first time a process runs a GEMM of a new
M (measured on the H200, torch 2.11+cu130: ~47 ms of queued work waited for at an M never seen,
0.05 ms at a repeated one, lazy or eager module loading alike; bench/results/2026-11-30d/diag).
A serving loop meets a new token count nearly every prefill step and a new batch size nearly
every decode step, so a first pass over a workload loses its CPU/GPU overlap step after step.
Padding each step's token rows (and logits rows) up to one of ~120 sizes (~80 for logits), all
run once at startup, makes every GEMM shape one the process has seen. GEMMs run in 64-256-row
tiles, so rounding up to a multiple of 16 (<= 1/16 of M above 256) costs little GPU time.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from vtensor.model import CausalLM


def step_sizes(max_tokens: int) -> list[int]:
    """1, 2, 4, 8, every 16 to 256, then 16 sizes per doubling (each a multiple of 16), and
    max_tokens: 116 sizes for 16384, padding <= 6.25% above 256 tokens."""
    sizes = {1, 2, 4, 8, *range(16, 257, 16), max_tokens}
    lo = 256
    while lo < max_tokens:
        step = max(16, lo // 16)
        sizes.update(range(lo + step, 2 * lo + 1, step))
        lo *= 2
    return sorted(s for s in sizes if s <= max_tokens)


def padded_size(sizes: list[int], n: int) -> int:
    """The smallest size >= n (n itself past the largest)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else n


@torch.inference_mode()
def warm_gemms(model: CausalLM, token_sizes: list[int], logit_sizes: list[int],
               device: torch.device) -> int:  # fmt: skip
    """Run every distinct Linear shape of the model's layers once at each token size, and the
    logits head at each logits size, so that serving never meets a GEMM shape for the first
    time. Returns the number of GEMMs run."""
    cfg = model.config
    shapes: dict[tuple, nn.Linear] = {}
    for mod in model.modules():  # the head (vocab-wide output) runs only at logits sizes
        if isinstance(mod, nn.Linear) and mod.out_features != cfg.vocab_size:
            key = (mod.in_features, mod.out_features, mod.weight.dtype, mod.bias is not None)
            shapes.setdefault(key, mod)
    # largest first: each output fits in the block the previous one freed (ascending sizes
    # made the caching allocator keep a segment per size: +18 GiB of peak on the H200)
    count = 0
    for mod in shapes.values():
        x = torch.zeros(token_sizes[-1], mod.in_features, dtype=mod.weight.dtype, device=device)
        for m in reversed(token_sizes):
            mod(x[:m])
        count += len(token_sizes)
    h = torch.zeros(logit_sizes[-1], cfg.hidden_size, dtype=model.dtype, device=device)
    for m in reversed(logit_sizes):
        model.compute_logits(h[:m])
    return count + len(logit_sizes)
