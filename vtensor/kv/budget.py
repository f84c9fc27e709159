"""The KV memory budget: bytes, or a fraction of free device memory, decided in one place."""

from __future__ import annotations

import os

import torch

from vtensor.kv.layout import KVConfigError

# Fraction of free GPU memory the KV cache may take when none is given (both layouts): the
# rest is for activations, CUDA graphs and the allocator's slack.
KV_MEMORY_FRACTION = 0.85


def resolve_budget(
    budget: int | float | None, device: torch.device, host_bytes: int | None = None
) -> int | None:
    """Bytes from a budget given in bytes (int) or as a fraction in (0, 1] (float) of free GPU
    memory (CUDA, torch.cuda.mem_get_info) or of `host_bytes` (host; default physical RAM).
    None: no cap on host, KV_MEMORY_FRACTION of free memory on CUDA."""
    if budget is not None and not isinstance(budget, float):
        if int(budget) < 0:
            raise KVConfigError(f"budget={budget} must be >= 0")
        return int(budget)
    if budget is not None and not 0.0 < budget <= 1.0:
        raise KVConfigError(f"budget fraction {budget} must be in (0, 1]")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (KV_MEMORY_FRACTION if budget is None else budget))
    if budget is None:
        return None
    if host_bytes is None:
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(host_bytes * budget)
