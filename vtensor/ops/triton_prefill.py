"""Prefix-prefill Triton kernel over virtual-contiguous or paged KV.

One program owns (query tile, q head), a tile being one (sequence, query block). Its new tokens
sit at positions prefix + m, so it sees keys [0, prefix + m] (bottom-right causal). Keys below
prefix + first row of the block are visible to every row: that part runs without masks,
the diagonal tail with them. The tiles come as a list built on the device (`prefill_tiles`),
heaviest first, so a step with one 8K prompt among short ones launches only the real tiles
(a (max blocks x sequences) grid was mostly programs that exit at once) and starts the long
ones first.

    keys:  |------------- unmasked -------------|--masked--|
           0                      prefix + m_first    prefix + m_last + 1
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtensor.ops.triton_decode import _LOG2E, _kv_offsets, _num_sms


@triton.jit
def _prefill_tile(
    acc, m_i, l_i, q, k_base, v_base, bt_ptr, seq, sbt_b, sk_s, sk_t, sv_s, sv_t, n0, kv_end,
    q_pos, dims, qk_scale, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
    MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    offs = n0 + tl.arange(0, BLOCK_N)
    nmask = offs < kv_end
    k_off = _kv_offsets(bt_ptr, seq, sbt_b, offs, nmask, sk_s, sk_t, PAGE, PAGED)
    v_off = _kv_offsets(bt_ptr, seq, sbt_b, offs, nmask, sv_s, sv_t, PAGE, PAGED)
    if MASK:
        k = tl.load(k_base + k_off[:, None] + dims[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_base + v_off[:, None] + dims[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(k_base + k_off[:, None] + dims[None, :])
        v = tl.load(v_base + v_off[:, None] + dims[None, :])
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [M, N]
    if MASK:
        ok = (offs[None, :] <= q_pos[:, None]) & nmask[None, :]
        s = tl.where(ok, s, float("-inf"))
    # the scale rides in the exponent's FMA (s * scale - m), not a pass of its own over the
    # tile: softmax's FP32 work competes with the MMAs (H200: +1.5-3% on long prompts, same
    # output bits; bench/results/2026-11-30e/diag/prefill_fold.py)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


# The metadata pointers are slices past a mixed step's decode rows: their alignment varies
# step to step, and specializing on it compiled a second variant of each config mid-serving
# (~1 s each on the H200, bench/results/2026-11-30d/diag). They are read a scalar at a time.
@triton.jit(do_not_specialize_on_alignment=["slot_ptr", "bt_ptr", "prefix_ptr", "cu_ptr"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slot_ptr, bt_ptr, prefix_ptr, cu_ptr,
    tiles_ptr, sq_t, sq_h, sk_s, sk_t, sk_h, sv_s, sv_t, sv_h, sbt_b, so_t, so_h, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    if seq < 0:
        return  # the list's slack past the real tiles
    mblk = tl.load(tiles_ptr + 2 * tile + 1)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    prefix = tl.load(prefix_ptr + seq)
    kvh = h // GROUP
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < q_len
    dims = tl.arange(0, HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * sq_t + h * sq_h + dims[None, :], mask=mmask[:, None], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    if PAGED:
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h
    else:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        k_base = k_ptr + slot * sk_s + kvh * sk_h
        v_base = v_ptr + slot * sv_s + kvh * sv_h
    q_pos = prefix + offs_m
    kv_end = prefix + tl.minimum((mblk + 1) * BLOCK_M, q_len)  # keys the last row sees
    full_end = ((prefix + mblk * BLOCK_M + 1) // BLOCK_N) * BLOCK_N  # seen by every row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, k_base, v_base, bt_ptr, seq, sbt_b, sk_s, sk_t, sv_s, sv_t, n0,
            kv_end, q_pos, dims, qk_scale, BLOCK_N, PAGE, PAGED, False, UPCAST, PREC,
        )  # fmt: skip
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(
            acc, m_i, l_i, q, k_base, v_base, bt_ptr, seq, sbt_b, sk_s, sk_t, sv_s, sv_t, n0,
            kv_end, q_pos, dims, qk_scale, BLOCK_N, PAGE, PAGED, True, UPCAST, PREC,
        )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + rows[:, None] * so_t + h * so_h + dims[None, :],
        out.to(o_ptr.dtype.element_ty), mask=mmask[:, None],
    )  # fmt: skip


def prefill_config(
    q: torch.Tensor, max_seqlen_q: int, b: int, paged: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this step's prefill rows."""
    d, hq = q.shape[2], q.shape[1]
    if not q.is_cuda:
        return 16, 16, 4, 1
    if q.dtype == torch.float32 or d > 128:
        return 64, 32, 4, 2
    if max_seqlen_q <= 512:
        # Short chunks (prefill_tune_h200.json, same configs for both layouts): with few
        # 128-row query blocks, 64-row ones fill the GPU (b=1, prefix 16K, 128 new: 109 -> 162
        # TFLOP/s); with more, narrower key tiles win. The thresholds are each layout's best.
        sms = _num_sms(q.device)
        few = triton.cdiv(max_seqlen_q, 128) * b * hq <= (sms if paged else 4 * sms)
        return (64, 64, 4, 3) if few else (128, 32, 4, 3)
    if paged:
        return 128, 128, 8, 3  # best of the H200 sweep for the paged layout
    return 128, 64, 8, 3


def prefill_tiles(
    cu_seqlens_q: torch.Tensor, prefix_lens: torch.Tensor, n: int, block_m: int
) -> torch.Tensor:
    """[(sequence, query block)] as int32 [slack, 2], built on the device (no host sync),
    the blocks that see the most keys first; entries past the real tiles hold sequence -1.
    n: the rows cu_seqlens_q spans (a host int: it bounds the list, sum ceil <= n/bm + b)."""
    b = cu_seqlens_q.numel() - 1
    upper = triton.cdiv(n, block_m) + b
    cu = cu_seqlens_q.long()
    q_len = cu[1:] - cu[:-1]
    nt = (q_len + block_m - 1) // block_m
    ends = torch.cumsum(nt, 0)
    t = torch.arange(upper, device=cu.device)
    seq = torch.searchsorted(ends, t, right=True)
    valid = seq < b
    seq = seq.clamp(max=b - 1)
    mblk = t - (ends - nt)[seq]
    seen = prefix_lens.long()[seq] + torch.minimum((mblk + 1) * block_m, q_len[seq])
    order = torch.argsort(torch.where(valid, seen, -1), descending=True)
    tiles = torch.stack((torch.where(valid, seq, -1), mblk), 1)
    return tiles[order].to(torch.int32).contiguous()


def prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor | None,
    block_table: torch.Tensor | None,
    prefix_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """q: [n_new, Hq, d]; the rows of sequence i are cu_seqlens_q[i]:cu_seqlens_q[i + 1]
    (they need not start at 0: rows outside every sequence are left alone in `out`); exactly
    one of slot_ids / block_table. `cache`: a per-step dict where the tile list is kept for
    the step's other layers."""
    n, hq, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"triton prefill needs a power-of-two head_dim >= 16, got {d}")
    if (slot_ids is None) == (block_table is None):
        raise ValueError("pass exactly one of slot_ids (virtual) or block_table (paged)")
    o = torch.empty_like(q) if out is None else out
    b = cu_seqlens_q.shape[0] - 1
    if n == 0 or b == 0 or max_seqlen_q == 0:
        return o
    interp = not q.is_cuda
    paged = block_table is not None
    bm, bn, nw, ns = prefill_config(q, max_seqlen_q, b, paged)
    bm, bn = block_m or bm, block_n or bn
    key = ("prefill_tiles", bm)
    tiles = None if cache is None else cache.get(key)
    if tiles is None:
        tiles = prefill_tiles(cu_seqlens_q, prefix_lens, n, bm)
        if cache is not None:
            cache[key] = tiles
    bt = block_table if paged else prefix_lens
    slots = slot_ids if not paged else prefix_lens
    grid = (tiles.shape[0], hq)
    _prefill_kernel[grid](
        q, k_cache, v_cache, o, slots, bt, prefix_lens, cu_seqlens_q, tiles,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        bt.stride(0) if paged else 0, o.stride(0), o.stride(1), scale * _LOG2E,
        GROUP=hq // k_cache.shape[2], HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        PAGE=k_cache.shape[1] if paged else 1, PAGED=paged, UPCAST=interp,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or nw, num_stages=num_stages or ns,
    )  # fmt: skip
    return o
