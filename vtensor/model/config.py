"""ModelConfig: the one description of a Llama-family model that the rest of vtensor reads.

Built from a Hugging Face `config.json` dict (`from_hf`), from GGUF metadata (`from_gguf`), or
from a named preset (`from_preset`, shapes only: for `--load-format dummy` benchmarks).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ModelError(Exception):
    """Base class of model loading errors."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model path does not exist or holds no loadable weights/config."""


class UnsupportedModelError(ModelError, ValueError):
    """The checkpoint is not a Llama-family model that vtensor implements."""


# HF model_type / GGUF general.architecture values that share the Llama block structure.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style rope parameters without rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0,
    # ...}; None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama attention_bias=True also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # dtype the checkpoint was saved in ("bfloat16", ...), used by dtype="auto"
    torch_dtype: str | None = None
    sliding_window: int | None = None  # not implemented: attention is always full
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **overrides: Any) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields in overrides: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> ModelConfig:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
            )
        return self

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json dict (transformers 4.x or 5.x rope conventions)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({archs}) is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg['hidden_act']!r} is not supported")
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        # transformers 5 folds rope_theta into rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always biases q/k/v (not o); Llama/Qwen3's attention_bias covers q/k/v/o.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            sliding_window=sliding,
            name=cfg.get("_name_or_path", ""),
        ).validate()

    @classmethod
    def from_folder(cls, path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelNotFoundError(f"no config.json in {path!r}")
        with open(cfg_path) as f:
            cfg = json.load(f)
        config = cls.from_hf(cfg)
        # generation_config.json often lists more stop ids (Llama 3 instruct: <|eot_id|>).
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                for e in [eos] if isinstance(eos, int) else eos:
                    if e not in config.eos_token_ids:
                        config.eos_token_ids.append(e)
        if not config.name:
            config.name = os.path.basename(os.path.normpath(path))
        return config

    @classmethod
    def from_gguf(cls, path: str) -> ModelConfig:
        from gguf import GGUFReader

        return cls.from_gguf_reader(GGUFReader(path), name=os.path.basename(path))

    @classmethod
    def from_gguf_reader(cls, reader: Any, name: str = "") -> ModelConfig:
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            f = fields.get(key)
            if f is None:
                return default
            if len(f.data) != 1:  # arrays: only their length is ever needed here
                return [f.parts[i] for i in f.data]
            v = f.parts[f.data[0]]
            if v.dtype.kind == "u" and v.dtype.itemsize == 1:  # strings are uint8 arrays
                return bytes(v).decode("utf-8")
            return v.item() if v.size == 1 else v.tolist()

        arch = get("general.architecture")
        gname = str(get("general.name", "") or "")
        if arch == "llama" and "mistral" in gname.lower():
            arch = "mistral"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        p = "llama" if arch == "mistral" else arch
        tensor_names = {t.name for t in reader.tensors}
        hidden = get(f"{p}.embedding_length")
        heads = get(f"{p}.attention.head_count")
        kv_heads = get(f"{p}.attention.head_count_kv", heads)
        vocab = get(f"{p}.vocab_size")
        if vocab is None:
            vocab = len(fields["tokenizer.ggml.tokens"].data)
        rope_scaling = None
        scaling_type = get(f"{p}.rope.scaling.type")
        if scaling_type in ("linear", "yarn"):
            rope_scaling = {"rope_type": scaling_type, "factor": get(f"{p}.rope.scaling.factor")}
            orig = get(f"{p}.rope.scaling.original_context_length")
            if orig is not None:
                rope_scaling["original_max_position_embeddings"] = orig
        eos_ids = [
            int(v)
            for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if (v := get(k)) is not None
        ]
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=get(f"{p}.feed_forward_length"),
            num_layers=get(f"{p}.block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=get(f"{p}.attention.key_length", hidden // heads),
            rms_norm_eps=float(get(f"{p}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get(f"{p}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=get(f"{p}.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=list(dict.fromkeys(eos_ids)),
            name=gname or name,
        ).validate()

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ModelNotFoundError(
                f"unknown model preset {name!r} (presets: {', '.join(sorted(PRESETS))})"
            )
        return cls.from_hf({**PRESETS[key], "_name_or_path": key})


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Shapes of public checkpoints (from their config.json) for dummy-weight benchmarks.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_id=[128001, 128009], torch_dtype="bfloat16",
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
    ),
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16",
    ),
    "llama-2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, torch_dtype="float16",
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    "qwen3-8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
}
# fmt: on
