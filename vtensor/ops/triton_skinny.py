"""Skinny GEMM: y = x @ W^T (+ bias) for the few-row steps of decoding (M <= 64).

A decode step at small batch reads every weight once and does almost no math: its time is the
weight bytes over HBM bandwidth. cuBLAS reaches 55-91% of that on Llama-3-8B's projections at
M = 1 on the H200 (bench/results/2026-11-30c/steps_points: o_proj 10.9 us + a split-K reduce
kernel for 33.5 MB). This kernel streams W once with the roles swapped (W's rows are the MMA's
M side, x's few rows its N side, so tensor cores need no 64-row padding of x) and, when N alone
gives too few programs to fill the GPU, splits K: the last program of each output tile to
finish (an arrival counter, as the fused decode merge) sums the partials in fp32, so there is
no second kernel and nothing to zero between calls or graph replays.

    program (n tile, k split, m tile):  acc[BLOCK_N, BLOCK_M] = W[n tile, k range] @ x[m, k]^T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


# M and the row strides change with the batch: a value of 1 or a multiple of 16 would
# otherwise compile another variant mid-serving
@triton.jit(do_not_specialize=["M", "sxm", "som"])
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, ws_ptr, sem_ptr, M, N, K, sxm, swn, som, k_per,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * swn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sxm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # every split is whole tiles: only x's rows are masked
            x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_rows + offs_k[None, :])
            else:
                w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None], other=0.0)
        else:
            kmask = offs_k < k_hi
            x = tl.load(x_rows + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 as raw integers
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)

    omask = nmask[:, None] & mmask[None, :]
    if SPLIT_K > 1:
        # partials [SPLIT_K, m tiles * BLOCK_M, n tiles * BLOCK_N] fp32 (whole tiles: no
        # masks); the last split to arrive sums them (acq_rel at GPU scope orders every
        # thread's stores, hence the barrier, before the count, and the count before the
        # loads; .cg loads read L2, where the other programs wrote)
        width = tl.num_programs(0) * BLOCK_N
        plane = tl.num_programs(2) * BLOCK_M * width
        ws_tile = ws_ptr + offs_m[None, :] * width + offs_n[:, None]
        tl.store(ws_tile + pid_k * plane, acc)
        tl.debug_barrier()
        sem = sem_ptr + pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")  # ready for the next call
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws_tile + s * plane, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
            tl.store(o_ptr + offs_m[None, :] * som + offs_n[:, None],
                     acc.to(o_ptr.dtype.element_ty), mask=omask)  # fmt: skip
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.store(o_ptr + offs_m[None, :] * som + offs_n[:, None],
                 acc.to(o_ptr.dtype.element_ty), mask=omask)  # fmt: skip


_SEMS: dict[torch.device, torch.Tensor] = {}


def _semaphores(device: torch.device, n: int) -> torch.Tensor | None:
    """Arrival counters, one per output tile; every call leaves them at 0, so one zeroed
    buffer per device serves all calls and graph replays. None while a CUDA graph is being
    captured and the buffer is too small (no allocation inside a capture)."""
    sem = _SEMS.get(device)
    if sem is None or sem.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        sem = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _SEMS[device] = sem
    return sem


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor | None:
    """x [M, K] (last dim contiguous) @ weight[N, K]^T (+ bias [N]) -> [M, N] in x's dtype;
    None when it cannot run here (the caller falls back to F.linear)."""
    cfg = config or SkinnyConfig()
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    k_per = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per)  # no empty split: each one must arrive at the counter
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    ws = sem = out
    if split > 1:
        sem = _semaphores(x.device, grid[0] * grid[2])
        if sem is None:
            return None
        ws = torch.empty(split, grid[2] * cfg.block_m, grid[0] * cfg.block_n,
                         dtype=torch.float32, device=x.device)  # fmt: skip
    interp = not x.is_cuda
    _skinny_kernel[grid](
        x, weight, bias if bias is not None else out, out, ws, sem, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), k_per,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        HAS_BIAS=bias is not None, EVEN_N=n % cfg.block_n == 0, EVEN_K=k % k_per == 0,
        UPCAST=interp,
        PREC="ieee" if interp or x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
