"""EngineArgs: what a user may set (CLI flags, `LLM(...)` keywords); EngineConfig resolves the
defaults against the model and the device."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip


def parse_memory(value: int | float | str | None) -> int | float | None:
    """KV budget: bytes (int or "4GiB", "512MB"), or a fraction in (0, 1] (float, "0.8") of
    free device memory."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"kv_memory fraction must be in (0, 1], got {value}")
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"kv_memory must be > 0 bytes, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_memory {value!r}: use bytes, e.g. 4GiB / 512MB, or a fraction 0.8")
    num, unit = float(m.group(1)), m.group(2).lower()
    if not unit and "." in m.group(1):
        return parse_memory(num)
    return parse_memory(int(num * _UNITS[unit]))


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # HF folder, .gguf, dummy preset name, None: embedded SmolLM2
    dtype: str = "auto"  # auto: bf16 (or the checkpoint's half type) on CUDA, fp32 on CPU
    device: str = "auto"
    max_model_len: int | None = None  # default: min(model's context, 8192)
    kv: str = "virtual"  # "virtual" | "paged"
    kv_memory: int | float | str | None = None  # default: engine/config.py (GPU fraction)
    max_num_seqs: int | None = None  # default by device: see engine/config.py
    max_num_batched_tokens: int | None = None  # per-step token budget (chunked prefill)
    load_format: str = "auto"
    tokenizer: str | None = None
    enable_prefix_cache: bool = True
    preemption_mode: str = "recompute"  # or "swap"
    enforce_eager: bool = False  # no CUDA graphs
    # CUDA graphs for prefill steps (prompt chunks + decodes) of <= this many tokens, one per
    # padded size (engine/mixed_graphs.py); 0: eager. H200, Llama-3-8B: online multi-turn TTFT
    # p50 52.6 -> 23.1 ms, TPOT 7.6 -> 5.3 ms; a 1000-token step with 16 decodes 36.9 -> 28.3 ms
    # (host-bound up to ~1K tokens); 68 graphs in 6.9 s, +0.3 GiB (bench/results/2026-11-30g).
    mixed_graph_tokens: int = 2048
    page_size: int | None = None  # virtual KV page bytes (None: EngineConfig decides)
    block_size: int = 16  # paged KV
    attention_backend: str | None = None  # torch | triton | flash | auto (CPU: torch)
    async_map: bool = True
    kv_idle_trim_s: float | None = 30.0  # idle free KV pages go back to the driver after this
    seed: int = 0  # dummy weights
    config_overrides: dict | None = None
    debug: bool = False  # check KV integrity whenever the engine goes idle
    async_scheduling: bool = True  # schedule step N+1 while the GPU runs step N

    def __post_init__(self) -> None:
        if self.kv not in ("virtual", "paged"):
            raise ValueError(f"kv must be 'virtual' or 'paged', got {self.kv!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.mixed_graph_tokens, int) or self.mixed_graph_tokens < 0:
            raise ValueError(f"mixed_graph_tokens must be >= 0, got {self.mixed_graph_tokens!r}")
        self.kv_memory = parse_memory(self.kv_memory)


def is_path(model: str | None) -> bool:
    """None (the embedded model) or an existing file / folder (not a preset name)."""
    return model is None or os.path.exists(os.path.expanduser(model))
