"""Attention layer: fused qkv projection -> (q/k norm) -> RoPE + store K/V -> attention.

The K/V of the new tokens go into the cache first, at [store_a[i], store_b[i]] of this layer's
view (the same for every layout), and the engine's attention backend then reads prefix and new
tokens from the cache alone (one code path for fresh prompts, chunked prefill and prefix hits).
Nothing here knows the KV layout or the kernel: both come with the `AttentionContext`.
"""

from __future__ import annotations

import torch
from torch import nn

from vtensor.model.config import ModelConfig
from vtensor.model.context import get_context
from vtensor.model.layers import RMSNorm, RotaryEmbedding
from vtensor.ops.fused import rope_store_kv


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
        ctx = get_context()
        meta = ctx.meta
        k_cache, v_cache = meta.kv_views[self.layer_idx]
        rot = self._rotary[0]
        # one kernel on CUDA: RoPE on q and k, roped k and v into this layer's cache
        q = rope_store_kv(q, k, v, positions, rot.cos_cache, rot.sin_cache, k_cache, v_cache,
                          meta.store_a, meta.store_b)  # fmt: skip
        o = ctx.backend.forward(self.layer_idx, q, meta, self.scale)  # [n, heads, d]
        return self.o_proj(o.reshape(n, self.q_size))
