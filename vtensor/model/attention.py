"""Attention layer: fused qkv projection -> (q/k norm) -> RoPE -> store K/V -> attention.

The K/V of the new tokens go into the cache first and attention then reads prefix and new
tokens from the cache alone (one code path for fresh prompts, chunked prefill and prefix hits).
Which kernel runs and where the cache lives come from the `AttentionContext` of this forward.
"""

from __future__ import annotations

import torch
from torch import nn

from vtensor import ops
from vtensor.model.config import ModelConfig
from vtensor.model.context import AttentionContext, get_context
from vtensor.model.layers import RMSNorm, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        # Shared by all layers (one cos/sin cache); kept out of this module's parameters.
        self._rotary = (rotary,)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rotary[0](positions, q, k)
        o = self._attend(get_context(), q, k, v)  # [n, heads, d]
        return self.o_proj(o.reshape(n, self.q_size))

    def _attend(
        self, ctx: AttentionContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = ctx.kv_views[self.layer_idx]
        if ctx.paged:
            from vtensor.ops import paged

            paged.paged_store_kv(k, v, k_cache, v_cache, ctx.store_slots)
            if ctx.is_prefill:
                return paged.paged_prefill_attention(
                    q, k_cache, v_cache,
                    block_table=ctx.block_table, prefix_lens=ctx.prefix_lens,
                    cu_seqlens_q=ctx.cu_seqlens_q, max_seqlen_q=ctx.max_seqlen_q,
                    max_seqlen_k=ctx.max_seqlen_k, scale=self.scale, backend=ctx.backend,
                )  # fmt: skip
            return paged.paged_decode_attention(
                q, k_cache, v_cache,
                block_table=ctx.block_table, seq_lens=ctx.seq_lens,
                max_seq_len=ctx.max_seq_len, scale=self.scale, backend=ctx.backend,
            )  # fmt: skip
        ops.store_kv(k, v, k_cache, v_cache, ctx.store_slots, ctx.store_positions)
        if ctx.is_prefill:
            return ops.prefill_attention(
                q, k_cache, v_cache,
                slot_ids=ctx.slot_ids, prefix_lens=ctx.prefix_lens,
                cu_seqlens_q=ctx.cu_seqlens_q, max_seqlen_q=ctx.max_seqlen_q,
                max_seqlen_k=ctx.max_seqlen_k, scale=self.scale, backend=ctx.backend,
            )  # fmt: skip
        return ops.decode_attention(
            q, k_cache, v_cache,
            slot_ids=ctx.slot_ids, seq_lens=ctx.seq_lens,
            max_seq_len=ctx.max_seq_len, scale=self.scale, backend=ctx.backend,
        )  # fmt: skip
