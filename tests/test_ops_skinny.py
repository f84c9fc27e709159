"""Skinny GEMM (decode-sized Linear layers): the Triton kernel (interpreter on CPU, the H200 with
the `gpu` marker) against torch matmul on random inputs, and the per-GPU table dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtensor.ops import linear as linear_mod
from vtensor.ops.linear import Linear, linear, skinny_config
from vtensor.ops.triton_skinny import SkinnyConfig, _semaphores, skinny_linear

SMALL = dict(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, dev: str = "cpu"):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(dev)
    b = torch.randn(n, generator=g).to(dtype).to(dev) if bias else None
    return x, w, b


def _reference(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k,split,bias",
    [
        (1, 48, 64, 1, False),
        (3, 40, 96, 2, True),  # N not a multiple of block_n; K not of block_k * split
        (16, 64, 128, 4, False),
        (20, 32, 64, 2, True),  # two m tiles share each n tile's counter slots
        (5, 16, 160, 3, False),  # 160 / 3 splits -> 2 tiles each, the last split shorter
    ],
)
def test_skinny_matches_matmul(m, n, k, split, bias, dtype):
    x, w, b = _inputs(m, n, k, dtype, bias)
    y = skinny_linear(x, w, b, SkinnyConfig(split_k=split, **SMALL))
    assert y is not None and y.shape == (m, n) and y.dtype == dtype
    ref = _reference(x, w, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)


def test_split_counters_return_to_zero_between_calls():
    """The arrival counters are shared by every call: a call that left one non-zero would make
    the next call's tile finish early with partial sums."""
    x, w, _ = _inputs(4, 32, 128, torch.float32, False)
    cfg = SkinnyConfig(split_k=4, **SMALL)
    first = skinny_linear(x, w, None, cfg)
    assert int(_semaphores(x.device, 1).abs().sum()) == 0
    x2, w2, _ = _inputs(7, 48, 128, torch.float32, False)
    second = skinny_linear(x2, w2, None, cfg)
    torch.testing.assert_close(first.double(), _reference(x, w, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second.double(), _reference(x2, w2, None), atol=1e-5, rtol=1e-5)


def test_rejects_mismatched_shapes():
    x, w, _ = _inputs(2, 16, 64, torch.float32, False)
    with pytest.raises(ValueError, match="skinny_linear"):
        skinny_linear(x[:, :32], w)


def test_table_picks_the_first_range_that_holds_m(monkeypatch):
    table = {"64x32": [{"max_m": 1, **SMALL, "split_k": 2}, {"max_m": 4, "cublas": True},
                       {"max_m": 16, **SMALL}]}
    monkeypatch.setattr(linear_mod, "_table", lambda name: table)
    skinny_config.cache_clear()
    try:
        assert skinny_config("gpu", 64, 32, 1) == SkinnyConfig(split_k=2, **SMALL)
        assert skinny_config("gpu", 64, 32, 3) is None  # cuBLAS won at M = 4
        assert skinny_config("gpu", 64, 32, 9) == SkinnyConfig(**SMALL)
        assert skinny_config("gpu", 64, 32, 17) is None  # past the tuned ranges: cuBLAS
        assert skinny_config("gpu", 32, 64, 1) is None  # untuned shape
    finally:
        skinny_config.cache_clear()


def test_table_off_switch(monkeypatch):
    monkeypatch.setenv("VTENSOR_SKINNY_GEMM", "0")
    linear_mod._table.cache_clear()
    try:
        assert linear_mod._table("NVIDIA H200") == {}
    finally:
        linear_mod._table.cache_clear()


def test_linear_module_is_nn_linear_on_cpu():
    """Same parameters as nn.Linear (checkpoints load unchanged); on the CPU, F.linear."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 40, bias=True)
    mod = Linear(24, 40, bias=True)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(mod(x), ref(x))
    assert torch.equal(linear(x, ref.weight, ref.bias), F.linear(x, ref.weight, ref.bias))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336)])
def test_skinny_gpu_matches_cublas(m, n, k):
    x, w, _ = _inputs(m, n, k, torch.bfloat16, False, "cuda")
    ref = F.linear(x.float(), w.float())
    for cfg in (SkinnyConfig(block_m=16 if m <= 16 else 64), SkinnyConfig(split_k=4)):
        y = skinny_linear(x, w, None, cfg)
        torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_skinny_gpu_replays_in_a_cuda_graph():
    x, w, b = _inputs(8, 4096, 4096, torch.bfloat16, True, "cuda")
    cfg = SkinnyConfig(split_k=4)
    skinny_linear(x, w, b, cfg)  # counters allocated outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = skinny_linear(x, w, b, cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float(), b.float()),
                                   atol=3e-2, rtol=2e-2)  # fmt: skip
