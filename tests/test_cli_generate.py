"""`vtensor generate` through a subprocess (embedded default model), `vtensor chat`'s session
logic, and `python -m vtensor.bench.throughput` on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def test_vtensor_generate_cli_smoke(default_gguf_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vtensor.cli", "generate", "What is the capital of France?",
           "--max-tokens", "6", "--device", "cpu", "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 <= len(out["token_ids"]) <= 6 and out["text"].strip()
    assert out["finish_reason"] in ("length", "stop")
    assert "tok/s" in r.stderr and "device=cpu" in r.stderr
    # bad input: a clear message and exit status 2, no traceback
    bad = subprocess.run([*cmd[:4], "hi", "--device", "cpu", "--max-tokens", "0"],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "max_tokens" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=2, bos_token_id=1)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny32k")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_bench_throughput_quick(tiny_folder, tmp_path):
    from vtensor.bench.throughput import main

    out = tmp_path / "t.json"
    rc = main(["--quick", "--device", "cpu", "--model", tiny_folder, "--out", str(out),
               "-n", "6", "--max-output", "6"])  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["systems"]) == {"virtual", "paged", "hf"}
    assert rep["same_tokens_virtual_paged"] is True
    for s in rep["systems"].values():
        assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0 and s["complete"]
    assert rep["systems"]["virtual"]["output_tokens"] == rep["workload"]["output_tokens"]
    assert rep["ratios"]["tokens_per_s_virtual_vs_paged"] > 0
