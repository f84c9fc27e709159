"""Attention over the KV cache: store, prefix-prefill and decode, virtual and paged layouts.

The engine picks one `AttentionBackend` when it is built (`select_backend`: "torch" reference,
the CPU path; "triton", our kernels, run on CPU tensors under TRITON_INTERPRET=1; "flash", aten
FlashAttention-2 varlen, CUDA fp16/bf16, virtual layout only; "auto": torch on CPU, on CUDA the
fastest measured) and calls `backend.forward(layer, q, meta, scale)` per layer; see
`vtensor/ops/backends.py`. The functions below are one call through a backend picked by name,
for tests and benchmarks, over `k_cache, v_cache: [slots, max_tokens, kv_heads, head_dim]`
(any strides, last dim contiguous). The paged ones live in `vtensor.ops.paged`.
"""

from __future__ import annotations

import torch

from vtensor.ops.backends import (
    BACKENDS,
    AttentionBackend,
    AttentionBackendError,
    AttentionMetadata,
    attend,
    check_kv_views,
    select_backend,
    store_kv,
)

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionBackendError",
    "AttentionMetadata",
    "attend",
    "attend_virtual",
    "check_kv_views",
    "decode_attention",
    "prefill_attention",
    "select_backend",
    "store_kv",
]


def attend_virtual(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    slot_ids: torch.Tensor, scale: float, backend: str = "auto", **fields: int | torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """prefill (fields prefix_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k): causal
    (bottom-right) attention of the packed new tokens q [n_new_total, q_heads, dim] over prefix
    + new K/V; request i has q[cu[i]:cu[i+1]] at positions prefix_lens[i] + j, and its K/V
    (prefix and new) are already in the cache. decode (fields seq_lens, max_seq_len): one
    query per sequence (q [b, q_heads, dim]) over its seq_lens[i] tokens; no host sync."""
    return attend(backend, paged=False, q=q, k_cache=k_cache, v_cache=v_cache,
                  kv_index=slot_ids[:, None], scale=scale, **fields)  # fmt: skip


prefill_attention = decode_attention = attend_virtual
