"""Model registry: architecture name (HF model_type / GGUF general.architecture) -> class.

Every class takes (config, freq_factors) and implements `CausalLM`: the loader builds it on
the meta device, materializes it and calls load_weights; the runner calls forward and
compute_logits. Llama, Mistral, Qwen2 and Qwen3 share one block structure today (Qwen3's q/k
norm and Qwen2's qkv bias are config flags), hence one class.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from vtensor.model.config import ModelConfig, UnsupportedModelError
from vtensor.model.llama import LlamaForCausalLM


class CausalLM(Protocol):
    config: ModelConfig

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [n] (the batch's tokens, flattened) -> hidden [n, h]."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [m, h] -> fp32 logits [m, vocab]."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def modules(self) -> Iterator[nn.Module]:
        """Every submodule (an nn.Module's): the startup warm-up runs each Linear shape."""
        ...


MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    cls = MODEL_REGISTRY.get(architecture)
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported "
            f"(supported: {', '.join(sorted(MODEL_REGISTRY))})"
        )
    return cls
