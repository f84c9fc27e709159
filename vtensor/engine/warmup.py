"""Startup warm-up (CUDA): run once the step shapes serving will meet, before any request.

Without it the first requests pay for one-time work: Triton compiling the prefill kernel's
launch variants, cuBLAS's first call at each GEMM shape (which waits for the GPU to drain:
engine/shapes.py), the caching allocator growing its activation segments. On the H200 the
first 16K-token step of a ShareGPT run took 2.1 s without it and 0.67 s with it
(bench/results/2026-11-30c). vLLM does the same at startup (a profile run with the full token
budget, then its graph captures). The warm-up leaves no trace: the prefix cache is reset,
counters and timing are zeroed (the pool keeps its pages until the idle trim).
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from vtensor.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vtensor.engine.engine import LLMEngine

_ID = "__vtensor_warmup_"


def warm_up(engine: LLMEngine) -> None:
    """Every GEMM shape padded steps can meet, then a full-budget prefill (one long prompt),
    then short prompts whose decodes mix with 512-token prompt chunks: the three prefill
    launch variants and a mixed step."""
    engine.runner.warm_gemms()
    budget = min(engine.config.max_num_batched_tokens, engine.max_model_len - 2,
                 engine.kv_cache.token_capacity() // 2)  # fmt: skip
    if budget < 16:
        return
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    n_mid = max(1, min(8, engine.config.max_num_seqs - 4, budget // 512))

    def add(tag: str, lens: list[int]) -> None:
        for i, n in enumerate(lens):
            engine.add_request(f"{_ID}{tag}{i}", [(17 * i + j) % vocab for j in range(n)], params)

    add("full", [budget])
    _drain(engine)
    add("short", [16] * 4)
    engine.step(finished_only=True)  # they prefill; the next step decodes them with the chunks
    add("mid", [min(512, budget)] * n_mid)
    _drain(engine)
    engine.reset_prefix_cache()
    engine.counters.update(dict.fromkeys(engine.counters, 0))
    engine.timing.update(dict.fromkeys(engine.timing, 0.0))
    # Everything built so far (torch, Triton, the model, the caches) lives as long as the
    # engine: out of the cyclic GC's sight, a full collection no longer walks it mid-serving
    # (as vLLM does after its startup). LLMEngine.close() unfreezes.
    gc.collect()
    gc.freeze()


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step(finished_only=True)
