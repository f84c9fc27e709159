"""Per-batch attention metadata, set by the runner around one model forward.

The model keeps the plain signature `forward(input_ids, positions)`; its attention layers read
the current `AttentionContext` (nano-vllm `utils/context.py`). `set_context` refuses nesting and
always clears in `finally`, so a failed step cannot leak metadata into the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionContext:
    is_prefill: bool
    # Per layer (k_cache, v_cache). virtual: [slots, max_tokens, kv_heads, head_dim] views of one
    # reservation; paged: [num_blocks, block_size, kv_heads, head_dim] block pools.
    kv_views: list[tuple[torch.Tensor, torch.Tensor]]
    # Where each new token's K/V goes, [n] int32. virtual: slot id per token + its position;
    # paged: flat index block * block_size + offset (store_positions unused).
    store_slots: torch.Tensor
    store_positions: torch.Tensor | None
    # Per sequence, [b] int32. virtual: slot ids; paged: block_table [b, max_blocks] instead.
    slot_ids: torch.Tensor | None
    block_table: torch.Tensor | None
    # prefill: tokens already in KV before this step, query offsets [b + 1], max lengths.
    prefix_lens: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # decode: total KV length including the new token; a static upper bound for split-K sizing
    # (static so that CUDA graphs captured once stay valid).
    seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    # Rows of the hidden states that need logits (last token of each sequence), [b] int64.
    logits_indices: torch.Tensor | None = None
    paged: bool = False
    backend: str = "auto"  # "torch" | "triton" | "flash" | "auto"


_CONTEXT: AttentionContext | None = None


@contextmanager
def set_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    global _CONTEXT
    if _CONTEXT is not None:
        raise RuntimeError("attention context is already set (nested forward?)")
    _CONTEXT = ctx
    try:
        yield ctx
    finally:
        _CONTEXT = None


def get_context() -> AttentionContext:
    if _CONTEXT is None:
        raise RuntimeError("no attention context: run the model inside set_context(...)")
    return _CONTEXT
