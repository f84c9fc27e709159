"""EngineConfig's device-dependent defaults, checked without a GPU (the backend is recorded,
not created)."""

from __future__ import annotations

import pytest
import torch

from vtensor.engine import config as config_mod
from vtensor.engine.args import EngineArgs
from vtensor.engine.config import KV_PAGE_TOKENS, EngineConfig
from vtensor.kv import KVSpec
from vtensor.vmm.host import HostBackend

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)


def _config(device: str, **kw) -> EngineConfig:
    args = EngineArgs(model="x", kv_memory=2**24, max_model_len=256, max_num_seqs=4, **kw)
    return EngineConfig(
        device=torch.device(device), kv="virtual", max_model_len=256, max_num_seqs=4,
        max_num_batched_tokens=256, kv_memory=2**24, num_kv_slots=4, use_cuda_graphs=False,
        mixed_graph_tokens=0,
        attention_backend="torch", enable_prefix_cache=True, preemption_mode="recompute",
        page_size=args.page_size, block_size=16, async_map=False, kv_idle_trim_s=None,
    )  # fmt: skip


def _recorded(monkeypatch, cfg: EngineConfig) -> dict:
    seen = {}

    def fake(device, page_size=None, min_page_size=None):
        seen.update(device=device, page_size=page_size, min_page_size=min_page_size)
        return HostBackend(page_size=page_size)

    monkeypatch.setattr(config_mod, "make_backend", fake)
    cfg.kv_manager(SPEC).close()
    return seen


def test_cuda_pages_hold_kv_page_tokens(monkeypatch):
    seen = _recorded(monkeypatch, _config("cuda"))
    assert seen["page_size"] is None
    assert seen["min_page_size"] == KV_PAGE_TOKENS * SPEC.bytes_per_token


def test_cpu_and_explicit_page_sizes_are_left_alone(monkeypatch):
    assert _recorded(monkeypatch, _config("cpu"))["min_page_size"] is None
    seen = _recorded(monkeypatch, _config("cuda", page_size=2**16))
    assert seen["page_size"] == 2**16


def test_prefill_step_graphs_up_to_the_step_budget(monkeypatch):
    """On by default on CUDA (2048 tokens), never past the step token budget, off eager/CPU."""
    from types import SimpleNamespace

    monkeypatch.setattr(config_mod, "default_batch_limits", lambda device: (1024, 16384))
    model = SimpleNamespace(max_position_embeddings=4096)

    def graphs(device: str = "cuda", **kw) -> int:
        args = EngineArgs(model="x", **kw)
        return EngineConfig.resolve(args, model, torch.device(device)).mixed_graph_tokens

    assert graphs() == EngineArgs(model="x").mixed_graph_tokens == 2048
    assert graphs(max_num_batched_tokens=300) == 300
    assert graphs(mixed_graph_tokens=64) == 64
    assert graphs(enforce_eager=True) == 0
    assert graphs("cpu") == 0


def test_engine_cli_options_map_to_engine_args():
    """One definition of the engine's flags (serve / generate / chat): unset flags leave
    EngineArgs' defaults, set ones land on their fields."""
    import argparse

    from vtensor.engine.cli_args import add_cli_args, from_cli_args

    p = argparse.ArgumentParser()
    add_cli_args(p)
    p.add_argument("--model", default=None)
    assert from_cli_args(p.parse_args([])) == EngineArgs()
    a = p.parse_args(["--model", "m.gguf", "--max-num-batched-tokens", "4096", "--enforce-eager",
                      "--no-enable-prefix-caching", "--preemption-mode", "swap",
                      "--mixed-graph-tokens", "0", "--kv-memory", "2GiB", "--kv-idle-trim", "5",
                      "--attention-backend", "triton", "--max-num-seqs", "64"])  # fmt: skip
    ea = from_cli_args(a, seed=7)
    assert (ea.model, ea.max_num_batched_tokens, ea.enforce_eager, ea.enable_prefix_cache,
            ea.preemption_mode, ea.mixed_graph_tokens, ea.kv_memory, ea.kv_idle_trim_s,
            ea.attention_backend, ea.max_num_seqs, ea.seed) == (
        "m.gguf", 4096, True, False, "swap", 0, 2 * 2**30, 5.0, "triton", 64, 7)  # fmt: skip
    for bad in (["--preemption-mode", "later"], ["--max-num-batched-tokens", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
