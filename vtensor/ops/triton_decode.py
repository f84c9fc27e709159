"""Split-K (flash-decoding) decode attention over virtual-contiguous or paged KV.

One program owns (sequence, kv_head, split): it loads the query rows of the whole GQA group
as one [GROUP_PAD >= 16, D] tile and reads each K/V tile of its token range ONCE for all of
them (tl.dot needs >= 16 rows, so small groups are padded). The splits are merged through
their log-sum-exp by a second kernel, or (config `fused`) by the last split program of each
(sequence, kv head) to finish. Launch configs are tuned per GPU and shape
(`decode_configs.json`, made by `vtensor.bench.decode_tune` with the same search for the
paged layout). The grid is sized from the static `max_seq_len` bound only (no host sync,
CUDA graphs stay valid); each sequence then spreads its actual tokens over all the splits
(`_seq_chunk`, on the device), so a graph captured for 8K contexts still keeps every split
busy at 2K instead of leaving most programs to exit at once.

    tokens of one sequence: |--split 0--|--split 1--|--split 2--|  (chunk = k * BLOCK_N)
                            ^ program (seq, kvh, 0) reads K/V once for `group` query heads
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128


@triton.jit
def _kv_offsets(bt_ptr, seq, sbt_b, offs, nmask, s_slot, s_tok, PAGE: tl.constexpr,
                PAGED: tl.constexpr):  # fmt: skip
    """Element offsets of tokens `offs` relative to the sequence's base (int64)."""
    if PAGED:
        blk = tl.load(bt_ptr + seq * sbt_b + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        return blk * s_slot + (offs % PAGE).to(tl.int64) * s_tok
    else:
        return offs.to(tl.int64) * s_tok


@triton.jit
def _seq_chunk(seq_len, n_splits, BLOCK_N: tl.constexpr):
    """Tokens per split for this sequence: its tiles spread evenly over the n_splits programs
    (>= 1 tile, so a 0-length pad row divides by nothing)."""
    tiles = tl.maximum(tl.cdiv(seq_len, BLOCK_N), 1)
    return tl.cdiv(tiles, n_splits) * BLOCK_N


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, bt_ptr, lens_ptr, o_ptr, mo_ptr, ml_ptr,
    sq_b, sq_h, sk_s, sk_t, sk_h, sv_s, sv_t, sv_h, sbt_b, so_b, so_h,
    smo_b, smo_h, smo_s, sml_b, sml_h,
    sem_ptr, qk_scale, n_kvh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, DIRECT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, HEAD_FAST: tl.constexpr, ROTATE: tl.constexpr,
    FUSED: tl.constexpr, SPLIT_TILE: tl.constexpr,
):  # fmt: skip
    if HEAD_FAST:  # programs launched together read neighbouring heads of the same tokens
        kvh = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    chunk = _seq_chunk(seq_len, tl.num_programs(2), BLOCK_N)
    start = split * chunk
    if start >= seq_len:
        return  # the reduction only reads the splits that hold tokens
    end = tl.minimum(start + chunk, seq_len)
    n_tiles = tl.cdiv(end - start, BLOCK_N)
    # ROTATE: each program starts at a different tile of its range, so programs running at
    # the same time do not all hit addresses a power-of-two slot stride apart (DRAM aliasing).
    rot = ((seq * 5 + kvh * 3) % n_tiles) if ROTATE else 0

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + rows
    rmask = rows < GROUP
    q = tl.load(
        q_ptr + seq * sq_b + heads[:, None] * sq_h + dims[None, :], mask=rmask[:, None], other=0.0
    )
    if UPCAST:  # the interpreter computes bf16 as raw integers
        q = q.to(tl.float32)
    if PAGED:
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h
    else:
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        k_base = k_ptr + slot * sk_s + kvh * sk_h
        v_base = v_ptr + slot * sv_s + kvh * sv_h

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, n_tiles):
        t = i + rot
        t = tl.where(t >= n_tiles, t - n_tiles, t)
        offs = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs < end
        k_off = _kv_offsets(bt_ptr, seq, sbt_b, offs, nmask, sk_s, sk_t, PAGE, PAGED)
        v_off = _kv_offsets(bt_ptr, seq, sbt_b, offs, nmask, sv_s, sv_t, PAGE, PAGED)
        k = tl.load(k_base + k_off[:, None] + dims[None, :], mask=nmask[:, None], other=0.0)
        v = tl.load(v_base + v_off[:, None] + dims[None, :], mask=nmask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [G, N], log2 units
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(
            o_ptr + seq * so_b + heads[:, None] * so_h + dims[None, :],
            out.to(o_ptr.dtype.element_ty), mask=rmask[:, None],
        )  # fmt: skip
    else:
        tl.store(
            mo_ptr + seq * smo_b + heads[:, None] * smo_h + split * smo_s + dims[None, :],
            acc / l_i[:, None], mask=rmask[:, None],
        )  # fmt: skip
        tl.store(ml_ptr + seq * sml_b + heads * sml_h + split, m_i + tl.log2(l_i), mask=rmask)
        if FUSED:
            # The last split program of (seq, kvh) to finish merges all splits: no second
            # kernel launch. acq_rel at GPU scope orders the partial stores above (all threads,
            # hence the barrier) before the count, and the count before the loads below; the
            # last program resets the counter so the next call (or graph replay) starts at 0.
            tl.debug_barrier()
            n_valid = tl.cdiv(seq_len, chunk)
            done = tl.atomic_add(sem_ptr + seq * n_kvh + kvh, 1, sem="acq_rel", scope="gpu")
            if done == n_valid - 1:
                tl.atomic_xchg(sem_ptr + seq * n_kvh + kvh, 0, sem="relaxed", scope="gpu")
                _merge_splits(
                    o_ptr, mo_ptr, ml_ptr, seq, heads, rmask, n_valid, so_b, so_h, smo_b,
                    smo_h, smo_s, sml_b, sml_h, GROUP_PAD, HEAD_DIM, SPLIT_TILE,
                )  # fmt: skip


@triton.jit
def _merge_splits(
    o_ptr, mo_ptr, ml_ptr, seq, heads, rmask, n_valid, so_b, so_h, smo_b, smo_h, smo_s, sml_b,
    sml_h, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_TILE: tl.constexpr,
):  # fmt: skip
    """o[seq, heads] = sum_s w_s * mo[s] / sum_s w_s, w_s = 2^(lse_s - max lse); .cg loads go
    to L2, where the other programs' partials are (L1 is not coherent)."""
    dims = tl.arange(0, HEAD_DIM)
    ml = ml_ptr + seq * sml_b + heads * sml_h  # [ROWS]
    mo = mo_ptr + seq * smo_b + heads * smo_h  # [ROWS]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for s0 in range(0, n_valid, SPLIT_TILE):
        st = s0 + tl.arange(0, SPLIT_TILE)
        lse = tl.load(ml[:, None] + st[None, :], mask=rmask[:, None] & (st < n_valid)[None, :],
                      other=float("-inf"), cache_modifier=".cg")  # fmt: skip
        m = tl.maximum(m, tl.max(lse, 1))
    m = tl.where(rmask, m, 0.0)
    wsum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for s in range(0, n_valid):
        w = tl.exp2(tl.load(ml + s, mask=rmask, other=0.0, cache_modifier=".cg") - m)
        o = tl.load(mo[:, None] + s * smo_s + dims[None, :], mask=rmask[:, None], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        wsum += w
        acc += w[:, None] * o
    out = acc / tl.where(rmask, wsum, 1.0)[:, None]
    tl.store(o_ptr + seq * so_b + heads[:, None] * so_h + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    o_ptr, mo_ptr, ml_ptr, lens_ptr, so_b, so_h, smo_b, smo_h, smo_s, sml_b, sml_h, n_splits,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
    SPLIT_TILE: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    n_valid = tl.cdiv(seq_len, _seq_chunk(seq_len, n_splits, BLOCK_N))
    ml = ml_ptr + seq * sml_b + h * sml_h
    sp = tl.arange(0, SPLITS_PAD)
    lse = tl.load(ml + sp, mask=sp < n_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    wsum = tl.sum(tl.where(sp < n_valid, tl.exp2(lse - m), 0.0), 0)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    # [SPLIT_TILE, D] tiles keep registers bounded when there are 100+ splits
    for s0 in range(0, n_valid, SPLIT_TILE):
        st = s0 + tl.arange(0, SPLIT_TILE)
        smask = st < n_valid
        w = tl.where(smask, tl.exp2(tl.load(ml + st, mask=smask, other=0.0) - m), 0.0)
        o = tl.load(
            mo_ptr + seq * smo_b + h * smo_h + st[:, None] * smo_s + dims[None, :],
            mask=smask[:, None], other=0.0,
        )  # fmt: skip
        acc += tl.sum(w[:, None] * o, 0)
    tl.store(o_ptr + seq * so_b + h * so_h + dims, (acc / wsum).to(o_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: as few programs as possible
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(
    batch: int, kv_heads: int, max_seq_len: int, block_n: int, sms: int
) -> tuple[int, int]:
    """(num_splits, chunk): ~4 programs per SM, >= 4 tiles per split. H200 split sweep
    (bf16, 8 kv heads): batch 1 x 8K best at 32 splits, batch 1 x 32K at 32-64, batch 4 x 8K at
    16; 8 programs per SM with >= 2 tiles per split was 5-15% slower at batch 1 and 64."""
    tiles = max(1, math.ceil(max_seq_len / block_n))
    want = math.ceil(4 * sms / max(1, batch * kv_heads))
    splits = max(1, min(want, tiles // 4, _MAX_SPLITS))
    chunk = math.ceil(tiles / splits) * block_n
    return math.ceil(max_seq_len / chunk), chunk


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel; None = chosen by `plan_splits` / defaults."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    head_fast: bool = False  # grid (kv_head, seq, split) instead of (seq, kv_head, split)
    rotate: bool = False  # stagger each program's first tile
    fused: bool = False  # merge splits in the last program (no reduction kernel)


_TABLE_PATH = Path(__file__).with_name("decode_configs.json")


@functools.cache
def _tables(device_name: str) -> dict[str, list[dict]] | None:
    """Per-GPU tables measured by `python -m vtensor.bench.decode_tune` (the same search for
    both layouts), or None for a GPU we have not tuned on."""
    return json.loads(_TABLE_PATH.read_text()).get(device_name)


@functools.lru_cache(maxsize=4096)  # hot path: every decode call of every layer (eager mode)
def tuned_config(device_name: str, paged: bool, b: int, max_seq_len: int) -> DecodeConfig | None:
    """The tuned config of the nearest measured shape (the smallest measured batch >= b, the
    context nearest in log scale), or None for a GPU without a table."""
    tables = _tables(device_name)
    if tables is None:
        return None
    rows = tables["paged" if paged else "virtual"]
    batches = sorted({r["batch"] for r in rows})
    tb = next((x for x in batches if x >= b), batches[-1])
    rows = [r for r in rows if r["batch"] == tb]
    best = min(rows, key=lambda r: (abs(math.log2(r["ctx"] / max(1, max_seq_len))), -r["ctx"]))
    return DecodeConfig(**{k: v for k, v in best.items() if k not in ("batch", "ctx")})


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def default_config(
    b: int, hkv: int, max_seq_len: int, d: int, paged: bool, device: torch.device
) -> DecodeConfig:
    """Tuned per GPU for 8 kv heads x head_dim 128 (Llama-3-8B shapes); else generic."""
    if device.type == "cuda" and d == 128 and hkv == 8:
        cfg = tuned_config(_device_name(device), paged, b, max_seq_len)
        if cfg is not None:
            return cfg
    return DecodeConfig(block_n=64 if d <= 128 else 32)


_SEMS: dict[torch.device, torch.Tensor] = {}


def _semaphores(device: torch.device, n: int) -> torch.Tensor | None:
    """Per-(seq, kv_head) arrival counters for the fused merge; they return to 0 after every
    call, so one zeroed buffer per device serves all calls and graph replays. None while a
    CUDA graph is being captured and the buffer is too small (no allocation in a capture)."""
    sem = _SEMS.get(device)
    if sem is None or sem.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        sem = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _SEMS[device] = sem
    return sem


def decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    slot_ids: torch.Tensor | None,
    block_table: torch.Tensor | None,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [b, Hq, d]; caches [slots|blocks, tokens, Hkv, d]; exactly one of slot_ids /
    block_table. Returns o: [b, Hq, d] in q's dtype (`out` if given). config / num_splits /
    block_n override the per-shape choice (benchmarks, tests)."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    if d & (d - 1) or d < 16:
        raise ValueError(f"triton decode needs a power-of-two head_dim >= 16, got {d}")
    if (slot_ids is None) == (block_table is None):
        raise ValueError("pass exactly one of slot_ids (virtual) or block_table (paged)")
    o = torch.empty_like(q) if out is None else out
    if b == 0:
        return o
    interp = not q.is_cuda
    paged = block_table is not None
    cfg = config or default_config(b, hkv, max_seq_len, d, paged, q.device)
    if block_n is not None:
        cfg = replace(cfg, block_n=block_n)
    if num_splits is not None:
        cfg = replace(cfg, num_splits=num_splits)
    bn = cfg.block_n
    if cfg.num_splits is None:
        splits, _ = plan_splits(b, hkv, max_seq_len, bn, _num_sms(q.device))
    else:
        tiles = max(1, math.ceil(max_seq_len / bn))
        chunk = math.ceil(tiles / max(1, cfg.num_splits)) * bn
        splits = math.ceil(max_seq_len / chunk)
    direct = splits == 1
    sem = _semaphores(q.device, b * hkv) if cfg.fused and not direct else None
    fused = sem is not None
    if direct:
        mo = ml = o  # unused
        smo = (0, 0, 0)
        sml = (0, 0)
    else:
        mo = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
        smo = mo.stride()[:3]
        sml = ml.stride()[:2]
    bt = block_table if paged else seq_lens
    slots = slot_ids if not paged else seq_lens
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (hkv, b, splits) if cfg.head_fast else (b, hkv, splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, slots, bt, seq_lens, o, mo, ml,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        bt.stride(0) if paged else 0, o.stride(0), o.stride(1), *smo, *sml,
        sem if fused else seq_lens, scale * _LOG2E, hkv,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_N=bn, PAGE=k_cache.shape[1] if paged else 1, PAGED=paged, DIRECT=direct,
        UPCAST=interp, PREC=prec, HEAD_FAST=cfg.head_fast, ROTATE=cfg.rotate, FUSED=fused,
        SPLIT_TILE=16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not direct and not fused:
        _decode_reduce_kernel[(b, hq)](
            o, mo, ml, seq_lens, o.stride(0), o.stride(1), *smo, *sml, splits, BLOCK_N=bn,
            HEAD_DIM=d, SPLITS_PAD=max(16, triton.next_power_of_2(splits)), SPLIT_TILE=16,
            num_warps=4,
        )  # fmt: skip
    return o
