"""`vtensor bench <name> [args...]`: runs `vtensor.bench.<module>.main(argv)`."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "vmm": ("vtensor.bench.vmm", "VMM operation latency, mapping throughput, GEMM interference"),
    "kv": ("vtensor.bench.kv", "KV cache alone on a synthetic multi-turn trace"),
    "kernels": ("vtensor.bench.kernels", "attention kernels: virtual vs paged vs FA2"),
    "throughput": ("vtensor.bench.throughput", "offline tokens/s: virtual vs paged vs HF"),
    "e2e": ("vtensor.bench.e2e", "end-to-end workloads (multi-turn, shared prefix, long ctx)"),
    "all": ("vtensor.bench.all", "every benchmark, JSON + plots + a Markdown summary"),
    "vs-vllm": ("vtensor.bench.vs_vllm", "vtensor vs vLLM 0.26 side by side, in parts"),
    "profile": ("vtensor.bench.profile", "per-step GPU vs wall time, launches, GPU-busy share"),
    "fused": ("vtensor.bench.fused", "fused layer kernels: GB/s and launches per layer"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for that benchmark")


def run(args: argparse.Namespace) -> int:
    module, _ = BENCHES[args.name]
    return int(importlib.import_module(module).main(args.rest) or 0)
