"""Per-step attention context, set by the runner around one model forward.

The model keeps the plain signature `forward(input_ids, positions)`; its attention layers read
the current `AttentionContext` (nano-vllm `utils/context.py`): the engine's attention backend
(chosen once) and this step's `AttentionMetadata` (layout-agnostic: see vtensor/ops/backends.py).
`set_context` refuses nesting and always clears in `finally`, so a failed step cannot leak
metadata into the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vtensor.ops.backends import AttentionBackend, AttentionMetadata

__all__ = ["AttentionContext", "AttentionMetadata", "get_context", "set_context"]


@dataclass(slots=True, frozen=True)
class AttentionContext:
    backend: AttentionBackend  # the engine's, for every step
    meta: AttentionMetadata  # this step's


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
