"""Torch references for store / prefill / decode attention, virtual and paged layouts.

They are the engine's CPU path and the ground truth of the tests, so they favour clarity over
speed but avoid the obvious traps: one `scaled_dot_product_attention` per request (decode too:
each reads exactly its own rows), fp32 accumulation for half dtypes. They sync with the host
(lengths go through `.tolist()`), which is free on the CPU; CUDA uses the Triton / FA2 kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types accumulate in fp32; fp32 and fp64 stay as they are (the tests use fp64).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """q: [b, Hq, m, d]; k, v: [b, Hkv, n, d] -> [b, Hq, m, d] in the accumulation dtype."""
    acc = _acc_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # repeat_interleave rather than enable_gqa: the math backend (fp64, masks) always takes it.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _prefill_loop(
    q: torch.Tensor, gather, prefix_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    prefixes = prefix_lens.tolist()
    for i, prefix in enumerate(prefixes):
        a, b = cu[i], cu[i + 1]
        m = b - a
        if m == 0:
            continue
        n = prefix + m
        k, v = gather(i, n)  # [n, Hkv, d]
        qi = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, Hq, m, d]
        ki = k.transpose(0, 1).unsqueeze(0)
        vi = v.transpose(0, 1).unsqueeze(0)
        if prefix == 0:
            o = _sdpa(qi, ki, vi, scale, None, causal=True)
        else:
            # Bottom-right causal: query j (position prefix + j) sees keys 0..prefix + j.
            rows = torch.arange(m, device=q.device).unsqueeze(1) + prefix
            mask = torch.arange(n, device=q.device).unsqueeze(0) <= rows  # [m, n]
            o = _sdpa(qi, ki, vi, scale, mask, causal=False)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out


def _gather(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """gather(i, n) -> sequence i's first n K and V rows [n, kv_heads, d]: from its slot
    (virtual, slot_ids [b]) or through its block-table row (paged, block_table [b, w])."""
    if block_table is None:
        assert slot_ids is not None, "pass slot_ids (virtual) or block_table (paged)"
        slots = slot_ids.tolist()
        return lambda i, n: (k_cache[slots[i], :n], v_cache[slots[i], :n])
    rows = block_table.long()
    bs = k_cache.shape[1]

    def paged(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = rows[i, : -(-n // bs)]
        k = k_cache[ids].reshape(-1, *k_cache.shape[2:])[:n]
        return k, v_cache[ids].reshape(-1, *v_cache.shape[2:])[:n]

    return paged


def prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor | None,
    block_table: torch.Tensor | None,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    max_seqlen_q: int = 0,  # unused (the kernels' signature)
) -> torch.Tensor:
    """Causal (bottom-right) attention of the packed new tokens over prefix + new K/V."""
    gather = _gather(k_cache, v_cache, slot_ids, block_table)
    return _prefill_loop(q, gather, prefix_lens, cu_seqlens_q, scale)


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int = 0,  # unused (the kernels' signature)
) -> torch.Tensor:
    """A decode is a prefill of one token after seq_lens - 1 cached ones. Each sequence reads
    exactly its own rows: nothing past its length (unmapped pages of a virtual slot are a
    segfault on the host backend; rows past it may hold NaN garbage in a paged pool)."""
    gather = _gather(k_cache, v_cache, slot_ids, block_table)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return _prefill_loop(q, gather, seq_lens.cpu() - 1, cu, scale)
