"""Attention backends: chosen once per engine, one `forward` per layer call.

    KV manager (integers) --> runner --> AttentionMetadata (one per step, both layouts)
                                              |
    Attention layer: rope + store at [store_a[i], store_b[i]], then backend.forward(...)
                                              |
              TorchBackend | TritonBackend | FlashBackend  (x virtual | paged layout)

The metadata is layout-agnostic to the model: token i's K/V go to k_cache[store_a[i],
store_b[i]] (virtual: slot, position; paged: block id, offset in the block), and `kv_index`
says where each sequence's KV lives (a table of blocks; a virtual slot is one block that holds
the whole sequence, so its table has one column: the slot id). Only the backend reads it.
Prefill or decode is decided by `meta.is_prefill`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vtensor.ops.reference import decode_attention_torch, prefill_attention_torch

BACKENDS = ("auto", "torch", "triton", "flash")


class AttentionBackendError(ValueError):
    """Bad arguments for an attention op, or a backend that cannot run on these inputs."""


@dataclass(slots=True)
class AttentionMetadata:
    is_prefill: bool
    # Per layer (k_cache, v_cache). virtual: [slots, max_tokens, kv_heads, head_dim] views of one
    # reservation; paged: [num_blocks, block_size, kv_heads, head_dim] block pools.
    kv_views: list[tuple[torch.Tensor, torch.Tensor]]
    # [n] int: token i's K/V go to k_cache[store_a[i], store_b[i]] (virtual: slot, position;
    # paged: block id, offset in the block).
    store_a: torch.Tensor
    store_b: torch.Tensor
    # [b, width] int32 blocks of each sequence (virtual: width 1, the slot id).
    kv_index: torch.Tensor
    # prefill: tokens already in KV before this step, query offsets [b + 1], max lengths.
    prefix_lens: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # decode: total KV length including the new token; a static upper bound for split-K sizing
    # (static so that CUDA graphs captured once stay valid).
    seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    # prefill steps: rows [0, num_decodes) are one-token rows (decodes, placed first), whose
    # seq_lens / max_seq_len (the real max) are set too, so a backend may run them as decodes
    num_decodes: int = 0
    # values a backend derives from this step's metadata at the first layer and reuses at the
    # others (the prefill tile list)
    derived: dict = field(default_factory=dict)


def check_kv_views(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise AttentionBackendError(
            f"k/v caches must be 4-d [slots, tokens, kv_heads, dim], got {tuple(k_cache.shape)}"
        )
    if k_cache.shape != v_cache.shape:
        raise AttentionBackendError(f"k/v cache shapes differ: {k_cache.shape} vs {v_cache.shape}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise AttentionBackendError("q and the k/v caches need a contiguous last dim")
    if q.dim() != 3 or q.shape[-1] != k_cache.shape[-1]:
        raise AttentionBackendError(
            f"q must be [n, q_heads, {k_cache.shape[-1]}], got {tuple(q.shape)}"
        )
    if q.shape[1] % k_cache.shape[2] != 0:
        raise AttentionBackendError(
            f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k_cache.shape[2]})"
        )
    if q.device != k_cache.device:
        raise AttentionBackendError(f"q on {q.device} but the cache on {k_cache.device}")


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    dest_a: torch.Tensor,
    dest_b: torch.Tensor,
) -> None:
    """k_cache[dest_a[i], dest_b[i]] = k[i] (same for v); k, v: [n, kv_heads, dim]. One
    index_put_ per cache: a single scatter kernel on CUDA, no host sync, any strides."""
    if k.shape[1:] != k_cache.shape[2:] or v.shape != k.shape:
        raise AttentionBackendError(
            f"k/v {tuple(k.shape)} do not match the cache's [*, {tuple(k_cache.shape[2:])}]"
        )
    a, b = dest_a.long(), dest_b.long()
    k_cache[a, b] = k.to(k_cache.dtype)
    v_cache[a, b] = v.to(v_cache.dtype)


class AttentionBackend(ABC):
    """One attention implementation for one KV layout. `forward` runs the layer's prefill or
    decode attention over K/V that are already in the cache (stored before the call)."""

    name: str
    # runs from metadata padded to fixed shapes (grids sized from static bounds, rows with
    # seq_len 0 and empty sequences skipped): what prefill-step CUDA graphs replay
    static_shapes: bool = False

    def __init__(self, paged: bool) -> None:
        self.paged = paged

    def forward(self, layer_idx: int, q: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
        """q: [n, q_heads, dim] (prefill: packed by cu_seqlens_q; decode: one per sequence)
        -> o: [n, q_heads, dim]."""
        k_cache, v_cache = meta.kv_views[layer_idx]
        check_kv_views(q, k_cache, v_cache)
        if meta.is_prefill:
            return self.prefill(q, k_cache, v_cache, meta, scale)
        return self.decode(q, k_cache, v_cache, meta, scale)

    # the kernels take exactly one of slot ids [b] (virtual) / block table [b, w] (paged)
    def slot_ids(self, meta: AttentionMetadata) -> Tensor | None:
        return None if self.paged else meta.kv_index[:, 0]

    def block_table(self, meta: AttentionMetadata) -> Tensor | None:
        return meta.kv_index if self.paged else None

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float
                ) -> Tensor:  # fmt: skip
        prefill, _ = self.kernels()
        return prefill(
            q, k, v, slot_ids=self.slot_ids(meta), block_table=self.block_table(meta),
            prefix_lens=meta.prefix_lens, cu_seqlens_q=meta.cu_seqlens_q,
            max_seqlen_q=meta.max_seqlen_q, scale=scale,
        )  # fmt: skip

    def decode(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float
               ) -> Tensor:  # fmt: skip
        _, decode = self.kernels()
        return decode(
            q, k, v, slot_ids=self.slot_ids(meta), block_table=self.block_table(meta),
            seq_lens=meta.seq_lens, max_seq_len=meta.max_seq_len, scale=scale,
        )  # fmt: skip

    @abstractmethod
    def kernels(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        """(prefill, decode) functions taking the Triton kernels' keyword arguments."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'paged' if self.paged else 'virtual'})"


class TorchBackend(AttentionBackend):
    """The torch references: the CPU path and the tests' ground truth (host syncs)."""

    name = "torch"

    def kernels(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        return prefill_attention_torch, decode_attention_torch


class TritonBackend(AttentionBackend):
    """Our split-K decode and prefix-prefill kernels (the same kernels for both layouts). In a
    prefill step, the one-token rows (decodes mixed in with prompt chunks) run through the
    decode kernel, which reads each KV head once for its whole query group; the prefill kernel
    gets only the prompt chunks."""

    name = "triton"
    static_shapes = True

    def kernels(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        from vtensor.ops.triton_decode import decode_triton
        from vtensor.ops.triton_prefill import prefill_triton

        return prefill_triton, decode_triton

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float
                ) -> Tensor:  # fmt: skip
        prefill, decode = self.kernels()
        d, b = meta.num_decodes, meta.kv_index.shape[0]
        slots, table = self.slot_ids(meta), self.block_table(meta)
        o = torch.empty_like(q)
        if d:
            decode(
                q[:d], k, v, slot_ids=None if slots is None else slots[:d],
                block_table=None if table is None else table[:d], seq_lens=meta.seq_lens,
                max_seq_len=meta.max_seq_len, scale=scale, out=o[:d],
            )  # fmt: skip
        if d < b:
            prefill(
                q, k, v, slot_ids=None if slots is None else slots[d:],
                block_table=None if table is None else table[d:],
                prefix_lens=meta.prefix_lens[d:], cu_seqlens_q=meta.cu_seqlens_q[d:],
                max_seqlen_q=meta.max_seqlen_q, scale=scale, out=o, cache=meta.derived,
            )  # fmt: skip
        return o


class FlashBackend(AttentionBackend):
    """aten FlashAttention-2 varlen over the virtual layout's token rows (CUDA fp16/bf16)."""

    name = "flash"

    def __init__(self, paged: bool) -> None:
        if paged:
            raise AttentionBackendError("the paged layout has no FA2 path (aten needs 256-blocks)")
        super().__init__(paged)

    def kernels(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        raise NotImplementedError("FA2 takes its own arguments: see prefill / decode")

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float
                ) -> Tensor:  # fmt: skip
        from vtensor.ops.flash import flash_prefill

        return flash_prefill(
            q, k, v, slot_ids=meta.kv_index[:, 0], prefix_lens=meta.prefix_lens,
            cu_seqlens_q=meta.cu_seqlens_q, max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_seqlen_k, scale=scale,
        )  # fmt: skip

    def decode(self, q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float
               ) -> Tensor:  # fmt: skip
        from vtensor.ops.flash import flash_decode

        return flash_decode(
            q, k, v, slot_ids=meta.kv_index[:, 0], seq_lens=meta.seq_lens,
            max_seq_len=meta.max_seq_len, scale=scale,
        )  # fmt: skip


_CLASSES: dict[str, type[AttentionBackend]] = {
    "torch": TorchBackend, "triton": TritonBackend, "flash": FlashBackend,
}  # fmt: skip


def select_backend(
    name: str, *, paged: bool, device: torch.device, dtype: torch.dtype, head_dim: int
) -> AttentionBackend:
    """The backend for `name` ("auto": torch on CPU; on CUDA our Triton kernels, which beat
    FA2 at every measured H200 point (bench/results/kernels_h200.json), or FA2 for head dims
    the kernels lack (not a power of two)). Raises AttentionBackendError when it cannot run."""
    if name not in BACKENDS:
        raise AttentionBackendError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        else:
            name = "triton" if head_dim & (head_dim - 1) == 0 and head_dim >= 16 else "flash"
    if name == "flash":
        from vtensor.ops.flash import flash_unsupported_reason

        why = flash_unsupported_reason(device, dtype, head_dim)
        if why is not None:
            raise AttentionBackendError(f"backend 'flash' cannot run (head_dim {head_dim}): {why}")
    return _CLASSES[name](paged)


def attend(
    backend: str,
    *,
    paged: bool,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_index: Tensor,
    scale: float,
    **fields: int | Tensor,
) -> Tensor:
    """One call through a backend picked by name, outside the engine (tests, benchmarks).
    fields: the prefill (prefix_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k) or decode
    (seq_lens, max_seq_len) fields of AttentionMetadata."""
    be = select_backend(backend, paged=paged, device=q.device, dtype=q.dtype, head_dim=q.shape[-1])
    none = kv_index[:0]  # store_a / store_b: nothing is stored here
    meta = AttentionMetadata("prefix_lens" in fields, [(k_cache, v_cache)], none, none, kv_index)
    for key, value in fields.items():
        setattr(meta, key, value)
    return be.forward(0, q, meta, scale)
