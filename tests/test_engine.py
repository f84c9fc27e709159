"""The engine on the embedded default model (SmolLM2-135M GGUF, CPU, fp32) against HF
transformers' greedy generation on the same file: batched prompts of different lengths with
chunked prefill, prefix reuse, preemption (recompute and swap) under a tiny KV budget, the paged
KV mode, plus stop strings, abort, streaming, chat and AsyncLLM. One model load and one HF load
for the whole module; engines share the loaded model."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from engine_utils import engine_env, greedy, hf_greedy  # noqa: F401

from vtensor.engine import LLM, AsyncLLM, LLMEngine, RequestTooLargeError, SamplingParams

pytestmark = pytest.mark.usefixtures("engine_env")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and it was "
    "commanded by Neil Armstrong. The lunar module pilot was",
    "def fibonacci(n):\n    ",
]
NEW = 32


@pytest.fixture(scope="module")
def loaded(default_gguf_path):
    from vtensor.model import load_model, load_tokenizer

    model, config = load_model(None, dtype=torch.float32, device="cpu")
    return model, config, load_tokenizer(None)


@pytest.fixture(scope="module")
def hf(default_gguf_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(default_gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(loaded):
    tok = loaded[2]
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(hf, prompt_ids):
    return [hf_greedy(hf, p, NEW) for p in prompt_ids]


def make_llm(loaded, **kw) -> LLM:
    kw.setdefault("max_model_len", 512)
    return LLM(device="cpu", dtype="float32", preloaded=loaded, debug=True, **kw)


@pytest.fixture(scope="module")
def llm(loaded):
    # a small step budget: prompts are prefilled in chunks mixed with other requests' decodes
    llm = make_llm(loaded, max_num_batched_tokens=24)
    yield llm
    llm.close()


def check_kv(llm: LLM) -> None:
    kv = llm.llm_engine.kv_cache
    kv.check_integrity()
    assert kv.snapshot()["slots_active"] == 0


def test_greedy_batch_matches_hf(llm, prompt_ids, reference):
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids) and max(map(len, prompt_ids)) > 24
    outs = llm.generate(prompt_ids, greedy(NEW))
    for o, ref in zip(outs, reference, strict=True):
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length" and o.finished
    # the same through string prompts, and text decodes the tokens
    outs2 = llm.generate(PROMPTS, greedy(8))
    tok = llm.tokenizer
    for o, ref in zip(outs2, reference, strict=True):
        assert o.outputs[0].token_ids == ref[:8]
        assert o.outputs[0].text == tok.decode(ref[:8], skip_special_tokens=True)
    assert llm.llm_engine.counters["prefill_steps"] > 2  # chunked prefill really happened
    check_kv(llm)


def test_prefix_reuse_matches_hf(loaded, hf):
    tok = loaded[2]
    llm = make_llm(loaded)
    prefix = tok.encode(
        " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(12))
    )
    a = prefix + tok.encode(" What is 5 squared?")
    b = prefix + tok.encode(" Which number squared gives 49?")
    assert len(prefix) > 100  # > 2 pages of 45 tokens (2 MiB host pages, 46 KB per token)
    out_a = llm.generate([a], greedy(8))[0]
    out_b = llm.generate([b], greedy(16))[0]
    assert out_a.num_cached_tokens == 0
    assert out_b.num_cached_tokens >= 90
    assert out_b.outputs[0].token_ids == hf_greedy(hf, b, 16)
    # a follow-up turn on a's conversation reuses its parked slot (affinity): output included
    c = a + out_a.outputs[0].token_ids + tok.encode(" And 6 squared?")
    out_c = llm.generate([c], greedy(8))[0]
    assert out_c.num_cached_tokens >= len(a)
    assert out_c.outputs[0].token_ids == hf_greedy(hf, c, 8)
    check_kv(llm)
    llm.close()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_tiny_budget_matches_hf(loaded, prompt_ids, reference, mode):
    # 20 pages of 256 KiB (5.7 tokens each) = 113 tokens of KV for 4 requests that need
    # 37 + 42 + 68 + 39 tokens (+ a page of lookahead each): all start, then some must yield
    llm = make_llm(loaded, kv_memory=20 * 2**18, page_size=2**18, preemption_mode=mode,
                   enable_prefix_cache=False)  # fmt: skip
    outs = llm.generate(prompt_ids, greedy(NEW))
    for o, ref in zip(outs, reference, strict=True):
        assert o.outputs[0].token_ids == ref
    assert llm.llm_engine.scheduler.num_preemptions > 0
    check_kv(llm)
    llm.close()


def test_request_too_large_for_budget_errors(loaded, prompt_ids, reference):
    llm = make_llm(loaded, kv_memory=2**21)  # one page: 45 tokens
    with pytest.raises(RequestTooLargeError, match="KV"):
        llm.generate([prompt_ids[0]], greedy(100))
    # the engine is still usable, and a request that fits still matches
    out = llm.generate([prompt_ids[0]], greedy(8))[0]
    assert out.outputs[0].token_ids == reference[0][:8]
    check_kv(llm)
    llm.close()


def test_paged_kv_same_tokens(loaded, prompt_ids, reference):
    pytest.importorskip("vtensor.ops.paged")
    llm = make_llm(loaded, kv="paged", kv_memory=64 * 2**20, max_num_batched_tokens=24)
    outs = llm.generate(prompt_ids, greedy(NEW))
    for o, ref in zip(outs, reference, strict=True):
        assert o.outputs[0].token_ids == ref
    # prefix hit through the block hashes
    again = llm.generate([prompt_ids[2]], greedy(4))[0]
    assert again.num_cached_tokens >= 16
    assert again.outputs[0].token_ids == reference[2][:4]
    check_kv(llm)
    llm.close()


def test_max_model_len_and_bad_input(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(10, 522))], greedy(4))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(4))
    with pytest.raises(ValueError, match=r"\[0, 49152\)"):
        llm.generate([[5, 49152]], greedy(4))
    # output stops at max_model_len with "length"
    out = llm.generate([list(range(100, 605))], SamplingParams(temperature=0, max_tokens=None))
    assert len(out[0].outputs[0].token_ids) == 7 and out[0].outputs[0].finish_reason == "length"


def test_stop_strings_and_stop_ids(llm, reference):
    tok = llm.tokenizer
    text = tok.decode(reference[2], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert stop.strip()
    out = llm.generate([PROMPTS[2]], greedy(NEW, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    inc = llm.generate([PROMPTS[2]], greedy(NEW, stop=stop, include_stop_str_in_output=True))
    assert inc[0].outputs[0].text == text[: text.index(stop) + len(stop)]
    tid = reference[2][5]
    out = llm.generate([PROMPTS[2]], greedy(NEW, stop_token_ids=[tid]))[0].outputs[0]
    assert out.token_ids == reference[2][: reference[2].index(tid) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tid
    # EOS ends a chat answer unless ignore_eos
    chat = llm.chat(
        [{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64)
    )
    assert chat[0].outputs[0].finish_reason == "stop"
    assert chat[0].outputs[0].token_ids[-1] in llm.llm_engine.eos_token_ids
    assert "<|im_end|>" not in chat[0].outputs[0].text


def test_streaming_deltas(llm, reference):
    pieces, ids, last = [], [], None
    for out in llm.generate_stream([PROMPTS[1]], greedy(NEW)):
        pieces.append(out.outputs[0].new_text)
        ids += out.outputs[0].new_token_ids
        last = out
    assert last.finished and ids == reference[1] == last.outputs[0].token_ids
    assert "".join(pieces) == last.outputs[0].text
    # closing the iterator early aborts the request and frees its KV
    it = llm.generate_stream([PROMPTS[0]], greedy(NEW))
    next(it)
    it.close()
    assert not llm.llm_engine.has_unfinished_requests()
    check_kv(llm)


def test_abort_frees_kv(loaded, reference, prompt_ids):
    eng = LLMEngine(preloaded=loaded, device="cpu", dtype="float32", max_model_len=512)
    eng.add_request("a", prompt_ids[0], greedy(NEW))
    eng.add_request("b", prompt_ids[1], greedy(NEW))
    for _ in range(3):
        eng.step()
    assert eng.kv_cache.snapshot()["slots_active"] == 2
    eng.abort_request("a")
    eng.kv_cache.check_integrity()
    assert eng.kv_cache.snapshot()["slots_active"] == 1
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs["a"].outputs[0].finish_reason == "abort" and outs["a"].finished
    assert outs["b"].outputs[0].token_ids == reference[1]
    eng.kv_cache.check_integrity()
    eng.close()


def test_sampling_seeded_and_topk1(llm, prompt_ids, reference):
    p = dict(temperature=1.0, max_tokens=16, ignore_eos=True)
    a = llm.generate(prompt_ids[:2], [SamplingParams(seed=7, **p), SamplingParams(**p)])
    # other companions, other batch rows: the seeded request draws the same tokens
    s7 = SamplingParams(seed=7, **p)
    b = llm.generate([prompt_ids[2], prompt_ids[0], prompt_ids[0]], [SamplingParams(**p), s7, s7])
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids == b[2].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != a[1].outputs[0].token_ids
    c = llm.generate(prompt_ids[:1], SamplingParams(seed=8, **p))
    assert c[0].outputs[0].token_ids != a[0].outputs[0].token_ids
    k1 = llm.generate(prompt_ids, SamplingParams(top_k=1, temperature=0.8, max_tokens=16,
                                                 ignore_eos=True))  # fmt: skip
    assert [o.outputs[0].token_ids for o in k1] == [r[:16] for r in reference]
    # penalties through the engine: a strong frequency penalty breaks greedy's repetitions
    pen = llm.generate(prompt_ids, greedy(16, frequency_penalty=2.0, repetition_penalty=1.5))
    reps = [len(r[:16]) - len(set(r[:16])) for r in reference]
    pen_reps = [len(o.outputs[0].token_ids) - len(set(o.outputs[0].token_ids)) for o in pen]
    assert sum(pen_reps) < sum(reps)
    # logprobs: the greedy token is the top-1, its logprob the max, entries sorted and <= 0
    lp = llm.generate(prompt_ids[:1], greedy(8, logprobs=3))[0].outputs[0]
    assert len(lp.logprobs) == 8
    for tid, entry in zip(lp.token_ids, lp.logprobs, strict=True):
        assert len(entry) == 3 and max(entry, key=entry.get) == tid
        assert all(v <= 0 for v in entry.values())
    assert lp.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(lp.token_ids, lp.logprobs, strict=True))
    )


def test_async_llm_generate_abort_stats(loaded, reference, prompt_ids):
    eng = LLMEngine(preloaded=loaded, device="cpu", dtype="float32", max_model_len=512)
    allm = AsyncLLM(engine=eng)

    async def main():
        async def collect(rid, ids, n):
            outs = [o async for o in allm.generate(ids, greedy(n), rid)]
            return outs

        async def abort_early():
            gen = allm.generate(prompt_ids[0], greedy(200), "x")
            first = await gen.__anext__()
            await allm.abort("x")
            rest = [o async for o in gen]
            return first, rest

        r1, (first, rest) = await asyncio.gather(collect("r1", prompt_ids[3], NEW), abort_early())
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in allm.generate(list(range(10, 600)), greedy(2), "bad"):
                pass
        return r1, first, rest

    r1, first, rest = asyncio.run(main())
    assert r1[-1].finished and r1[-1].outputs[0].token_ids == reference[3]
    assert "".join(o.outputs[0].new_text for o in r1) == r1[-1].outputs[0].text
    assert rest and rest[-1].outputs[0].finish_reason == "abort"
    deadline = time.monotonic() + 10  # stats are refreshed by the engine thread: let it idle
    while allm.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = allm.stats()
    assert len(stats["ttft"]) >= 1 and all(t > 0 for t in stats["ttft"])
    assert stats["running"] == 0 and "kv" in stats
    eng.kv_cache.check_integrity()
    allm.shutdown()


def test_chat_session_prefills_only_the_new_turn(loaded):
    from vtensor.entrypoints.chat import ChatSession

    eng = LLMEngine(preloaded=loaded, device="cpu", dtype="float32", max_model_len=512)
    s = ChatSession(eng, SamplingParams(temperature=0, max_tokens=24))
    s.turn("Hi, my name is Bob.")
    first = s.last
    assert first.cached_tokens == 0 and first.output_tokens > 0
    s.turn("What is my name?")
    # the finished turn's slot is reused: all of it but its last token (never computed)
    assert s.last.cached_tokens >= first.prompt_tokens + first.output_tokens - 1
    assert s.last.prefilled_tokens < 20
    assert f"cached {s.last.cached_tokens}" in s.stats_line()
    eng.kv_cache.check_integrity()
    eng.close()


def test_chat_turn_stopped_between_steps_keeps_the_partial_reply(loaded):
    """Ctrl-C in `vtensor chat` ends the reply (abort) and the conversation goes on with it."""
    from vtensor.entrypoints.chat import ChatSession

    eng = LLMEngine(preloaded=loaded, device="cpu", dtype="float32", max_model_len=512)
    s = ChatSession(eng, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    calls = []

    def stop() -> bool:  # "Ctrl-C" once three steps have run
        calls.append(1)
        return len(calls) > 3

    s.turn("Tell me a long story.", stop=stop)
    assert 0 < s.last.output_tokens < 40
    assert s.messages[-1]["role"] == "assistant"
    assert not eng.has_unfinished_requests()
    s.turn("Go on.")
    assert s.last.output_tokens == 40
    eng.kv_cache.check_integrity()
    eng.close()
