"""Llama-family models (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2), loaders, tokenizer."""

from __future__ import annotations

from vtensor.model.config import (
    PRESETS,
    ModelConfig,
    ModelError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from vtensor.model.context import AttentionContext, AttentionMetadata, get_context, set_context
from vtensor.model.llama import LlamaForCausalLM
from vtensor.model.loader import default_model_path, load_model, resolve_device, resolve_dtype
from vtensor.model.registry import MODEL_REGISTRY, CausalLM, model_class
from vtensor.model.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

__all__ = [
    "PRESETS",
    "MODEL_REGISTRY",
    "AttentionContext",
    "AttentionMetadata",
    "CausalLM",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "apply_chat_template",
    "default_model_path",
    "eos_token_ids",
    "get_context",
    "load_model",
    "load_tokenizer",
    "model_class",
    "resolve_device",
    "resolve_dtype",
    "set_context",
]
