"""The engine's command-line options, one definition for `vtensor serve`, `generate` and
`chat` (vLLM's EngineArgs.add_cli_args pattern). Every option defaults to None ("EngineArgs
decides"), so a default lives in one place: EngineArgs / EngineConfig."""

from __future__ import annotations

import argparse
from typing import Any

from vtensor.engine.args import EngineArgs

# option -> (EngineArgs field, argparse keywords)
_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "--dtype": ("dtype", {"help": "auto | float32 | bfloat16 | float16 (auto: float32 on CPU, "
                                  "the checkpoint's half type on GPU)"}),
    "--device": ("device", {"help": "auto | cpu | cuda[:i] (auto: cuda if any)"}),
    "--max-model-len": ("max_model_len", {
        "type": int, "help": "longest prompt + output in tokens (default: the model's, at most "
                             "8192)"}),
    "--kv": ("kv", {"choices": ["virtual", "paged"],
                    "help": "KV cache: virtual tensors (default) or a block-table pool"}),
    "--kv-memory": ("kv_memory", {"help": "KV budget: bytes (4GiB) or a fraction of free GPU "
                                          "memory (0.8; default 0.85, 1GiB on CPU)"}),
    "--max-num-seqs": ("max_num_seqs", {
        "type": int, "help": "most requests per step (default 1024 on GPUs of >= 80 GB, 256 on "
                             "smaller ones, 32 on CPU)"}),
    "--max-num-batched-tokens": ("max_num_batched_tokens", {
        "type": int, "help": "most tokens per step; longer prompts are prefilled in chunks "
                             "(default 16384 / 8192 / 2048, as --max-num-seqs)"}),
    "--load-format": ("load_format", {
        "help": "auto | safetensors | gguf | dummy (dummy: random weights)"}),
    "--enforce-eager": ("enforce_eager", {"action": "store_const", "const": True,
                                          "help": "no CUDA graphs"}),
    "--mixed-graph-tokens": ("mixed_graph_tokens", {
        "type": int, "help": "CUDA graphs for prefill steps of up to N tokens (default 2048; "
                             "0: eager)"}),
    "--enable-prefix-caching": ("enable_prefix_cache", {
        "action": argparse.BooleanOptionalAction,
        "help": "reuse the KV of prompt prefixes already computed (default on)"}),
    "--preemption-mode": ("preemption_mode", {
        "choices": ["recompute", "swap"],
        "help": "out of KV pages: drop a request's KV and recompute it later (default) or swap "
                "it to host memory"}),
    "--attention-backend": ("attention_backend", {
        "choices": ["auto", "torch", "triton", "flash"],
        "help": "attention kernels (auto: ours in Triton on CUDA, torch on CPU)"}),
    "--kv-idle-trim": ("kv_idle_trim_s", {
        "type": float, "help": "seconds idle before free KV pages go back to the driver "
                               "(default 30)"}),
}  # fmt: skip


def add_cli_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the engine options (group "engine", returned for the caller's own additions)."""
    g = p.add_argument_group("engine")
    for flag, (dest, kw) in _OPTIONS.items():
        g.add_argument(flag, dest=dest, default=None, **kw)
    return g


def from_cli_args(args: argparse.Namespace, **fixed: Any) -> EngineArgs:
    """EngineArgs from parsed options: those given, over EngineArgs' defaults; `model` from
    args.model; `fixed` (keyword arguments) over both."""
    kw: dict[str, Any] = {"model": getattr(args, "model", None)}
    for dest, _ in _OPTIONS.values():
        value = getattr(args, dest, None)
        if value is not None:
            kw[dest] = value
    return EngineArgs(**{**kw, **fixed})
