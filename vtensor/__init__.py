"""vtensor: LLM inference whose KV cache lives in virtual tensors (CUDA VMM)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import vtensor.vmm` does not pull in the engine and transformers.
    if name == "LLM":
        from vtensor.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from vtensor.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
