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
        hf16 = hf(torch.tensor(seqs, device="cuda")).logits.float().argmax(-1)  # [16, 64]
        hf32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        logits32 = hf32.cuda().eval()(torch.tensor(seqs, device="cuda")).logits.float()
        top2 = logits32.topk(2, dim=-1).values
        ref = Reference(logits32.argmax(-1), top2[..., 0] - top2[..., 1], hf16)
        del hf32, logits32
    print(f"\nHF bf16 vs HF fp32 top-1 agreement: {ref.hf16_all:.4f}")
    return model, config, seqs, ref


class Reference:
    """HF fp32's top-1 (the reference) with its top-2 margin, and HF bf16's top-1."""

    def __init__(self, want: torch.Tensor, margin: torch.Tensor, hf16: torch.Tensor) -> None:
        self.want, self.margin, self.hf16 = want, margin, hf16
        self.hf16_all = (hf16 == want).float().mean().item()


def _check_agreement(logits: list[torch.Tensor], ref: Reference, label: str) -> None:
    """As test_engine_gpu: >= 99% against fp32 where fp32's top two are >= 0.5 apart (a bf16
    model, HF's own included, flips near-ties: HF bf16 agrees with fp32 on ~97% overall), and
    overall no worse than HF bf16 minus one point."""
    got = torch.stack([lg.argmax(-1) for lg in logits])
    same = got == ref.want
    decidable = ref.margin >= 0.5
    ours_decidable = same[decidable].float().mean().item()
    ours_all = same.float().mean().item()
    vs_hf16 = (got == ref.hf16).float().mean().item()
    msg = (f"top-1 agreement ({label}): vs fp32 on {int(decidable.sum())} decidable positions "
           f"{ours_decidable:.4f}; vs fp32 overall: ours {ours_all:.4f}, HF bf16 "
           f"{ref.hf16_all:.4f}; ours vs HF bf16 {vs_hf16:.4f}; fp32 margins where ours "
           f"differs: {[round(m, 3) for m in ref.margin[~same].tolist()]}")  # fmt: skip
    print(msg)
    assert ours_decidable >= 0.99, msg
    assert ours_all >= ref.hf16_all - 0.01, msg


def test_top1_agreement_prefill_bf16(setup):
    model, config, seqs, ref = setup
    slots = list(range(len(seqs)))[::-1]
    logits = chunked_logits(model, config, seqs, slots, [[SEQ_LEN]] * len(seqs), SEQ_LEN + 8,
                            dtype=torch.bfloat16, device="cuda", backend="auto")  # fmt: skip
    _check_agreement(logits, ref, "whole-sequence prefill, bf16")


@pytest.mark.parametrize("paged", [False, True], ids=["virtual", "paged"])
def test_top1_agreement_chunked_decode_bf16(setup, paged):
    model, config, seqs, ref = setup
    slots = list(range(len(seqs)))[::-1]
    splits = [[20, 12]] * len(seqs)  # two prefill chunks, then 32 decode steps
    logits = chunked_logits(model, config, seqs, slots, splits, SEQ_LEN + 8,
                            dtype=torch.bfloat16, device="cuda", backend="auto",
                            paged=paged)  # fmt: skip
    _check_agreement(logits, ref, f"chunked prefill + decode, {'paged' if paged else 'virtual'}")


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
