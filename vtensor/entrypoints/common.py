"""Engine options shared by `vtensor generate` and `vtensor chat`."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf, or dummy preset (default: "
                   "the embedded SmolLM2-135M-Instruct)")  # fmt: skip
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv", choices=["virtual", "paged"], default="virtual")
    g.add_argument("--kv-memory", default=None, help="KV budget: bytes (4GiB) or fraction (0.8)")
    g.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | dummy")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")


def engine_args(args: argparse.Namespace) -> Any:
    from vtensor.engine import EngineArgs

    return EngineArgs(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        kv=args.kv, kv_memory=args.kv_memory, load_format=args.load_format,
        enforce_eager=args.enforce_eager,
    )  # fmt: skip


def sampling_params(args: argparse.Namespace) -> Any:
    from vtensor.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )  # fmt: skip
