"""Building blocks of the Llama family: RMSNorm, rotary embedding (with rope scaling), SwiGLU.

Numerics follow HF transformers on purpose (RMSNorm in fp32 then cast back before the weight
multiply; cos/sin computed in fp32 then cast to the activation dtype) so that fp32 outputs match
HF to ~1e-5 and bf16 outputs round the same way. On CUDA the norm (with the residual add) and
SiLU * up run as fused Triton kernels (`vtensor.ops.fused`) that keep those roundings; on the
CPU they are the same torch math as always.
"""

from __future__ import annotations

import math
from typing import Any, overload

import torch
from torch import nn

from vtensor.ops.fused import fused_add_rms_norm, rms_norm, rotate_neox, silu_mul


class RMSNorm(nn.Module):
    """RMSNorm; with a residual it first adds x to it (vLLM's pre-norm residual stream)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x -> norm(x); (x, residual) -> (norm(residual + x), residual + x)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32) and the cos/sin scale (yarn's mscale)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # llama.cpp GGUFs store llama3 scaling as a rope_freqs tensor
        inv_freq = inv_freq / freq_factors.float().cpu()
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type in ("default", "dynamic"):
        # "dynamic" NTK only changes the frequencies past max_position_embeddings; positions are
        # never served beyond it (the cache is sized to it), so it equals default here.
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling, max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _yarn_inv_freq(
    inv_freq: torch.Tensor, dim: int, base: float, s: dict[str, Any], max_pos: int
) -> tuple[torch.Tensor, float]:
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    interp, extrap = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    return interp * (1 - extrapolation) + extrap * extrapolation, float(attn)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half) with a cos/sin cache for every position, indexed by the
    flattened positions of the batch: no per-step trig and no dependence on sequence layout."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.freq_factors = freq_factors
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)

    @torch.no_grad()
    def build_cache(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """(Re)compute the cache on `device`: called once after the weights are materialized."""
        inv_freq, scale = rope_inv_freq(
            self.head_dim, self.theta, self.scaling, self.max_positions, self.freq_factors
        )
        pos = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq.to(device)[None, :]  # [max_pos, d/2], fp32 like HF
        # cast after the fp32 trig, as HF does per forward
        self.cos_cache = (freqs.cos() * scale).to(dtype)
        self.sin_cache = (freqs.sin() * scale).to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [n, heads, d], k: [n, kv_heads, d]; positions: [n]
        cos = self.cos_cache[positions].unsqueeze(1)  # [n, 1, d/2]
        sin = self.sin_cache[positions].unsqueeze(1)
        return rotate_neox(q, cos, sin), rotate_neox(k, cos, sin)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))  # silu(gate) * up, one kernel
