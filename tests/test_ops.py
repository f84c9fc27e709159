"""Attention ops vs a float64 torch reference: torch refs, Triton (interpreter on CPU), FA2 (GPU).

Caches are layer views of one [slots, max_tokens, layers, 2, kv_heads, dim] tensor (strided,
token-major, like KVLayout); slots are out of order; outputs are poisoned with NaN first.
"""

from __future__ import annotations

import math

import pytest
import torch

from vtensor import ops
from vtensor.ops import paged
from vtensor.ops.triton_decode import DecodeConfig, decode_triton
from vtensor.ops.triton_prefill import prefill_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16  # paged block size


def _naive(q, k, v, prefix, scale):
    """float64 per-row softmax attention; q [m, Hq, d], k/v [n, Hkv, d], row j sees prefix+j+1."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    out = []
    for j in range(q.shape[0]):
        n = prefix + j + 1
        s = torch.einsum("hd,nhd->hn", q[j].double(), k[:n]) * scale
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v[:n]))
    return torch.stack(out)


class Setup:
    """Random requests written into a strided virtual cache and an equivalent paged cache."""

    def __init__(self, hq, hkv, d, prefixes, news, dtype, max_tokens=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        self.prefixes, self.news = prefixes, news
        b = len(prefixes)
        self.lens = [p + n for p, n in zip(prefixes, news, strict=True)]
        self.max_tokens = max_tokens or max(self.lens) + 5
        n_slots = b + 2
        buf = torch.randn(n_slots, self.max_tokens, 3, 2, hkv, d, generator=g).to(dtype).to(DEV)
        self.kc, self.vc = buf[:, :, 1, 0], buf[:, :, 1, 1]
        perm = torch.randperm(n_slots, generator=g)[:b]  # slots out of order
        self.slots = perm.to(torch.int32).to(DEV)
        # paged copy: blocks shuffled, block_size 16
        nblk = [math.ceil(n / BS) for n in self.lens]
        total = sum(nblk) + 3
        order = torch.randperm(total, generator=g).tolist()
        self.kb = torch.randn(total, BS, 2, hkv, d, generator=g).to(dtype).to(DEV)[:, :, 0]
        self.vb = torch.randn(total, BS, hkv, d, generator=g).to(dtype).to(DEV)
        table = torch.zeros(b, max(nblk), dtype=torch.int32)
        for i, nb in enumerate(nblk):
            table[i, :nb] = torch.tensor(order[:nb], dtype=torch.int32)
            order = order[nb:]
        self.table = table.to(DEV)
        for i, n in enumerate(self.lens):
            s = int(self.slots[i])
            t = torch.arange(n)
            sm = (table[i, t // BS].long() * BS + t % BS).to(DEV)
            paged.paged_store_kv(self.kc[s, :n], self.vc[s, :n], self.kb, self.vb, sm)
        self.scale = d**-0.5
        self.cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
        self.cu = self.cu.to(DEV)
        self.q = torch.randn(sum(news), hq, d, generator=g).to(dtype).to(DEV)
        self.qd = torch.randn(b, hq, d, generator=g).to(dtype).to(DEV)
        self.prefix_t = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
        self.lens_t = torch.tensor(self.lens, dtype=torch.int32, device=DEV)

    def prefill_ref(self):
        out, c = [], self.cu.tolist()
        for i, p in enumerate(self.prefixes):
            s = int(self.slots[i])
            out.append(_naive(self.q[c[i] : c[i + 1]], self.kc[s], self.vc[s], p, self.scale))
        return torch.cat(out)

    def decode_ref(self):
        out = []
        for i, n in enumerate(self.lens):
            s = int(self.slots[i])
            out.append(_naive(self.qd[i : i + 1], self.kc[s], self.vc[s], n - 1, self.scale))
        return torch.cat(out)


def _tol(dtype):
    return {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[
        dtype
    ]


def _check(o, ref, dtype):
    assert not torch.isnan(o).any()
    err = (o.double() - ref).abs().max().item()
    assert err < _tol(dtype), err


# (hq, hkv, d, prefixes, news): 1-token requests, prefix 0, lengths off every tile size.
CASES = [
    (4, 4, 16, [0, 37, 5], [1, 19, 33]),  # group 1
    (8, 2, 32, [17, 0], [1, 50]),  # group 4
    (8, 1, 16, [0, 40], [3, 1]),  # group 8
    (9, 3, 64, [13], [21]),  # group 3 (SmolLM2) -> padded to 16 rows
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_references(case, dtype):
    st = Setup(*case, dtype=dtype)
    common = dict(cu_seqlens_q=st.cu, max_seqlen_q=max(st.news), max_seqlen_k=max(st.lens))
    o = ops.prefill_attention(
        st.q, st.kc, st.vc, slot_ids=st.slots, prefix_lens=st.prefix_t, scale=st.scale,
        backend="torch", **common,
    )  # fmt: skip
    _check(o, st.prefill_ref(), dtype)
    o = paged.paged_prefill_attention(
        st.q, st.kb, st.vb, block_table=st.table, prefix_lens=st.prefix_t, scale=st.scale,
        backend="torch", **common,
    )  # fmt: skip
    _check(o, st.prefill_ref(), dtype)
    dref = st.decode_ref()
    o = ops.decode_attention(
        st.qd, st.kc, st.vc, slot_ids=st.slots, seq_lens=st.lens_t, max_seq_len=st.max_tokens,
        scale=st.scale, backend="torch",
    )  # fmt: skip
    _check(o, dref, dtype)
    o = paged.paged_decode_attention(
        st.qd, st.kb, st.vb, block_table=st.table, seq_lens=st.lens_t,
        max_seq_len=st.max_tokens, scale=st.scale, backend="torch",
    )  # fmt: skip
    _check(o, dref, dtype)


def _poisoned(fn, *args, **kw):
    """Run a Triton launcher whose torch.empty output we poison via a NaN-filled allocator."""
    orig = torch.empty_like

    def nan_like(t, *a, **k):
        return orig(t, *a, **k).fill_(float("nan"))

    torch.empty_like = nan_like
    try:
        return fn(*args, **kw)
    finally:
        torch.empty_like = orig


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode(case, dtype):
    st = Setup(*case, dtype=dtype, seed=1)
    ref = st.decode_ref()
    for splits in (None, 3):
        kw = dict(seq_lens=st.lens_t, max_seq_len=st.max_tokens, scale=st.scale, num_splits=splits)
        o = _poisoned(decode_triton, st.qd, st.kc, st.vc, slot_ids=st.slots, block_table=None, **kw)
        _check(o, ref, dtype)
        o = _poisoned(decode_triton, st.qd, st.kb, st.vb, slot_ids=None, block_table=st.table, **kw)
        _check(o, ref, dtype)


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill(case, dtype):
    st = Setup(*case, dtype=dtype, seed=2)
    ref = st.prefill_ref()
    kw = dict(prefix_lens=st.prefix_t, cu_seqlens_q=st.cu, max_seqlen_q=max(st.news),
              scale=st.scale)  # fmt: skip
    o = _poisoned(prefill_triton, st.q, st.kc, st.vc, slot_ids=st.slots, block_table=None, **kw)
    _check(o, ref, dtype)
    o = _poisoned(prefill_triton, st.q, st.kb, st.vb, slot_ids=None, block_table=st.table, **kw)
    _check(o, ref, dtype)


@pytest.mark.parametrize("paged", [False, True])
def test_triton_backend_mixed_step_runs_decode_rows_as_decodes(paged):
    """A prefill step with one-token rows first (as the runner orders them): those go through
    the decode kernel, the prompt chunks through the prefill kernel, into one output."""
    from vtensor.ops.backends import AttentionMetadata, TritonBackend

    st = Setup(8, 2, 16, [37, 12, 0, 20, 0, 5], [1, 1, 1, 19, 40, 33], torch.float32, seed=8)
    ref = st.prefill_ref()
    d = 3
    none = st.slots[:0]
    meta = AttentionMetadata(
        True, [(st.kb, st.vb) if paged else (st.kc, st.vc)], none, none,
        st.table if paged else st.slots[:, None], prefix_lens=st.prefix_t, cu_seqlens_q=st.cu,
        max_seqlen_q=max(st.news), max_seqlen_k=max(st.lens), seq_lens=st.lens_t[:d],
        max_seq_len=max(st.lens[:d]), num_decodes=d,
    )  # fmt: skip
    be = TritonBackend(paged)
    for _ in range(2):  # the second layer reuses the step's tile list
        o = be.forward(0, st.q, meta, st.scale)
        _check(o, ref, torch.float32)
    assert len(meta.derived) == 1


def test_prefill_tiles_lists_each_block_once_heaviest_first():
    from vtensor.ops.triton_prefill import prefill_tiles

    cu = torch.tensor([3, 4, 20, 20, 53], dtype=torch.int32)  # rows need not start at 0
    prefix = torch.tensor([100, 0, 7, 2], dtype=torch.int32)
    tiles = prefill_tiles(cu, prefix, 53, 16).tolist()
    real = [t for t in tiles if t[0] >= 0]
    assert sorted(map(tuple, real)) == [(0, 0), (1, 0), (3, 0), (3, 1), (3, 2)]
    assert all(t[0] == -1 for t in tiles[len(real):])  # the slack comes last
    seen = [int(prefix[s]) + min((m + 1) * 16, int(cu[s + 1] - cu[s])) for s, m in real]
    assert seen == sorted(seen, reverse=True)


def test_store_kv_and_errors():
    st = Setup(8, 2, 16, [3], [4], torch.float32)
    k = torch.randn(3, 2, 16, device=DEV)
    v = torch.randn(3, 2, 16, device=DEV)
    slots = torch.tensor([2, 0, 2], dtype=torch.int32, device=DEV)
    pos = torch.tensor([7, 1, 0], dtype=torch.int32, device=DEV)
    ops.store_kv(k, v, st.kc, st.vc, slots, pos)
    assert torch.equal(st.kc[2, 7], k[0]) and torch.equal(st.vc[0, 1], v[1])
    with pytest.raises(ops.AttentionBackendError):
        ops.store_kv(k[:, :1], v[:, :1], st.kc, st.vc, slots, pos)
    with pytest.raises(ops.AttentionBackendError, match="unknown backend"):
        ops.decode_attention(st.qd, st.kc, st.vc, slot_ids=st.slots, seq_lens=st.lens_t,
                             max_seq_len=8, scale=1.0, backend="cudnn")  # fmt: skip
    with pytest.raises(ops.AttentionBackendError, match="multiple of kv_heads"):
        ops.decode_attention(st.qd[:, :3], st.kc, st.vc, slot_ids=st.slots, seq_lens=st.lens_t,
                             max_seq_len=8, scale=1.0)  # fmt: skip
    if DEV == "cpu":
        with pytest.raises(ops.AttentionBackendError, match="CUDA"):
            ops.decode_attention(st.qd, st.kc, st.vc, slot_ids=st.slots, seq_lens=st.lens_t,
                                 max_seq_len=8, scale=1.0, backend="flash")  # fmt: skip


# ---- GPU, real sizes ----


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv", [(128, 32, 8), (64, 9, 3)])
def test_gpu_real_sizes(d, hq, hkv):
    torch.manual_seed(0)
    st = Setup(hq, hkv, d, [0, 1000, 3, 2047], [513, 1, 700, 129], torch.bfloat16, seed=3)
    pref = st.prefill_ref()
    kw = dict(prefix_lens=st.prefix_t, cu_seqlens_q=st.cu, max_seqlen_q=max(st.news),
              max_seqlen_k=max(st.lens), scale=st.scale)  # fmt: skip
    for backend in ("flash", "triton", "auto"):
        o = ops.prefill_attention(st.q, st.kc, st.vc, slot_ids=st.slots, backend=backend, **kw)
        _check(o, pref, torch.bfloat16)
    o = paged.paged_prefill_attention(st.q, st.kb, st.vb, block_table=st.table, **kw)
    _check(o, pref, torch.bfloat16)
    dref = st.decode_ref()
    kw = dict(seq_lens=st.lens_t, max_seq_len=st.max_tokens, scale=st.scale)
    for backend in ("flash", "triton", "auto"):
        o = ops.decode_attention(st.qd, st.kc, st.vc, slot_ids=st.slots, backend=backend, **kw)
        _check(o, dref, torch.bfloat16)
    o = paged.paged_decode_attention(st.qd, st.kb, st.vb, block_table=st.table, **kw)
    _check(o, dref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    st = Setup(32, 8, 128, [4000, 17], [1, 1], torch.bfloat16, seed=4)
    kw = dict(slot_ids=st.slots, seq_lens=st.lens_t, max_seq_len=st.max_tokens, scale=st.scale)
    ops.decode_attention(st.qd, st.kc, st.vc, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o = ops.decode_attention(st.qd, st.kc, st.vc, **kw)
    g.replay()
    torch.cuda.synchronize()
    _check(o, st.decode_ref(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_decode_configs_graph_replays(fused):
    """Every launch variant at real sizes, replayed from a CUDA graph many times (the fused
    merge's counters must come back to zero on the GPU, where programs really race)."""
    st = Setup(32, 8, 128, [4000, 17, 9000, 1], [1, 1, 1, 1], torch.bfloat16, seed=7)
    ref = st.decode_ref()
    for hf in (False, True):
        cfg = DecodeConfig(head_fast=hf, rotate=hf, fused=fused, num_splits=37)
        kw = dict(slot_ids=st.slots, block_table=None, seq_lens=st.lens_t,
                  max_seq_len=st.max_tokens, scale=st.scale, config=cfg)  # fmt: skip
        decode_triton(st.qd, st.kc, st.vc, **kw)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            o = decode_triton(st.qd, st.kc, st.vc, **kw)
        for _ in range(50):
            o.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            _check(o, ref, torch.bfloat16)


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(head_fast=True),
        DecodeConfig(rotate=True, num_splits=3, block_n=16),
        DecodeConfig(fused=True, num_splits=3),
        DecodeConfig(fused=True, rotate=True, head_fast=True, num_splits=20, block_n=16),
    ],
)
def test_triton_decode_configs(cfg):
    """The launch variants (grid order, staggered tiles, fused merge) compute the same thing;
    twice in a row, since the fused merge's counters must return to zero."""
    st = Setup(*CASES[1], dtype=torch.float32, seed=6)
    ref = st.decode_ref()
    kw = dict(seq_lens=st.lens_t, max_seq_len=st.max_tokens, scale=st.scale, config=cfg)
    for _ in range(2):
        o = _poisoned(decode_triton, st.qd, st.kc, st.vc, slot_ids=st.slots, block_table=None, **kw)
        _check(o, ref, torch.float32)
        o = _poisoned(decode_triton, st.qd, st.kb, st.vb, slot_ids=None, block_table=st.table, **kw)
        _check(o, ref, torch.float32)


def test_tuned_config_lookup():
    from vtensor.ops.triton_decode import _tables, tuned_config

    assert tuned_config("a GPU nobody tuned on", False, 8, 4096) is None
    rows = _tables("NVIDIA H200")
    for is_paged in (False, True):
        lay = rows["paged" if is_paged else "virtual"]
        want = next(r for r in lay if (r["batch"], r["ctx"]) == (64, 4096))
        got = tuned_config("NVIDIA H200", is_paged, 64, 4096)
        assert got.block_n == want["block_n"] and got.fused == want["fused"]
        # batch rounds up to a measured one; context snaps to the nearest in log scale
        assert tuned_config("NVIDIA H200", is_paged, 3, 5000) == tuned_config(
            "NVIDIA H200", is_paged, 4, 4096
        )
        assert tuned_config("NVIDIA H200", is_paged, 10_000, 10**6) == tuned_config(
            "NVIDIA H200", is_paged, 256, 32768
        )


def test_triton_decode_many_splits():
    """> 16 splits: the reduction walks its split tiles; a 1-token sequence exits early."""
    st = Setup(8, 2, 16, [599, 0], [1, 1], torch.float32, seed=5)
    kw = dict(seq_lens=st.lens_t, max_seq_len=st.max_tokens, scale=st.scale, num_splits=20)
    o = _poisoned(
        decode_triton, st.qd, st.kc, st.vc, slot_ids=st.slots, block_table=None, block_n=16, **kw
    )
    _check(o, st.decode_ref(), torch.float32)


@pytest.mark.parametrize("fused", [False, True])
def test_triton_decode_short_sequences_in_a_long_grid(fused):
    """A CUDA graph sizes the grid for max_model_len; each sequence spreads its real tokens
    over all the splits (1 tile up to many): lengths far below the bound, 0 and 1 included."""
    st = Setup(8, 2, 16, [0, 69, 129, 36, 0], [1, 1, 1, 1, 1], torch.float32, max_tokens=900,
               seed=7)  # fmt: skip
    lens = st.lens_t.clone()
    lens[4] = 0  # a row with no tokens yet must not divide by zero (its output is unused)
    cfg = DecodeConfig(fused=fused, num_splits=9, block_n=16)
    kw = dict(max_seq_len=st.max_tokens, scale=st.scale, config=cfg)
    ref = st.decode_ref()[:4]
    for _ in range(2):  # the fused merge's counters return to zero
        o = decode_triton(st.qd, st.kc, st.vc, slot_ids=st.slots, block_table=None,
                          seq_lens=lens, **kw)  # fmt: skip
        _check(o[:4], ref, torch.float32)
        o = decode_triton(st.qd, st.kb, st.vb, slot_ids=None, block_table=st.table,
                          seq_lens=lens, **kw)  # fmt: skip
        _check(o[:4], ref, torch.float32)


def test_reference_decode_ignores_nan_past_the_lengths():
    """The CPU engine path: cache rows past each sequence's length hold arbitrary memory (a
    preallocated paged pool is torch.empty); NaN there must not reach the output."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d, bs, lens = 3, 4, 2, 16, 4, [5, 1, 11]
    n_max = 12
    k = torch.randn(b, n_max, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n_max, hkv, d, generator=g, dtype=torch.float64)
    for i, n in enumerate(lens):
        k[i, n:], v[i, n:] = float("nan"), float("nan")
    q = torch.randn(b, hq, d, generator=g, dtype=torch.float64)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = torch.stack([
        _naive(q[i : i + 1], k[i, :n], v[i, :n], n - 1, d**-0.5)[0] for i, n in enumerate(lens)
    ])  # fmt: skip
    got = ops.decode_attention(q, k, v, slot_ids=torch.arange(b, dtype=torch.int32),
                               seq_lens=seq_lens, max_seq_len=n_max, scale=d**-0.5)  # fmt: skip
    assert torch.allclose(got, want, atol=1e-10)
    blocks_k = k.reshape(b * n_max // bs, bs, hkv, d)  # sequence i owns blocks 3i..3i+2
    blocks_v = v.reshape(b * n_max // bs, bs, hkv, d)
    table = torch.arange(b * n_max // bs, dtype=torch.int32).view(b, n_max // bs)
    got = paged.paged_decode_attention(
        q, blocks_k, blocks_v, block_table=table, seq_lens=seq_lens, max_seq_len=n_max,
        scale=d**-0.5,
    )  # fmt: skip
    assert torch.allclose(got, want, atol=1e-10)
