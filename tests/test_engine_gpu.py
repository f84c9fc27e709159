"""The engine on CUDA (bf16): agreement with HF on the embedded model under teacher forcing, a
dummy Llama-3-8B serving 256 requests with CUDA graphs, and the throughput benchmark."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from engine_utils import hf_greedy

pytestmark = pytest.mark.gpu


def test_bf16_embedded_agrees_with_hf_teacher_forced(default_gguf_path):
    """16 prompts x 64 positions: the engine's greedy token for prompt + HF's first j tokens
    equals HF's token j at >= 99% of positions. All 1024 requests run as one batch, so this
    also exercises heavy prefix sharing (each request extends another's prompt)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from vtensor.engine import LLM, SamplingParams

    folder, name = os.path.split(default_gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    hf = hf.to("cuda").eval()
    llm = LLM(dtype="bfloat16", device="cuda", max_model_len=512, kv_memory=0.3)
    tok = llm.tokenizer
    topics = ["the ocean", "a robot", "Paris", "mathematics", "a cat", "winter", "music",
              "the moon", "coffee", "a library", "trains", "volcanoes", "chess", "rain",
              "bees", "a lighthouse"]  # fmt: skip
    prompts = [tok.encode(f"Write a short story about {t}.") for t in topics]
    refs = [hf_greedy(hf, p, 64) for p in prompts]  # HF's argmax at each position
    forced = [p + r[:j] for p, r in zip(prompts, refs, strict=True) for j in range(64)]
    want = [r[j] for r in refs for j in range(64)]
    outs = llm.generate(forced, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    got = [o.outputs[0].token_ids[0] for o in outs]
    agree = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
    assert agree >= 0.99, f"top-1 agreement {agree:.4f}"
    assert sum(o.num_cached_tokens for o in outs) > 0
    llm.llm_engine.kv_cache.check_integrity()
    llm.close()


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_dummy_llama3_8b_serves_256_requests_with_cuda_graphs(kv):
    from vtensor.engine import LLM, SamplingParams

    llm = LLM("llama-3-8b", load_format="dummy", dtype="bfloat16", device="cuda", kv=kv,
              max_model_len=2048, kv_memory=0.5)  # fmt: skip
    eng = llm.llm_engine
    assert eng.runner.graphs, "CUDA graph capture failed (see the log)"
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randint(8, 1024))]
               for _ in range(256)]  # fmt: skip
    lens = [rng.randint(8, 256) for _ in range(256)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == lens
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert eng.counters["decode_steps"] > 0
    eng.kv_cache.check_integrity()
    llm.close()


def test_bench_throughput_runs_on_cuda(tmp_path):
    from vtensor.bench.throughput import main

    out = tmp_path / "t.json"
    rc = main(["--model", "llama-3.2-1b", "-n", "32", "--max-output", "32", "--max-input",
               "256", "--hf-requests", "8", "--out", str(out)])  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    for name in ("virtual", "paged", "hf"):
        s = rep["systems"][name]
        assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0
        assert s["peak_device_used_bytes"] > 0
    assert rep["systems"]["virtual"]["cuda_graphs"] > 0
