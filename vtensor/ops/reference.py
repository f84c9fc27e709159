"""Torch references for store / prefill / decode attention, virtual and paged layouts.

They are the engine's CPU path and the ground truth of the tests, so they favour clarity over
speed but avoid the obvious traps: one `scaled_dot_product_attention` per prefill request, one
batched call for decode, fp32 accumulation for half dtypes. They sync with the host (lengths go
through `.tolist()`), which is free on the CPU; the CUDA path uses the Triton / FA2 kernels.
"""

from __future__ import annotations

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


def store_kv_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """k_cache[slot_ids[i], positions[i]] = k[i] (index_put_ writes through strided views)."""
    s, p = slot_ids.long(), positions.long()
    k_cache[s, p] = k.to(k_cache.dtype)
    v_cache[s, p] = v.to(v_cache.dtype)


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


def _decode_batched(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [b, Hq, d]; k, v: [b, n, Hkv, d] padded to the longest sequence."""
    n = k.shape[1]
    valid = torch.arange(n, device=q.device).unsqueeze(0) < seq_lens.to(q.device).unsqueeze(1)
    # Rows past a sequence's length hold whatever the memory held (a NaN there would survive
    # its zero attention weight: 0 * NaN = NaN), so zero them rather than only mask them.
    k = k.masked_fill(~valid[:, :, None, None], 0)
    v = v.masked_fill(~valid[:, :, None, None], 0)
    mask = valid[:, None, None, :]  # [b, 1, 1, n]
    o = _sdpa(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale, mask, causal=False)
    return o[:, :, 0].to(q.dtype)


def prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    slots = slot_ids.tolist()

    def gather(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return k_cache[slots[i], :n], v_cache[slots[i], :n]

    return _prefill_loop(q, gather, prefix_lens, cu_seqlens_q, scale)


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.empty_like(q)
    n = int(seq_lens.max())
    s = slot_ids.long()
    # Gathers [b, n] tokens, n = the longest live sequence (not the static max_seq_len bound).
    return _decode_batched(q, k_cache[s, :n], v_cache[s, :n], seq_lens, scale)


# ---- paged (block-table) layout: k_blocks [num_blocks, block_size, kv_heads, dim] ----


def paged_store_kv_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    bs = k_blocks.shape[1]
    sm = slot_mapping.long()
    k_blocks[sm // bs, sm % bs] = k.to(k_blocks.dtype)
    v_blocks[sm // bs, sm % bs] = v.to(v_blocks.dtype)


def _paged_gather(blocks: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    bs = blocks.shape[1]
    nb = (n + bs - 1) // bs
    g = blocks[table_row[:nb].long()]  # [nb, bs, Hkv, d]
    return g.reshape(nb * bs, *blocks.shape[2:])[:n]


def paged_prefill_attention_torch(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    *,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    def gather(i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = block_table[i]
        return _paged_gather(k_blocks, row, n), _paged_gather(v_blocks, row, n)

    return _prefill_loop(q, gather, prefix_lens, cu_seqlens_q, scale)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    *,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.empty_like(q)
    bs = k_blocks.shape[1]
    n = int(seq_lens.max())
    nb = (n + bs - 1) // bs
    tbl = block_table[:, :nb].long()  # [b, nb]
    b = q.shape[0]
    k = k_blocks[tbl].reshape(b, nb * bs, *k_blocks.shape[2:])[:, :n]
    v = v_blocks[tbl].reshape(b, nb * bs, *v_blocks.shape[2:])[:, :n]
    return _decode_batched(q, k, v, seq_lens, scale)
