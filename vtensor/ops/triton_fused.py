"""Triton kernels of the fused layer ops (the public API and torch references: `fused.py`).

Each kernel reproduces the roundings of the torch sequence it replaces: values are upcast to
fp32 right after the load, and every intermediate that torch rounds to the activation dtype is
rounded here too (`_rnd`), so bf16 results differ from torch only where fp32 math does
(reduction order, exp), not by a skipped rounding.

All launches pass enable_fp_fusion=False: with fusion the backend narrows `(a * b).to(bf16)`
to a bf16 multiply and then contracts it with the following add into one `fma.rn.bf16`,
skipping the product's rounding that torch does (seen in the sm_90 PTX of the RoPE kernel).

The interpreter (CPU tests) truncates fp32 -> bf16 instead of rounding to nearest even; with
EMU_BF16 the kernels round by hand first so the CPU tests can compare bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rne_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), still as fp32 (finite x only)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, DT: tl.constexpr, EMU_BF16: tl.constexpr):
    """fp32 -> DT with round-to-nearest-even (the GPU default; emulated in the interpreter)."""
    if EMU_BF16:
        x = _rne_bf16(x)
    return x.to(DT)


@triton.jit
def _rnd(x, DT: tl.constexpr, EMU_BF16: tl.constexpr):
    """Round fp32 x to DT and back: what torch does when it stores an intermediate in DT."""
    return _cast(x, DT, EMU_BF16).to(tl.float32)


def _emu(t: torch.Tensor) -> bool:
    return not t.is_cuda and t.dtype == torch.bfloat16


def _warps(block: int) -> int:
    return min(16, max(1, block // 512))


# ---- residual add + RMSNorm ----


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, ro_ptr, R2, N,
    sx0, sx1, sr0, sr1, so0, so1, sro0, sro1, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr,
):  # fmt: skip
    # rows are (i, j) of a [R1, R2, N] view (R2 = 1 for 2-d inputs, heads for q/k norm)
    row = tl.program_id(0).to(tl.int64)
    i = row // R2
    j = row % R2
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    DT: tl.constexpr = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + i * sx0 + j * sx1 + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + i * sr0 + j * sr1 + cols, mask=mask, other=0.0).to(tl.float32)
        x = _rnd(r + x, DT, EMU_BF16)  # the residual stream is kept in the activation dtype
        tl.store(ro_ptr + i * sro0 + j * sro1 + cols, _cast(x, DT, EMU_BF16), mask=mask)
    var = tl.sum(x * x, axis=0) / N
    y = _rnd(x * tl.rsqrt(var + eps), DT, EMU_BF16)  # HF: normalize in fp32, cast, then weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # the fp32 product of two DT values is exact, so one rounding == torch's DT multiply
    tl.store(o_ptr + i * so0 + j * so1 + cols, _cast(y * w, DT, EMU_BF16), mask=mask)


def _rows3(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(R1, R2, stride0, stride1) of a 2-d [R1, N] or 3-d [R1, R2, N] tensor."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    return t.shape[0], t.shape[1], t.stride(0), t.stride(1)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """normed = RMSNorm(x + residual) and the new residual (both new contiguous tensors);
    residual None: plain RMSNorm of x. x: [n, N] or [n, heads, N], last dim contiguous."""
    assert x.dim() in (2, 3) and x.stride(-1) == 1, f"x {tuple(x.shape)} {x.stride()}"
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,) and weight.is_contiguous(), "weight must be [N] contiguous"
    assert weight.dtype == x.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert weight.device == x.device
    block = triton.next_power_of_2(n_cols)
    assert block <= 65536, "rows wider than 64K need a looped kernel"
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r1, r2, sx0, sx1 = _rows3(x)
    _, _, so0, so1 = _rows3(out)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.stride(-1) == 1 and residual.device == x.device
        res_out = torch.empty_like(out)
        _, _, sr0, sr1 = _rows3(residual)
        _, _, sro0, sro1 = _rows3(res_out)
        r_arg, ro_arg = residual, res_out
    else:
        res_out = None
        sr0 = sr1 = sro0 = sro1 = 0
        r_arg, ro_arg = x, out  # unused (HAS_RES is off)
    if out.numel() == 0:
        return out, res_out
    _add_rms_norm_kernel[(r1 * r2,)](
        x, r_arg, weight, out, ro_arg, r2, n_cols,
        sx0, sx1, sr0, sr1, so0, so1, sro0, sro1, eps,
        HAS_RES=residual is not None, BLOCK=block, EMU_BF16=_emu(x), num_warps=_warps(block),
        enable_fp_fusion=False,
    )  # fmt: skip
    return out, res_out


# ---- SiLU(gate) * up ----


@triton.jit
def _silu_mul_kernel(
    x_ptr, o_ptr, inter, sx, so, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr,
    ON_GPU: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    DT: tl.constexpr = o_ptr.dtype.element_ty
    base = x_ptr + row * sx
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu = x / (1 + expf(-x)) in fp32, result in DT. tl.exp is ex2.approx, a few ulps off
    # for large |x|; libdevice's expf and an IEEE divide match torch's CUDA kernel (the
    # interpreter has no libdevice; its numpy exp is exact enough).
    e = libdevice.exp(-g) if ON_GPU else tl.exp(-g)
    s = _rnd(tl.math.div_rn(g, 1.0 + e), DT, EMU_BF16)
    tl.store(o_ptr + row * so + cols, _cast(s * u, DT, EMU_BF16), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [n, 2I] (rows may be strided, last dim contiguous) -> silu(gate) * up [n, I]."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1, "gate_up must be [n, 2I], last dim 1"
    assert gate_up.shape[1] % 2 == 0
    assert gate_up.dtype in (torch.float32, torch.bfloat16, torch.float16)
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        BLOCK=block, EMU_BF16=_emu(gate_up), ON_GPU=gate_up.is_cuda, num_warps=_warps(block),
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ---- RoPE on q and k + K/V store ----


@triton.jit
def _rope_half(x1, x2, c, s, DT: tl.constexpr, EMU_BF16: tl.constexpr):
    # == torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin)) with each product rounded to DT
    o1 = _rnd(x1 * c, DT, EMU_BF16) - _rnd(x2 * s, DT, EMU_BF16)
    o2 = _rnd(x2 * c, DT, EMU_BF16) + _rnd(x1 * s, DT, EMU_BF16)
    return o1, o2


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, da_ptr, db_ptr, qo_ptr,
    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, s_cos, s_sin,
    skc_a, skc_b, skc_h, svc_a, svc_b, svc_h, sqo_n, sqo_h,
    HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, EMU_BF16: tl.constexpr, EMU_K: tl.constexpr,
    EMU_V: tl.constexpr,
):  # fmt: skip
    # one program per token: q and k heads roped with the token's cos/sin row, k and v stored
    tok = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    dims = tl.arange(0, HALF_PAD)
    dmask = dims < HALF
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    c = tl.load(cos_ptr + pos * s_cos + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * s_sin + dims, mask=dmask, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, HQ_PAD)
    qmask = (hq < HQ)[:, None] & dmask[None, :]
    q_in = q_ptr + tok * sq_n + hq[:, None] * sq_h + dims[None, :]
    q1 = tl.load(q_in, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_in + HALF, mask=qmask, other=0.0).to(tl.float32)
    o1, o2 = _rope_half(q1, q2, c, s, DT, EMU_BF16)
    q_out = qo_ptr + tok * sqo_n + hq[:, None] * sqo_h + dims[None, :]
    tl.store(q_out, _cast(o1, DT, EMU_BF16), mask=qmask)
    tl.store(q_out + HALF, _cast(o2, DT, EMU_BF16), mask=qmask)

    # destination row of this token; int64: a virtual cache spans more than 2^31 elements
    a = tl.load(da_ptr + tok).to(tl.int64)
    b = tl.load(db_ptr + tok).to(tl.int64)
    KC: tl.constexpr = kc_ptr.dtype.element_ty
    VC: tl.constexpr = vc_ptr.dtype.element_ty
    hk = tl.arange(0, HK_PAD)
    kmask = (hk < HK)[:, None] & dmask[None, :]
    k_in = k_ptr + tok * sk_n + hk[:, None] * sk_h + dims[None, :]
    k1 = tl.load(k_in, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k_in + HALF, mask=kmask, other=0.0).to(tl.float32)
    o1, o2 = _rope_half(k1, k2, c, s, DT, EMU_BF16)
    o1 = _rnd(o1, DT, EMU_BF16)  # roped k is a DT tensor before torch casts it to the cache
    o2 = _rnd(o2, DT, EMU_BF16)
    k_out = kc_ptr + a * skc_a + b * skc_b + hk[:, None] * skc_h + dims[None, :]
    tl.store(k_out, _cast(o1, KC, EMU_K), mask=kmask)
    tl.store(k_out + HALF, _cast(o2, KC, EMU_K), mask=kmask)

    v_in = v_ptr + tok * sv_n + hk[:, None] * sv_h + dims[None, :]
    v_out = vc_ptr + a * svc_a + b * svc_b + hk[:, None] * svc_h + dims[None, :]
    v1 = tl.load(v_in, mask=kmask, other=0.0).to(tl.float32)
    v2 = tl.load(v_in + HALF, mask=kmask, other=0.0).to(tl.float32)
    tl.store(v_out, _cast(v1, VC, EMU_V), mask=kmask)
    tl.store(v_out + HALF, _cast(v2, VC, EMU_V), mask=kmask)


def rope_store_kv_triton(
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
    """One launch: q_rot = RoPE(q) (a new contiguous [n, Hq, D] tensor), RoPE(k) and v written
    to k_cache/v_cache[dest_a[i], dest_b[i]]. Inputs are not modified."""
    n, hq, d = q.shape
    hk = k.shape[1]
    assert d % 2 == 0 and k.shape == (n, hk, d) and v.shape == k.shape, (q.shape, k.shape)
    assert hq % hk == 0, f"q heads {hq} not a multiple of kv heads {hk}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1, f"{name} needs a contiguous last dim, strides {t.stride()}"
    assert k.dtype == q.dtype and v.dtype == q.dtype
    assert q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert cos_cache.dim() == 2 and cos_cache.shape[1] == d // 2
    assert sin_cache.shape == cos_cache.shape, "cos/sin caches differ"
    assert cos_cache.stride(1) == 1 and sin_cache.stride(1) == 1
    # torch multiplies in the common dtype; the kernel assumes it is q's
    assert cos_cache.dtype == q.dtype and sin_cache.dtype == q.dtype, "cos/sin dtype != q's"
    assert k_cache.dim() == 4 and v_cache.dim() == 4, "caches must be 4-d [a, b, Hk, D]"
    assert k_cache.shape[2:] == (hk, d) and v_cache.shape[2:] == (hk, d), k_cache.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert positions.shape == (n,) and dest_a.shape == (n,) and dest_b.shape == (n,)
    for name, t in (("positions", positions), ("dest_a", dest_a), ("dest_b", dest_b)):
        assert t.dtype in (torch.int32, torch.int64), f"{name} must be int32/int64"
        assert t.stride(0) == 1 or n <= 1, f"{name} must be contiguous"
    dev = q.device
    for t in (k, v, positions, cos_cache, sin_cache, k_cache, v_cache, dest_a, dest_b):
        assert t.device == dev, f"all inputs on {dev}"
    q_rot = torch.empty(n, hq, d, dtype=q.dtype, device=dev)
    if n == 0:
        return q_rot
    half = d // 2
    _rope_store_kv_kernel[(n,)](
        q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, dest_a, dest_b, q_rot,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        *k_cache.stride()[:3], *v_cache.stride()[:3], q_rot.stride(0), q_rot.stride(1),
        HQ=hq, HK=hk, HQ_PAD=triton.next_power_of_2(hq), HK_PAD=triton.next_power_of_2(hk),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), EMU_BF16=_emu(q),
        EMU_K=_emu(k_cache), EMU_V=_emu(v_cache), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q_rot
