"""The model's Linear layers: cuBLAS (F.linear), or our skinny GEMM where it measured faster.

`skinny_configs.json` holds, per GPU name and weight shape "NxK", the batch ranges where
`vtensor.bench.skinny_tune` timed the skinny kernel (`triton_skinny.py`) ahead of cuBLAS on
that GPU, with the winning launch config: [{"max_m": 8, "block_m": 16, ...}, ...], ascending
({"max_m": 1, "cublas": true}: cuBLAS up to there).
A shape, GPU or batch the table does not list runs F.linear, so an untuned GPU behaves exactly
as before. VTENSOR_SKINNY_GEMM=0 turns the table off (A/B runs).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_TABLE_PATH = Path(__file__).with_name("skinny_configs.json")


@functools.cache
def _table(device_name: str) -> dict[str, list[dict]]:
    if os.environ.get("VTENSOR_SKINNY_GEMM", "1") == "0" or not _TABLE_PATH.exists():
        return {}
    return json.loads(_TABLE_PATH.read_text()).get(device_name, {})


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.lru_cache(maxsize=4096)  # per layer call: keep the lookup off the host's path
def skinny_config(device_name: str, n: int, k: int, m: int):
    """The tuned config for an [m, k] x [n, k]^T product on this GPU, or None (cuBLAS)."""
    from vtensor.ops.triton_skinny import SkinnyConfig

    for row in _table(device_name).get(f"{n}x{k}", []):
        if m <= row["max_m"]:
            if row.get("cublas"):
                return None
            return SkinnyConfig(**{f: v for f, v in row.items() if f != "max_m"})
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda and x.dim() == 2 and x.dtype == weight.dtype and x.stride(1) == 1:
        n, k = weight.shape
        cfg = skinny_config(_device_name(x.device), n, k, x.shape[0])
        if cfg is not None and weight.stride(1) == 1:
            from vtensor.ops.triton_skinny import skinny_linear

            out = skinny_linear(x, weight, bias, cfg)
            if out is not None:
                return out
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names, so checkpoints load unchanged) whose forward
    takes the skinny GEMM for the shapes and batch sizes where it is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
