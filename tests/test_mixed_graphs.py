"""Prefill steps in static shapes (engine/mixed_graphs.py, what the prefill-step CUDA graphs
replay), run eagerly on the CPU through the Triton kernels (interpreter): the same tokens as
the dynamic path and as HF transformers, for steps that mix decodes, prompt chunks with a
prefix and whole prompts."""

from __future__ import annotations

import pytest
import torch

from vtensor.engine import LLMEngine, SamplingParams
from vtensor.engine.mixed_graphs import layout

VOCAB = 512
NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=2, bos_token_id=1)  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread HF's near-degenerate init so greedy ids are decidable
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_mixed")
    hf.save_pretrained(path, safe_serialization=True)
    return str(path), hf


@torch.no_grad()
def _greedy_hf(hf, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, past EOS too (the engine runs with ignore_eos; generate() stops)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def _run(path: str, static_tokens: int | None, prompts: list[list[int]], device: str = "cpu",
         kv: str = "virtual"):  # fmt: skip
    if device == "cuda":
        kw = {"mixed_graph_tokens": static_tokens or 0}
    else:
        kw = {"page_size": 4096} if kv == "virtual" else {"block_size": 4}
    eng = LLMEngine(model=path, device=device, dtype="float32", max_model_len=128, kv=kv,
                    attention_backend="triton", max_num_batched_tokens=24, max_num_seqs=8,
                    **kw)  # fmt: skip
    if device == "cuda":  # captured at start-up
        mixed = eng.runner.mixed
    else:
        mixed = eng.runner.static_prefill(static_tokens) if static_tokens else None
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got: dict[str, list[int]] = {}
    # two now, the rest while those decode: prefill steps then carry decode rows, and the
    # 24-token budget splits the longer prompts into chunks with a prefix
    for i in range(2):
        eng.add_request(str(i), prompts[i], params)
    steps = 0
    while eng.has_unfinished_requests() or len(got) < len(prompts):
        if steps == 2:
            for i in range(2, len(prompts)):
                eng.add_request(str(i), prompts[i], params)
        for out in eng.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        steps += 1
    eng.kv_cache.check_integrity()
    eng.close()
    return [got[str(i)] for i in range(len(prompts))], mixed


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_static_prefill_steps_match_dynamic_and_hf(tiny, kv):
    path, hf = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 11, 40, 3)]
    refs = [_greedy_hf(hf, p, NEW) for p in prompts]
    dynamic, _ = _run(path, None, prompts, kv=kv)
    static, mixed = _run(path, 64, prompts, kv=kv)
    assert dynamic == refs
    assert static == refs
    assert mixed.graphs == {}  # eager on the CPU: the static shapes alone are under test
    assert mixed.steps >= 4 and mixed.replays == 0  # every prefill step took the static path


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_prefill_step_graphs_on_cuda(tiny, kv):
    """Captured and replayed on the GPU: the same tokens as eager prefill steps and HF."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path, hf = tiny
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 33, 12, 41, 2)]
    refs = [_greedy_hf(hf, p, NEW) for p in prompts]
    dynamic, _ = _run(path, None, prompts, "cuda", kv)
    graphed, mixed = _run(path, 64, prompts, "cuda", kv)
    assert mixed is not None and mixed.graphs, "no prefill-step graph was captured"
    assert mixed.steps >= 4 and mixed.replays == mixed.steps  # all within the 24-token budget
    assert dynamic == refs and graphed == refs


def test_layout_is_aligned_and_disjoint():
    for t, rows, w in ((1, 1, 1), (176, 17, 1), (512, 256, 4)):
        segs, total = layout(t, rows, w)
        spans = sorted(segs.values())
        assert all(a % 4 == 0 for a, _ in spans)
        assert all(a + k <= b for (a, k), (b, _) in zip(spans, spans[1:], strict=False))
        assert spans[-1][0] + spans[-1][1] <= total
