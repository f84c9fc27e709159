"""Attention over virtual-contiguous KV: store, prefix-prefill and decode.

All take per-layer views `k_cache, v_cache: [slots, max_tokens, kv_heads, head_dim]` (any
strides, last dim contiguous). Backends: "torch" (reference, the CPU path), "triton" (our
kernels; run on CPU tensors under TRITON_INTERPRET=1), "flash" (aten FlashAttention-2 varlen,
CUDA fp16/bf16), "auto" (torch on CPU; on CUDA the fastest measured for the shape).
The paged baselines live in `vtensor.ops.paged`.
"""

from __future__ import annotations

import torch

from vtensor.ops.reference import (
    decode_attention_torch,
    prefill_attention_torch,
    store_kv_torch,
)

__all__ = [
    "AttentionBackendError",
    "store_kv",
    "prefill_attention",
    "decode_attention",
    "check_kv_views",
]

BACKENDS = ("auto", "torch", "triton", "flash")


class AttentionBackendError(ValueError):
    """Bad arguments for an attention op, or a backend that cannot run on these inputs."""


def check_kv_views(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise AttentionBackendError(
            f"k/v caches must be 4-d [slots, tokens, kv_heads, dim], got {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise AttentionBackendError(f"k/v cache shapes differ: {k_cache.shape} vs {v_cache.shape}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise AttentionBackendError("q and the k/v caches need a contiguous last dim")
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise AttentionBackendError(
            f"q must be [n, q_heads, {k_cache.shape[-1]}], got {tuple(q.shape)}"
        )
    if q.shape[1] % k_cache.shape[2] != 0:
        raise AttentionBackendError(
            f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k_cache.shape[2]})"
        )
    if q.device != k_cache.device:
        raise AttentionBackendError(f"q on {q.device} but the cache on {k_cache.device}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise AttentionBackendError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _auto_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str:
    # H200, bf16, Llama-3-8B shapes: our Triton kernel ran 1.0-1.5x FA2 on densely packed K/V
    # at every measured point (bench/results/kernels_h200.json), so it is the default; FA2
    # covers the head dims the kernel lacks (not a power of two).
    if not q.is_cuda:
        return "torch"
    d = q.shape[-1]
    if d & (d - 1) == 0 and d >= 16:
        return "triton"
    from vtensor.ops.flash import flash_unsupported_reason

    why = flash_unsupported_reason(q, k_cache, v_cache)
    if why is not None:
        raise AttentionBackendError(f"no CUDA prefill backend for head_dim {d}: {why}")
    return "flash"


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    backend: str = "auto",
) -> None:
    """k_cache[slot_ids[i], positions[i]] = k[i]; k, v: [n, kv_heads, dim]."""
    _check_backend(backend)
    if k.shape[1:] != k_cache.shape[2:] or v.shape != k.shape:
        raise AttentionBackendError(
            f"k/v {tuple(k.shape)} do not match the cache's [*, {tuple(k_cache.shape[2:])}]"
        )
    # One index_put_ per cache: a single scatter kernel on CUDA, no host sync, any strides.
    store_kv_torch(k, v, k_cache, v_cache, slot_ids, positions)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal (bottom-right) attention of the packed new tokens over prefix + new K/V."""
    _check_backend(backend)
    check_kv_views(q, k_cache, v_cache)
    if backend == "auto":
        backend = _auto_prefill(q, k_cache, v_cache)
    if backend == "torch":
        return prefill_attention_torch(
            q, k_cache, v_cache, slot_ids=slot_ids, prefix_lens=prefix_lens,
            cu_seqlens_q=cu_seqlens_q, scale=scale,
        )  # fmt: skip
    if backend == "flash":
        from vtensor.ops.flash import flash_prefill

        return flash_prefill(
            q, k_cache, v_cache, slot_ids=slot_ids, prefix_lens=prefix_lens,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            scale=scale,
        )  # fmt: skip
    from vtensor.ops.triton_prefill import prefill_triton

    return prefill_triton(
        q, k_cache, v_cache, slot_ids=slot_ids, block_table=None, prefix_lens=prefix_lens,
        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, scale=scale,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """One query token per sequence over its seq_lens[i] cached tokens; no host sync on CUDA."""
    _check_backend(backend)
    check_kv_views(q, k_cache, v_cache)
    if backend == "auto":
        # The split-K kernel beat FA2 varlen at every measured decode point on the H200, so
        # there is nothing to pick per shape there yet (kernels_h200.json). Non-power-of-two
        # head dims go to FA2.
        d = q.shape[-1]
        if not q.is_cuda:
            backend = "torch"
        else:
            backend = "triton" if d & (d - 1) == 0 and d >= 16 else "flash"
    if backend == "torch":
        return decode_attention_torch(
            q, k_cache, v_cache, slot_ids=slot_ids, seq_lens=seq_lens, scale=scale
        )
    if backend == "flash":
        from vtensor.ops.flash import flash_decode

        return flash_decode(
            q, k_cache, v_cache, slot_ids=slot_ids, seq_lens=seq_lens, max_seq_len=max_seq_len,
            scale=scale,
        )  # fmt: skip
    from vtensor.ops.triton_decode import decode_triton

    return decode_triton(
        q, k_cache, v_cache, slot_ids=slot_ids, block_table=None, seq_lens=seq_lens,
        max_seq_len=max_seq_len, scale=scale,
    )  # fmt: skip
