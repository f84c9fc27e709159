"""The engine on tiny random Llama and Qwen3 checkpoints (transformers configs, saved with
save_pretrained): batched greedy == HF greedy, with chunked prefill, prefix reuse and preemption
under a tiny KV budget (64 KiB host pages), for kv="virtual" and kv="paged"."""

from __future__ import annotations

import pytest
import torch
from engine_utils import engine_env, greedy, hf_greedy  # noqa: F401

from vtensor.engine import LLM

pytestmark = pytest.mark.usefixtures("engine_env")
VOCAB, NEW = 211, 24


def _hf_config(kind: str):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    return Qwen3Config(**{**common, "head_dim": 32}, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(request.param), dtype=torch.float32).eval()
    with torch.no_grad():  # HF init is nearly degenerate (norms 1, small weights): spread it
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 17, 40, 9)]
    refs = [hf_greedy(hf, p, NEW) for p in prompts]
    return str(path), hf, prompts, refs


def _llm(path: str, **kw) -> LLM:
    # 4 KiB host pages hold 8 (llama) or 4 (qwen3) tokens: prefixes share full pages
    return LLM(path, device="cpu", dtype="float32", max_model_len=128, page_size=4096,
               debug=True, **kw)  # fmt: skip


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_tiny_batched_greedy_prefix_preemption(checkpoint, kv):
    path, hf, prompts, refs = checkpoint
    llm = _llm(path, kv=kv, max_num_batched_tokens=16, kv_memory=2**20)  # chunked prefill
    outs = llm.generate(prompts, greedy(NEW))
    assert [o.outputs[0].token_ids for o in outs] == refs
    # prefix reuse: a new request sharing prompt 2's first 33 tokens
    shared = prompts[2][:33] + [5, 6, 7]
    out = llm.generate([shared], greedy(NEW))[0]
    assert out.num_cached_tokens >= 16
    assert out.outputs[0].token_ids == hf_greedy(hf, shared, NEW)
    llm.llm_engine.kv_cache.check_integrity()
    bpt = llm.llm_engine.kv_cache.spec.bytes_per_token
    llm.close()
    # preemption: KV for 96 tokens, requests that need 27 + 41 + 64 + 33 (the largest fits)
    llm = _llm(path, kv=kv, kv_memory=96 * bpt, enable_prefix_cache=False)
    outs = llm.generate(prompts, greedy(NEW))
    assert [o.outputs[0].token_ids for o in outs] == refs
    llm.llm_engine.kv_cache.check_integrity()
    assert llm.llm_engine.scheduler.num_preemptions > 0
    llm.close()


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_tiny_triton_backend_mixed_steps(checkpoint, kv):
    """Our Triton kernels (interpreter) in the engine: chunked prefill mixes decodes with
    prompt chunks, whose attention splits into the decode and prefill kernels."""
    path, _, prompts, refs = checkpoint
    llm = _llm(path, kv=kv, max_num_batched_tokens=16, attention_backend="triton")
    outs = llm.generate(prompts, greedy(NEW))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert llm.llm_engine.counters["prefill_steps"] > len(prompts)  # chunks and mixed steps
    llm.close()


@pytest.mark.parametrize("kw", [
    dict(max_num_batched_tokens=64),
    dict(max_num_seqs=1, kv_memory=2**16, preemption_mode="swap"),  # one seq, little KV
])  # fmt: skip
def test_warm_up_leaves_no_trace(checkpoint, kw):
    """The CUDA startup warm-up (run here on the CPU): afterwards the counters and timing are
    zero, no request or cached prefix is left, and generation is unchanged."""
    from vtensor.engine.warmup import warm_up

    path, _, prompts, refs = checkpoint
    llm = _llm(path, **kw)
    eng = llm.llm_engine
    warm_up(eng)
    assert not eng.has_unfinished_requests() and not eng.requests
    assert set(eng.counters.values()) == {0} and set(eng.timing.values()) == {0.0}
    assert eng.kv_cache.snapshot()["pages_cached"] == 0
    outs = llm.generate(prompts, greedy(NEW))
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert eng.counters["requests_finished"] == len(prompts)
    llm.close()


def test_warm_up_padded_shapes_and_frozen_heap(checkpoint):
    """The warm-up with CUDA's padded step shapes (every GEMM size run first), then greedy
    output unchanged; it freezes the GC heap and close() gives it back."""
    import gc

    from vtensor.engine.warmup import warm_up

    path, _, prompts, refs = checkpoint
    llm = _llm(path, max_num_batched_tokens=64)
    eng = llm.llm_engine
    eng.runner.pad_step_shapes(64)
    # qkv, o, gate_up, down at 8 token sizes; the head at the logits sizes
    assert eng.runner.warm_gemms() == 4 * 8 + len(eng.runner.logit_sizes)
    warm_up(eng)
    assert gc.get_freeze_count() > 0
    outs = llm.generate(prompts, greedy(NEW))
    assert [o.outputs[0].token_ids for o in outs] == refs
    llm.close()
    assert gc.get_freeze_count() == 0


def test_decode_graph_inputs_pad_to_the_bucket(checkpoint):
    """The CUDA-graph decode path (not runnable here) pads a batch to its bucket: real rows
    carry token, position, slot and length; pad rows aim at the private pad slot, length 1."""
    from vtensor.engine.runner import graph_buckets

    assert graph_buckets(256)[:6] == [1, 2, 4, 8, 16, 24] and graph_buckets(256)[-1] == 256
    assert graph_buckets(5) == [1, 2, 4, 5]
    big = graph_buckets(1024)
    assert len(big) == 83 and big[-3:] == [992, 1008, 1024] and 256 in big and 272 in big
    assert all(b - a <= (8 if b <= 256 else 16) for a, b in zip(big[2:], big[3:], strict=False))
    path, _, prompts, _ = checkpoint
    llm = _llm(path)
    eng, runner = llm.llm_engine, llm.llm_engine.runner
    pad = eng.kv_cache.acquire("__pad__", [0])
    assert eng.kv_cache.ensure(pad.slot, 1)
    runner._pad_head = torch.tensor([0, 0, pad.slot, 0, 1], dtype=torch.int32)
    runner._pad_index = torch.tensor([pad.slot], dtype=torch.int32)
    for i, p in enumerate(prompts[:3]):
        eng.add_request(str(i), p, greedy(4))
    eng.step()  # prefill all three
    batch = eng.scheduler.schedule()
    assert not batch.is_prefill and len(batch) == 3
    head, index = runner._split(runner._decode_inputs(batch, 4), 4)
    for row, seq in enumerate(batch.seqs):
        c = seq.num_computed
        assert head[:, row].tolist() == [seq.token_ids[c], c, seq.slot, c, c + 1]
        assert index[row].tolist() == [seq.slot]
    assert head[:, 3].tolist() == runner._pad_head.tolist() and index[3].tolist() == [pad.slot]
    eng.kv_cache.free(pad.slot)
    llm.close()


def test_idle_server_engine_gives_free_pages_back(checkpoint):
    """Elastic KV: after the work is done and nothing is allocated for kv_idle_trim_s, the idle
    AsyncLLM thread hands the pool's free pages back (physical bytes drop, pages trimmed)."""
    import asyncio
    import time

    from vtensor.engine import AsyncLLM, LLMEngine

    path, _, prompts, refs = checkpoint
    eng = LLMEngine(model=path, device="cpu", dtype="float32", max_model_len=128,
                    page_size=4096, kv_idle_trim_s=0.3, enable_prefix_cache=False)  # fmt: skip
    allm = AsyncLLM(engine=eng)
    allm.idle_poll_s = 0.05

    async def run(i):
        last = None
        async for out in allm.generate(prompts[i], greedy(NEW), request_id=str(i)):
            last = out
        return last.outputs[0].token_ids

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(4))), 60)

    try:
        got = asyncio.run(main())
        assert got == refs
        kv = eng.kv_cache
        deadline = time.monotonic() + 10
        while kv.stats["trimmed_pages"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        snap = kv.snapshot()
        assert kv.stats["trimmed_pages"] > 0, snap
        assert snap["pages_free"] == 0 and snap["bytes_physical"] < snap["pages_created"] * 4096
    finally:
        allm.shutdown()


@pytest.mark.parametrize("kv", ["virtual", "paged"])
def test_tiny_padded_step_shapes(checkpoint, kv):
    """Step shapes padded as on CUDA (engine/shapes.py): pad token rows go to the pad slot and
    attention ignores them, pad logits rows are dropped; greedy output is unchanged."""
    path, _, prompts, refs = checkpoint
    llm = _llm(path, kv=kv, max_num_batched_tokens=16, kv_memory=2**20)
    runner = llm.llm_engine.runner
    runner.pad_step_shapes(16)
    seen: list[int] = []
    hook = runner.model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    outs = llm.generate(prompts, greedy(NEW))
    hook.remove()
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert set(seen) <= set(runner.token_sizes) and 3 not in seen  # the 3-token prompt: padded
    llm.llm_engine.kv_cache.check_integrity()
    llm.close()
