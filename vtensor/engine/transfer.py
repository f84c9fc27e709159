"""Host -> device without a sync: the one way the engine moves small host data to the GPU.

A pageable copy (`torch.tensor(values, device=cuda)`) waits for the GPU to drain its stream,
which would undo the overlapped loop (inflight.py); a pinned buffer and a non-blocking copy
queue behind the running step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`values` (a list or a host tensor) on `device`; unchanged host tensor on the CPU."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
