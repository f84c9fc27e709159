"""Paged (block-table) baselines: block_size 16, the vLLM layout.

k_blocks, v_blocks: [num_blocks, block_size, kv_heads, dim]; block_table: [b, max_blocks] int32.
The Triton paths run the SAME split-K decode and prefix-prefill kernels as the virtual layout
with a block-table gather per token (constexpr PAGED), so the comparison measures the layout,
not two unequal amounts of tuning. FlexAttention's paged attention is wrapped in
`vtensor.bench.kernels` (it needs torch.compile and its own head-major cache).
"""

from __future__ import annotations

import torch

from vtensor.ops import AttentionBackendError, _check_backend, check_kv_views
from vtensor.ops.reference import (
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    paged_store_kv_torch,
)

__all__ = ["paged_store_kv", "paged_prefill_attention", "paged_decode_attention"]


def paged_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """slot_mapping[i] = block * block_size + offset of token i."""
    if k.shape[1:] != k_blocks.shape[2:] or v.shape != k.shape:
        raise AttentionBackendError(
            f"k/v {tuple(k.shape)} do not match the blocks' [*, {tuple(k_blocks.shape[2:])}]"
        )
    paged_store_kv_torch(k, v, k_blocks, v_blocks, slot_mapping)


def paged_prefill_attention(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    *,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    _check_backend(backend)
    check_kv_views(q, k_blocks, v_blocks)
    if backend == "flash":
        raise AttentionBackendError("paged prefill has no FA2 path here (aten needs 256-blocks)")
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return paged_prefill_attention_torch(
            q, k_blocks, v_blocks, block_table=block_table, prefix_lens=prefix_lens,
            cu_seqlens_q=cu_seqlens_q, scale=scale,
        )  # fmt: skip
    from vtensor.ops.triton_prefill import prefill_triton

    return prefill_triton(
        q, k_blocks, v_blocks, slot_ids=None, block_table=block_table, prefix_lens=prefix_lens,
        cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, scale=scale,
    )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    _check_backend(backend)
    check_kv_views(q, k_blocks, v_blocks)
    if backend == "flash":
        raise AttentionBackendError("paged decode has no FA2 path here (aten needs 256-blocks)")
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return paged_decode_attention_torch(
            q, k_blocks, v_blocks, block_table=block_table, seq_lens=seq_lens, scale=scale
        )
    from vtensor.ops.triton_decode import decode_triton

    return decode_triton(
        q, k_blocks, v_blocks, slot_ids=None, block_table=block_table, seq_lens=seq_lens,
        max_seq_len=max_seq_len, scale=scale,
    )  # fmt: skip
