"""Fused layer ops: Triton kernels (interpreter on CPU) vs the torch references they replace.

On the CPU the kernels emulate round-to-nearest-even for bf16 (the interpreter truncates), so
ops whose fp32 math is the same as torch's (RoPE, residual add, K/V store) compare bit for
bit; norms and SiLU differ only by reduction order / exp and get one bf16 ulp.
"""

from __future__ import annotations

import pytest
import torch

from vtensor.ops import fused
from vtensor.ops.triton_fused import add_rms_norm_triton, rope_store_kv_triton, silu_mul_triton

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def _qkv(n: int, hq: int, hk: int, d: int, dtype: torch.dtype, g: torch.Generator, dev="cpu"):
    """q, k, v as views of one qkv GEMM output with padded rows (strided, last dim contiguous)."""
    width = (hq + 2 * hk) * d
    buf = torch.randn(n, width + 8, generator=g).to(dtype).to(dev)
    q, k, v = buf[:, :width].split([hq * d, hk * d, hk * d], dim=-1)
    return q.view(n, hq, d), k.view(n, hk, d), v.view(n, hk, d)


def _rope_tables(max_pos: int, d: int, dtype: torch.dtype, dev="cpu"):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    f = torch.arange(max_pos).float()[:, None] * inv[None, :]
    return f.cos().to(dtype).to(dev), f.sin().to(dtype).to(dev)


def _virtual_cache(slots: int, tokens: int, hk: int, d: int, dtype, g, dev="cpu"):
    """Layer 1's K and V views of a [slots, tokens, layers=3, 2, hk, d] buffer."""
    base = torch.randn(slots, tokens, 3, 2, hk, d, generator=g).to(dtype).to(dev)
    return base[:, :, 1, 0], base[:, :, 1, 1]


def _check_rope(n, hq, hk, d, dtype, paged, idx_dtype, seed=0, dev="cpu", impl=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(n, hq, hk, d, dtype, g, dev)
    cos, sin = _rope_tables(64, d, dtype, dev)
    pos = torch.randint(0, 64, (n,), generator=g).to(idx_dtype).to(dev)
    if paged:
        bs = 16
        blocks = n // bs + 3
        kc = torch.randn(blocks, bs, 2, hk, d, generator=g).to(dtype).to(dev)[:, :, 0]
        vc = torch.randn(blocks, bs, hk, d, generator=g).to(dtype).to(dev)
        sm = torch.randperm(blocks * bs, generator=g)[:n]
        da, db = (sm // bs).to(idx_dtype).to(dev), (sm % bs).to(idx_dtype).to(dev)
    else:
        kc, vc = _virtual_cache(5, 40, hk, d, dtype, g, dev)
        flat = torch.randperm(5 * 40, generator=g)[:n]  # distinct (slot, token) pairs
        da, db = (flat // 40).to(idx_dtype).to(dev), (flat % 40).to(idx_dtype).to(dev)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ref = fused.rope_store_kv_torch(q, k, v, pos, cos, sin, kc_ref, vc_ref, da, db)
    out = (impl or rope_store_kv_triton)(q, k, v, pos, cos, sin, kc, vc, da, db)
    assert out.shape == (n, hq, d) and out.is_contiguous()
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0), "inputs modified"
    if dev == "cpu":
        assert torch.equal(out, ref)
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # untouched rows too
    else:  # exact by construction for bf16 (no FMA contraction); tolerance as a safety net
        torch.testing.assert_close(out, ref, **_tol(dtype))
        assert (out != ref).float().mean() < 1e-3
        torch.testing.assert_close(kc, kc_ref, **_tol(dtype))
        assert torch.equal(vc, vc_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,hq,hk,d,paged,idx",
    [
        (1, 4, 4, 16, False, torch.int32),  # MHA, one token
        (7, 6, 2, 24, False, torch.int64),  # GQA 3, non-power-of-2 heads and head dim
        (7, 8, 2, 32, True, torch.int32),  # paged pool
        (3, 5, 1, 64, True, torch.int64),  # MQA
    ],
)
def test_rope_store_kv_interpreter(n, hq, hk, d, paged, idx, dtype):
    _check_rope(n, hq, hk, d, dtype, paged, idx)


def test_rope_store_kv_dispatch_cpu_is_torch():
    _check_rope(5, 4, 2, 16, torch.bfloat16, False, torch.int64, impl=fused.rope_store_kv)


def test_rope_store_kv_int64_offsets():
    """A cache whose slot stride puts the written rows past 2^31 elements (sparse memory:
    only the touched pages are ever backed)."""
    hk, d, tokens = 2, 16, 4
    slot_stride = 2**30  # elements; slot 3 starts at 3 * 2^30 > 2^31
    try:
        storage = torch.empty(3 * slot_stride + tokens * hk * d, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 6 GiB of virtual memory")
    kc = storage.as_strided((4, tokens, hk, d), (slot_stride, hk * d, d, 1))
    vc = torch.zeros(4, tokens, hk, d, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(2, 4, hk, d, torch.bfloat16, g)
    cos, sin = _rope_tables(16, d, torch.bfloat16)
    pos = torch.tensor([3, 9])
    da, db = torch.tensor([3, 0], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32)
    kc[3, 2].zero_()
    kc[0, 1].zero_()
    q_rot = rope_store_kv_triton(q, k, v, pos, cos, sin, kc, vc, da, db)
    kr = fused.rotate_neox(k, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
    assert torch.equal(kc[3, 2], kr[0]) and torch.equal(kc[0, 1], kr[1])
    assert torch.equal(vc[3, 2], v[0]) and torch.equal(vc[0, 1], v[1])
    assert torch.equal(q_rot, fused.rotate_neox(q, cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)))


def test_rope_store_kv_empty():
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(0, 4, 2, 16, torch.float32, g)
    cos, sin = _rope_tables(8, 16, torch.float32)
    kc, vc = _virtual_cache(2, 4, 2, 16, torch.float32, g)
    e = torch.empty(0, dtype=torch.int64)
    assert rope_store_kv_triton(q, k, v, e, cos, sin, kc, vc, e, e).shape == (0, 4, 16)


# ---- residual add + RMSNorm ----


def _close_norm(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, **_tol(out.dtype))
    if out.dtype == torch.bfloat16:  # reduction order only: almost all bits equal
        assert (out != ref).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h", [(1, 64), (7, 96), (4, 200)])
def test_add_rms_norm_interpreter(n, h, dtype):
    g = torch.Generator().manual_seed(n * h)
    buf = torch.randn(n, h + 5, generator=g).to(dtype)
    x = buf[:, 3 : 3 + h]  # strided rows
    res = (torch.randn(n, h, generator=g) * 4).to(dtype)
    w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
    x0, res0 = x.clone(), res.clone()
    normed, new_res = add_rms_norm_triton(x, res, w, 1e-5)
    ref_n, ref_r = fused.fused_add_rms_norm_torch(x, res, w, 1e-5)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs modified"
    assert new_res is not None and torch.equal(new_res, ref_r)  # one rounding of x + residual
    _close_norm(normed, ref_n)
    plain, none = add_rms_norm_triton(x, None, w, 1e-6)
    assert none is None
    _close_norm(plain, fused.rms_norm_torch(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_interpreter(dtype):
    """Qwen3's q/k norm: [n, heads, d] views of the qkv output."""
    g = torch.Generator().manual_seed(3)
    q, _, _ = _qkv(5, 3, 1, 32, dtype, g)
    w = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype)
    out, _ = add_rms_norm_triton(q, None, w, 1e-6)
    _close_norm(out, fused.rms_norm_torch(q, w, 1e-6))


def test_norm_dispatch_cpu_is_torch():
    g = torch.Generator().manual_seed(4)
    x, r = torch.randn(3, 40, generator=g).bfloat16(), torch.randn(3, 40, generator=g).bfloat16()
    w = torch.randn(40, generator=g).bfloat16()
    n, s = fused.fused_add_rms_norm(x, r, w, 1e-6)
    rn, rs = fused.fused_add_rms_norm_torch(x, r, w, 1e-6)
    assert torch.equal(n, rn) and torch.equal(s, rs)
    assert torch.equal(fused.rms_norm(x, w, 1e-6), fused.rms_norm_torch(x, w, 1e-6))


# ---- SiLU(gate) * up ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,inter", [(1, 64), (7, 100), (3, 1500)])
def test_silu_mul_interpreter(n, inter, dtype):
    g = torch.Generator().manual_seed(inter)
    buf = (torch.randn(n, 2 * inter + 4, generator=g) * 3).to(dtype)
    x = buf[:, : 2 * inter]  # strided rows
    out = silu_mul_triton(x)
    ref = fused.silu_mul_torch(x)
    assert out.shape == (n, inter) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **_tol(dtype))
    assert torch.equal(fused.silu_mul(x), ref)  # CPU dispatch is the torch math


# ---- H200 sizes (Llama-3-8B, bf16) ----

GPU = pytest.mark.gpu


@GPU
@pytest.mark.parametrize("n", [1, 7, 256, 4099])
def test_gpu_add_rms_norm_llama8b(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4096, generator=g).bfloat16().cuda()
    r = (torch.randn(n, 4096, generator=g) * 8).bfloat16().cuda()
    w = (1 + 0.1 * torch.randn(4096, generator=g)).bfloat16().cuda()
    normed, res = fused.fused_add_rms_norm(x, r, w, 1e-5)
    ref_n, ref_r = fused.fused_add_rms_norm_torch(x, r, w, 1e-5)
    assert torch.equal(res, ref_r)
    _close_norm(normed, ref_n)
    _close_norm(fused.rms_norm(x, w, 1e-5), fused.rms_norm_torch(x, w, 1e-5))


@GPU
@pytest.mark.parametrize("n", [1, 7, 256, 2049])
def test_gpu_silu_mul_llama8b(n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 2 * 14336, generator=g) * 3).bfloat16().cuda()
    out, ref = fused.silu_mul(x), fused.silu_mul_torch(x)
    # tl.exp vs expf can move silu by one ulp before the multiply rounds: allow ~2.5 ulps
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    assert (out != ref).float().mean() < 0.01


@GPU
@pytest.mark.parametrize("n,paged", [(1, False), (256, False), (4099, False), (256, True)])
def test_gpu_rope_store_kv_llama8b(n, paged):
    if paged:
        _check_rope(n, 32, 8, 128, torch.bfloat16, True, torch.int32, dev="cuda")
        return
    g = torch.Generator().manual_seed(n)
    q, k, v = _qkv(n, 32, 8, 128, torch.bfloat16, g, "cuda")
    cos, sin = _rope_tables(8192, 128, torch.bfloat16, "cuda")
    pos = torch.randint(0, 8192, (n,), generator=g).cuda()
    # [slots, tokens, layers, 2, Hk, D] (6.4 GiB): slot 2 starts past 2^31 elements, and the
    # last token of the last slot is always written (int64 offsets)
    slots, tokens = 3, 65540
    base = torch.empty(slots, tokens, 8, 2, 8, 128, dtype=torch.bfloat16, device="cuda")
    kc, vc = base[:, :, 5, 0], base[:, :, 5, 1]
    assert 2 * kc.stride(0) > 2**31
    flat = torch.randperm(slots * tokens - 1, generator=g)[:n]
    flat[0] = slots * tokens - 1
    flat = flat.cuda()
    da, db = flat // tokens, flat % tokens
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = fused.rope_store_kv_torch(q, k, v, pos, cos, sin, kc_ref, vc_ref, da, db)
    out = fused.rope_store_kv(q, k, v, pos, cos, sin, kc, vc, da, db)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert (out != ref).float().mean() < 1e-3  # bf16: exact by construction
    torch.testing.assert_close(kc[da, db], kc_ref[da, db], atol=1e-2, rtol=1e-2)
    assert torch.equal(vc[da, db], vc_ref[da, db])
