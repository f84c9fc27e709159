"""GPU (bf16) model checks: top-1 agreement with HF transformers on the embedded SmolLM2 GGUF,
and a dummy Llama-3-8B that loads without a second copy of its weights."""

from __future__ import annotations

import os

import pytest
import torch
from model_utils import Chunk, chunked_logits, make_kv, run_step

from vtensor.model import load_model, load_tokenizer

pytestmark = pytest.mark.gpu

PROMPTS = [
    "The history of the Roman Empire begins",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "In mathematics, a prime number is",
    "The quick brown fox",
    "Water boils at 100 degrees Celsius because",
    "My favorite book is",
    "The main causes of the First World War were",
    "import numpy as np\nx = np.",
    "A haiku about autumn:\n",
    "The difference between weather and climate is",
    "Dear hiring manager,\nI am writing to",
    "The largest planet in the solar system",
]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def setup(default_gguf_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_gguf_path)
    kwargs = {}
    try:  # transformers 5.x may keep GGUF weights packed (fp32 kernels); we want plain bf16
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
    except ImportError:
        pass
    hf = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, **kwargs
    )
    hf = hf.cuda().eval()
    q_proj = hf.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.bfloat16
    model, config = load_model(None, dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer(None)
    # 64-token sequences: prompt + HF's greedy continuation, then teacher-forced everywhere.
    seqs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok.encode(p)], device="cuda")
            out = hf.generate(
                ids, max_new_tokens=SEQ_LEN - ids.shape[1], min_new_tokens=SEQ_LEN - ids.shape[1],
                do_sample=False,
            )  # fmt: skip
            seqs.append(out[0, :SEQ_LEN].tolist())
    with torch.no_grad():
        ref = hf(torch.tensor(seqs, device="cuda")).logits.float()  # [16, 64, vocab]
        # Context for the threshold: how far HF's own bf16 is from HF fp32 (printed only).
        hf32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        ref32 = hf32.cuda().eval()(torch.tensor(seqs, device="cuda")).logits.argmax(-1)
        base = (ref32 == ref.argmax(-1)).float().mean().item()
        print(f"\nHF bf16 vs HF fp32 top-1 agreement: {base:.4f}")
        del hf32
    return model, config, seqs, ref


def _agreement(logits: list[torch.Tensor], ref: torch.Tensor) -> float:
    ours = torch.stack([lg.argmax(-1) for lg in logits])
    same = ours == ref.argmax(-1)
    # Disagreements between two bf16 implementations should sit at near-ties of HF's top two.
    top2 = ref.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1])[~same]
    print(f"mismatches: {int((~same).sum())}, HF top-2 margins there: {margins.tolist()}")
    return same.float().mean().item()


def test_top1_agreement_prefill_bf16(setup):
    model, config, seqs, ref = setup
    slots = list(range(len(seqs)))[::-1]
    logits = chunked_logits(model, config, seqs, slots, [[SEQ_LEN]] * len(seqs), SEQ_LEN + 8,
                            dtype=torch.bfloat16, device="cuda", backend="auto")  # fmt: skip
    agree = _agreement(logits, ref)
    print(f"top-1 agreement (whole-sequence prefill, bf16): {agree:.4f}")
    assert agree >= 0.99


@pytest.mark.parametrize("paged", [False, True], ids=["virtual", "paged"])
def test_top1_agreement_chunked_decode_bf16(setup, paged):
    model, config, seqs, ref = setup
    slots = list(range(len(seqs)))[::-1]
    splits = [[20, 12]] * len(seqs)  # two prefill chunks, then 32 decode steps
    logits = chunked_logits(model, config, seqs, slots, splits, SEQ_LEN + 8,
                            dtype=torch.bfloat16, device="cuda", backend="auto",
                            paged=paged)  # fmt: skip
    agree = _agreement(logits, ref)
    print(f"top-1 agreement (chunked prefill + decode, {'paged' if paged else 'virtual'}): "
          f"{agree:.4f}")  # fmt: skip
    assert agree >= 0.99


def test_dummy_llama3_8b_loads_once():
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, config = load_model("llama-3-8b", load_format="dummy", dtype="auto", device="cuda")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - base
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert 7.5e9 < nbytes / 2 < 8.5e9  # ~8.0B parameters
    # weights plus the rope cache, never a second (fp32 or staging) copy
    assert peak < nbytes * 1.05, (peak, nbytes)

    _, views = make_kv(config, 2, 32, torch.bfloat16, "cuda")
    logits = run_step(model, views, [Chunk(1, 0, list(range(16))), Chunk(0, 0, [5] * 7)],
                      is_prefill=True, max_tokens=32, backend="auto", device="cuda")  # fmt: skip
    assert logits.shape == (23, config.vocab_size) and torch.isfinite(logits).all()
    del model
    torch.cuda.empty_cache()
