"""Fused layer ops: residual add + RMSNorm, SiLU(gate) * up, RoPE + K/V store.

Each op dispatches on the device: one Triton launch on CUDA (`triton_fused.py`, imported
lazily so CPU installs need no Triton), and on the CPU a torch implementation that is exactly
the unfused math the model ran before (HF rounding order), so CPU outputs do not change.

    decode step, one layer (CUDA):
      [add+norm] -> qkv GEMM -> [rope+store K/V] -> attention -> o GEMM
      -> [add+norm] -> gate_up GEMM -> [silu*up] -> down GEMM            (9-10 launches)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fused_add_rms_norm",
    "rms_norm",
    "silu_mul",
    "rope_store_kv",
    "rotate_neox",
]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- torch references (the CPU path) ----


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)  # HF: cast back before the weight multiply


def fused_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = residual + x  # in the activation dtype, like the unfused `x = x + f(x)`
    return rms_norm_torch(residual, weight, eps), residual


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., d]; cos, sin broadcastable to [..., d/2]. Neox rotate-half RoPE."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    # == x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), same roundings as HF
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_store_kv_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dest_a: torch.Tensor,
    dest_b: torch.Tensor,
) -> torch.Tensor:
    cos = cos_cache[positions].unsqueeze(1)  # [n, 1, d/2]
    sin = sin_cache[positions].unsqueeze(1)
    q_rot, k_rot = rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)
    a, b = dest_a.long(), dest_b.long()
    k_cache[a, b] = k_rot.to(k_cache.dtype)  # index_put_ writes through strided views
    v_cache[a, b] = v.to(v_cache.dtype)
    return q_rot


# ---- public ops ----


def _norm_on_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dim() in (2, 3)
        and x.stride(-1) == 1
        and x.dtype in _TRITON_DTYPES
        and weight.dtype == x.dtype
        and weight.is_contiguous()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) with the norm in fp32, cast before the weight.
    x: [n, N] or [n, heads, N] (last dim contiguous on CUDA); returns a new tensor."""
    if _norm_on_triton(x, weight):
        from vtensor.ops.triton_fused import add_rms_norm_triton

        return add_rms_norm_triton(x, None, weight, eps)[0]
    return rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), the sum rounded to the activation dtype.

    vLLM-style pre-norm residual stream: the layer's output x is added to the running
    residual and normalized in one pass. Returns new tensors; inputs are not modified."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} vs residual {tuple(residual.shape)}")
    if _norm_on_triton(x, weight) and residual.stride(-1) == 1:
        from vtensor.ops.triton_fused import add_rms_norm_triton

        normed, res = add_rms_norm_triton(x, residual, weight, eps)
        assert res is not None
        return normed, res
    return fused_add_rms_norm_torch(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [n, 2I] (gate | up) -> F.silu(gate) * up: [n, I], silu rounded to the dtype
    before the multiply like the unfused torch."""
    cuda_ok = gate_up.is_cuda and gate_up.dim() == 2 and gate_up.stride(1) == 1
    if cuda_ok and gate_up.dtype in _TRITON_DTYPES:
        from vtensor.ops.triton_fused import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_torch(gate_up)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dest_a: torch.Tensor,
    dest_b: torch.Tensor,
) -> torch.Tensor:
    """Neox RoPE on q and k; roped k and v stored in the cache; returns roped q.

    q: [n, Hq, D], k, v: [n, Hk, D] (e.g. views of the qkv GEMM output: last dim contiguous,
    rows strided); positions: [n] int; cos_cache, sin_cache: [max_pos, D/2] in q's dtype;
    k_cache, v_cache: 4-d [A, B, Hk, D], any strides with the last dim contiguous: a virtual
    layer view [slots, max_tokens, Hk, D] (dest_a = slot, dest_b = position) or a paged pool
    [num_blocks, block_size, Hk, D] (dest_a = slot_mapping // bs, dest_b = slot_mapping % bs);
    dest_a, dest_b: [n] int32/int64. Token i's K/V go to k_cache[dest_a[i], dest_b[i]].

    Returns q_rot as a NEW contiguous [n, Hq, D] tensor; q, k and v are never modified.
    CUDA: one Triton launch (offsets in int64); CPU: the unfused torch math (index_put_)."""
    if q.is_cuda:
        from vtensor.ops.triton_fused import rope_store_kv_triton

        return rope_store_kv_triton(
            q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, dest_a, dest_b
        )
    return rope_store_kv_torch(
        q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, dest_a, dest_b
    )
