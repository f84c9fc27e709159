"""Stock FlashAttention-2 (aten varlen) reading K/V straight from the virtual-contiguous views.

One layer's K view [slots, max_tokens, kv_heads, d] with strides (ss, ts, hs, 1) is re-viewed
as token rows [rows, kv_heads, d] with row stride ts. Slot s starts at row s * ss / ts, which
is exact when the slot's bytes are a multiple of the token's (KVLayout page-aligns slots, so
this holds unless a token straddles slots). cum_seq_k[i] = start row of request i's slot and
seqused_k[i] = its KV length, so FA2 never needs packed K/V; is_causal is bottom-right.
"""

from __future__ import annotations

import torch


def _rows_per_slot(cache: torch.Tensor) -> int | None:
    ss, ts = cache.stride(0), cache.stride(1)
    if ts <= 0 or ss % ts != 0:
        return None
    return ss // ts


def flash_unsupported_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when the aten FA2 call can run for this device, dtype and head dim, else why not
    (checked once, when the engine picks its backend)."""
    if device.type != "cuda":
        return "FlashAttention-2 needs CUDA tensors"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no aten._flash_attention_forward"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 needs fp16/bf16, got {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"FlashAttention-2 needs head_dim <= 256 and a multiple of 8, got {head_dim}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "FlashAttention-2 needs sm80+"
    return None


def _views_unsupported_reason(k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    if k_cache.stride() != v_cache.stride():
        return "k and v views have different strides"
    if _rows_per_slot(k_cache) is None:
        return (
            f"slot stride {k_cache.stride(0)} is not a multiple of the token stride "
            f"{k_cache.stride(1)}: slots do not start on a token row"
        )
    if k_cache.dtype != v_cache.dtype:
        return "k and v caches differ in dtype"
    return None


def _token_rows(cache: torch.Tensor, rps: int) -> torch.Tensor:
    s, t, h, d = cache.shape
    rows = (s - 1) * rps + t
    return cache.as_strided((rows, h, d), (cache.stride(1), cache.stride(2), 1))


def _call(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    slot_ids: torch.Tensor,
    seqused_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    why = _views_unsupported_reason(k_cache, v_cache)
    if why is None and k_cache.dtype != q.dtype:
        why = f"q is {q.dtype} but the cache {k_cache.dtype}"
    if why is not None:
        from vtensor.ops.backends import AttentionBackendError

        raise AttentionBackendError(f"backend='flash' cannot run: {why}")
    rps = _rows_per_slot(k_cache)
    k_rows, v_rows = _token_rows(k_cache, rps), _token_rows(v_cache, rps)
    b = slot_ids.shape[0]
    cu_k = torch.empty(b + 1, dtype=torch.int32, device=q.device)
    cu_k[:b] = slot_ids * rps
    # A valid end row (FA2 reads only seqused_k[i] rows per request). fill_, not `cu_k[b] = n`:
    # the latter copies from a CPU scalar, which breaks CUDA-graph capture.
    cu_k[b:].fill_(k_rows.shape[0])
    out = torch.ops.aten._flash_attention_forward(
        q, k_rows, v_rows, cu_q.to(torch.int32), cu_k, max_q, max_k, 0.0, causal, False,
        scale=scale, seqused_k=seqused_k.to(torch.int32),
    )[0]  # fmt: skip
    return out


def flash_prefill(
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
) -> torch.Tensor:
    seqused = prefix_lens + (cu_seqlens_q[1:] - cu_seqlens_q[:-1])
    return _call(
        q, k_cache, v_cache, cu_seqlens_q, slot_ids, seqused, max_seqlen_q, max_seqlen_k, scale,
        causal=True,
    )  # fmt: skip


def flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    b = q.shape[0]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    return _call(q, k_cache, v_cache, cu_q, slot_ids, seq_lens, 1, max_seq_len, scale, causal=False)
