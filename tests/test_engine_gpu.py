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
    """16 prompts x 64 positions under teacher forcing (the forced tokens: HF fp32 greedy), on
    the same dequantized weights. The engine (bf16) must pick HF fp32's top-1 token at >= 99%
    of the positions that bf16 can decide (fp32 top-2 margin >= 0.5 logit), and be at least as
    close to fp32 overall as HF's own bf16 forward.

    Why not ">= 99% equal to HF bf16" alone: two bf16 runs flip near-ties. On this model (CPU
    study, 1024 positions) HF bf16 with its KV cache agreed with HF bf16's one-shot forward at
    only 97.75%; every engine/HF disagreement had an fp32 margin < 0.24, and 152 of the 1024
    positions have margins < 0.25. The strict bf16-vs-bf16 rate is still measured and printed
    (H200, 2026-11-29: 0.9883). All 1024 requests run as one batch, so this also exercises
    heavy prefix sharing (each request extends another's prompt)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from vtensor.engine import LLM, SamplingParams

    folder, name = os.path.split(default_gguf_path)
    hf32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf32 = hf32.to("cuda").eval()
    llm = LLM(dtype="bfloat16", device="cuda", max_model_len=512, kv_memory=0.3)
    tok = llm.tokenizer
    topics = ["the ocean", "a robot", "Paris", "mathematics", "a cat", "winter", "music",
              "the moon", "coffee", "a library", "trains", "volcanoes", "chess", "rain",
              "bees", "a lighthouse"]  # fmt: skip
    prompts = [tok.encode(f"Write a short story about {t}.") for t in topics]
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    refs = [hf_greedy(hf32, p, 64) for p in prompts]

    def teacher_forced_logits(model) -> torch.Tensor:  # [16 * 64, vocab], fp32
        rows = []
        with torch.no_grad():
            for p, r in zip(prompts, refs, strict=True):
                ids = torch.tensor([p + r[:-1]], device="cuda")
                rows.append(model(ids).logits[0, len(p) - 1 :].float())
        return torch.cat(rows)

    l32 = teacher_forced_logits(hf32)
    top2 = l32.topk(2, dim=-1)
    want, margin = top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]
    hf16 = hf32.to(torch.bfloat16)
    got_hf16 = teacher_forced_logits(hf16).argmax(-1)
    forced = [p + r[:j] for p, r in zip(prompts, refs, strict=True) for j in range(64)]
    outs = llm.generate(forced, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    got = torch.tensor([o.outputs[0].token_ids[0] for o in outs], device="cuda")
    decidable = margin >= 0.5
    ours_decidable = (got == want)[decidable].float().mean().item()
    ours_all = (got == want).float().mean().item()
    hf16_all = (got_hf16 == want).float().mean().item()
    vs_hf16 = (got == got_hf16).float().mean().item()
    msg = (f"vs fp32 on {int(decidable.sum())} decidable positions {ours_decidable:.4f}; "
           f"vs fp32 overall: ours {ours_all:.4f}, HF bf16 {hf16_all:.4f}; "
           f"ours vs HF bf16 {vs_hf16:.4f}")  # fmt: skip
    print(msg)
    assert ours_decidable >= 0.99, msg
    assert ours_all >= hf16_all - 0.01, msg
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
