"""Paged (block-table) baselines: block_size 16, the vLLM layout, one call each.

k_blocks, v_blocks: [num_blocks, block_size, kv_heads, dim]; block_table: [b, max_blocks] int32.
The Triton backend runs the SAME split-K decode and prefix-prefill kernels as the virtual layout
with a block-table gather per token (constexpr PAGED), so the comparison measures the layout,
not two unequal amounts of tuning. FlexAttention's paged attention is wrapped in
`vtensor.bench.kernels` (it needs torch.compile and its own head-major cache).
"""

from __future__ import annotations

import torch

from vtensor.ops.backends import attend, store_kv

__all__ = ["attend_paged", "paged_decode_attention", "paged_prefill_attention", "paged_store_kv"]


def paged_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """slot_mapping[i] = block * block_size + offset of token i (vLLM's flat form)."""
    bs = k_blocks.shape[1]
    store_kv(k, v, k_blocks, v_blocks, slot_mapping // bs, slot_mapping % bs)


def attend_paged(
    q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, *,
    block_table: torch.Tensor, scale: float, backend: str = "auto", **fields: int | torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """ops.attend_virtual through a block table (the same fields)."""
    return attend(backend, paged=True, q=q, k_cache=k_blocks, v_cache=v_blocks,
                  kv_index=block_table, scale=scale, **fields)  # fmt: skip


paged_prefill_attention = paged_decode_attention = attend_paged
