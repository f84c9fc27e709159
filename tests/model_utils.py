"""Helpers shared by the model tests: a plain (non-virtual) KV tensor and context builders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtensor.model import AttentionContext, AttentionMetadata, ModelConfig, set_context
from vtensor.ops import select_backend


def make_kv(config: ModelConfig, num_slots: int, max_tokens: int, dtype, device="cpu"):
    """kv[slot, token, layer, k_or_v, kv_head, dim] filled with large garbage (a correct model
    masks everything it has not written), and its per-layer (k, v) views."""
    base = torch.randn(
        num_slots, max_tokens, config.num_layers, 2, config.num_kv_heads, config.head_dim,
        device=device,
    ).mul_(100).to(dtype)  # fmt: skip
    views = [(base[:, :, i, 0], base[:, :, i, 1]) for i in range(config.num_layers)]
    return base, views


BLOCK = 16  # paged baseline block size


def make_paged_kv(config: ModelConfig, num_blocks: int, dtype, device="cpu"):
    """Per-layer (k, v) block pools [num_blocks, BLOCK, kv_heads, dim], garbage-filled."""
    shape = (config.num_layers, 2, num_blocks, BLOCK, config.num_kv_heads, config.head_dim)
    base = torch.randn(shape, device=device).mul_(100).to(dtype)
    return [(base[i, 0], base[i, 1]) for i in range(config.num_layers)]


@dataclass
class Chunk:
    slot: int
    start: int  # tokens of this sequence already in the KV cache
    token_ids: list[int]


def run_step(
    model,
    kv_views,
    chunks: list[Chunk],
    *,
    is_prefill: bool,
    max_tokens: int,
    backend: str = "torch",
    device="cpu",
    block_tables: dict[int, list[int]] | None = None,
) -> torch.Tensor:
    """One engine-like step over several sequences; returns fp32 logits of every new token.
    With block_tables (slot -> block ids), kv_views are paged [blocks, BLOCK, kv_heads, d]."""
    ids, pos, store_a, store_b = [], [], [], []
    for c in chunks:
        ids += c.token_ids
        new = range(c.start, c.start + len(c.token_ids))
        pos += new
        if block_tables is None:
            store_a += [c.slot] * len(new)
            store_b += new
        else:
            table = block_tables[c.slot]
            store_a += [table[p // BLOCK] for p in new]
            store_b += [p % BLOCK for p in new]

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    lens_q = [len(c.token_ids) for c in chunks]
    cu = [0]
    for n in lens_q:
        cu.append(cu[-1] + n)
    paged = block_tables is not None
    index = [block_tables[c.slot] for c in chunks] if paged else [[c.slot] for c in chunks]
    meta = AttentionMetadata(is_prefill, kv_views, i32(store_a), i32(store_b), i32(index))
    if is_prefill:
        meta.prefix_lens = i32([c.start for c in chunks])
        meta.cu_seqlens_q = i32(cu)
        meta.max_seqlen_q = max(lens_q)
        meta.max_seqlen_k = max(c.start + len(c.token_ids) for c in chunks)
    else:
        assert all(n == 1 for n in lens_q)
        meta.seq_lens = i32([c.start + 1 for c in chunks])
        meta.max_seq_len = max_tokens
    k0 = kv_views[0][0]
    be = select_backend(backend, paged=paged, device=k0.device, dtype=k0.dtype,
                        head_dim=k0.shape[-1])  # fmt: skip
    ctx = AttentionContext(be, meta)
    # int64 ids/positions in prefill, int32 in decode: the model must take either
    idx_dtype = torch.long if is_prefill else torch.int32
    input_ids = torch.tensor(ids, dtype=idx_dtype, device=device)
    positions = torch.tensor(pos, dtype=idx_dtype, device=device)
    with set_context(ctx):
        hidden = model(input_ids, positions)
    return model.compute_logits(hidden)


def chunked_logits(
    model,
    config,
    seqs: list[list[int]],
    slots: list[int],
    splits: list[list[int]],
    max_tokens: int,
    dtype=torch.float32,
    device="cpu",
    backend: str = "torch",
    paged: bool = False,
) -> list[torch.Tensor]:
    """Feed each sequence in prefill chunks of the sizes in splits[i] (all sequences in every
    step), then decode the rest one token per step; returns per-sequence logits [len, vocab].
    paged: block pools + shuffled block tables instead of the slot-major KV tensor."""
    tables = None
    if paged:
        per_seq = -(-max_tokens // BLOCK)
        num_blocks = per_seq * (max(slots) + 1)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        tables = {s: order[s * per_seq : (s + 1) * per_seq] for s in slots}
        views = make_paged_kv(config, num_blocks, dtype, device)
    else:
        _, views = make_kv(config, max(slots) + 1, max_tokens, dtype, device)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    done = [0] * len(seqs)
    for step in range(len(splits[0])):
        chunks = []
        for i, s in enumerate(seqs):
            n = splits[i][step]
            chunks.append(Chunk(slots[i], done[i], s[done[i] : done[i] + n]))
        logits = run_step(model, views, chunks, is_prefill=True, max_tokens=max_tokens,
                          backend=backend, device=device, block_tables=tables)  # fmt: skip
        off = 0
        for i, c in enumerate(chunks):
            out[i].append(logits[off : off + len(c.token_ids)])
            off += len(c.token_ids)
            done[i] += len(c.token_ids)
    while any(done[i] < len(s) for i, s in enumerate(seqs)):
        active = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        chunks = [Chunk(slots[i], done[i], [seqs[i][done[i]]]) for i in active]
        logits = run_step(model, views, chunks, is_prefill=False, max_tokens=max_tokens,
                          backend=backend, device=device, block_tables=tables)  # fmt: skip
        for row, i in enumerate(active):
            out[i].append(logits[row : row + 1])
            done[i] += 1
    return [torch.cat(o) for o in out]


# ----------------------------------------------------------------- float64 reference attention
# Kept for tests/engine_utils.py (written while vtensor.ops was in progress); a no-op now that
# vtensor.ops has its own references.


def _ref_store_kv(k, v, k_cache, v_cache, slots, positions):
    k_cache[slots.long(), positions.long()] = k
    v_cache[slots.long(), positions.long()] = v


def _ref_attend(q, k, v, scale, q_pos):
    # q: [m, H, d]; k, v: [L, KVH, d]; q_pos: [m] absolute positions (causal)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = torch.einsum("mhd,lhd->hml", q.double(), k) * scale
    mask = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos.to(q.device)[:, None]
    p = s.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hml,lhd->mhd", p, v).to(q.dtype)


def _ref_prefill(q, kc, vc, *, slot_ids, prefix_lens, cu_seqlens_q, scale, **_):
    out = torch.empty_like(q)
    for i in range(len(slot_ids)):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        p, s = int(prefix_lens[i]), int(slot_ids[i])
        pos = torch.arange(p, p + b - a)
        out[a:b] = _ref_attend(q[a:b], kc[s, : p + b - a], vc[s, : p + b - a], scale, pos)
    return out


def _ref_decode(q, kc, vc, *, slot_ids, seq_lens, scale, **_):
    out = torch.empty_like(q)
    for i in range(len(slot_ids)):
        n, s = int(seq_lens[i]), int(slot_ids[i])
        last = torch.tensor([n - 1])
        out[i : i + 1] = _ref_attend(q[i : i + 1], kc[s, :n], vc[s, :n], scale, last)
    return out


def install_reference_ops(monkeypatch) -> None:
    """Patch in the float64 references for any op vtensor.ops lacks (none, once it is done)."""
    from vtensor import ops

    refs = [
        ("store_kv", _ref_store_kv),
        ("prefill_attention", _ref_prefill),
        ("decode_attention", _ref_decode),
    ]
    for name, fn in refs:
        if not hasattr(ops, name):
            monkeypatch.setattr(ops, name, fn, raising=False)
