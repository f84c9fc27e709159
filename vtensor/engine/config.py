"""EngineConfig: every engine default decided once, from EngineArgs + the model + the device.

The engine logs `describe()` at startup (one INFO line), so a run's effective settings are on
record. Defaults (one place): max_num_seqs / max_num_batched_tokens by device (CUDA: 1024 /
16384 on GPUs with >= 80 GB, else 256 / 8192; CPU 32 / 2048), KV budget
`KV_MEMORY_FRACTION` of free GPU memory (1 GiB on CPU), max_model_len min(model, 8192),
virtual KV pages of >= KV_PAGE_TOKENS tokens on CUDA (the host backend's default on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from vtensor.kv import KV_MEMORY_FRACTION, KVCache, KVManager, KVSpec, PagedKVCache
from vtensor.model import ModelConfig
from vtensor.ops import AttentionBackend, select_backend
from vtensor.vmm import make_backend

if TYPE_CHECKING:
    from vtensor.engine.args import EngineArgs

BIG_GPU_BYTES = 80 * 10**9  # H100 / H200 / A100-80G class: room for large batches
CPU_KV_BYTES = 2**30
# Virtual KV pages on CUDA hold at least this many tokens (8 MiB for Llama-3-8B; models whose
# 2 MiB granularity page already holds more keep it). The driver's cuMemSetAccess costs
# ~30 us per mapping whatever its size (H200: 2 MiB and 32 MiB pages alike), and admitting
# prefix hits maps every shared page into each new request: 8 MiB pages took the shared-prefix
# trace from 9.69 to 8.68 s, ShareGPT unchanged (bench/results/2026-11-30e/page_size).
KV_PAGE_TOKENS = 64


def default_batch_limits(device: torch.device) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) for the device."""
    if device.type != "cuda":
        return 32, 2048
    if torch.cuda.get_device_properties(device).total_memory >= BIG_GPU_BYTES:
        return 1024, 16384
    return 256, 8192


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: torch.device
    kv: str  # "virtual" | "paged"
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_memory: int | float  # bytes, or a fraction of free GPU memory
    num_kv_slots: int  # max_num_seqs (+ 1 CUDA-graph pad slot)
    use_cuda_graphs: bool
    mixed_graph_tokens: int  # prefill steps of <= this many tokens replay graphs (0: none)
    attention_backend: str  # as asked ("auto" resolved by select_backend)
    enable_prefix_cache: bool
    preemption_mode: str
    page_size: int | None  # virtual KV page bytes (None: KV_PAGE_TOKENS' worth on CUDA)
    block_size: int  # paged KV
    async_map: bool
    kv_idle_trim_s: float | None

    @classmethod
    def resolve(cls, args: EngineArgs, model: ModelConfig, device: torch.device) -> EngineConfig:
        limit = model.max_position_embeddings
        max_model_len = args.max_model_len or min(limit, 8192)
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's {limit}")
        cuda = device.type == "cuda"
        seqs, tokens = default_batch_limits(device)
        max_num_seqs = args.max_num_seqs or seqs
        graphs = cuda and not args.enforce_eager
        step_tokens = args.max_num_batched_tokens or tokens
        kv_memory = args.kv_memory
        if kv_memory is None:
            kv_memory = KV_MEMORY_FRACTION if cuda else CPU_KV_BYTES
        return cls(
            device=device, kv=args.kv, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=step_tokens, kv_memory=kv_memory,
            num_kv_slots=max_num_seqs + (1 if graphs else 0), use_cuda_graphs=graphs,
            # no step is larger than the token budget: no graph for larger sizes
            mixed_graph_tokens=min(args.mixed_graph_tokens, step_tokens) if graphs else 0,
            attention_backend=args.attention_backend or "auto",
            enable_prefix_cache=args.enable_prefix_cache, preemption_mode=args.preemption_mode,
            page_size=args.page_size, block_size=args.block_size, async_map=args.async_map,
            kv_idle_trim_s=args.kv_idle_trim_s,
        )  # fmt: skip

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def attention(self, model: ModelConfig, dtype: torch.dtype) -> AttentionBackend:
        return select_backend(self.attention_backend, paged=self.kv == "paged",
                              device=self.device, dtype=dtype, head_dim=model.head_dim)  # fmt: skip

    def kv_manager(self, spec: KVSpec) -> KVManager:
        if self.kv == "paged":
            return PagedKVCache(
                spec, device=self.device, max_tokens=self.max_model_len,
                num_slots=self.num_kv_slots, budget_bytes=self.kv_memory,
                enable_prefix_cache=self.enable_prefix_cache, block_size=self.block_size,
            )  # fmt: skip
        cuda = self.device.type == "cuda"
        backend = make_backend(self.device if cuda else "cpu", page_size=self.page_size,
                               min_page_size=KV_PAGE_TOKENS * spec.bytes_per_token if cuda
                               else None)  # fmt: skip
        return KVCache(
            spec, backend=backend, max_tokens=self.max_model_len, num_slots=self.num_kv_slots,
            budget_bytes=self.kv_memory, enable_prefix_cache=self.enable_prefix_cache,
            async_map=self.async_map, idle_trim_seconds=self.kv_idle_trim_s,
        )  # fmt: skip
