"""The overlapped loop (sampled ids reach the host one step late) emits exactly what the plain
loop emits: token ids, text, finish and stop reasons, logprobs, with stop strings, EOS, stop
token ids, max_tokens, min_tokens, penalties, seeded sampling, preemption and aborts. Embedded
SmolLM2 (real weights, so stop strings occur) on the CPU."""

from __future__ import annotations

import pytest
import torch
from engine_utils import engine_env  # noqa: F401

from vtensor.engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("engine_env")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "def fibonacci(n):\n    ",
    "List three colors:",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def loaded(default_gguf_path):
    from vtensor.model import load_model, load_tokenizer

    model, config = load_model(None, dtype=torch.float32, device="cpu")
    return model, config, load_tokenizer(None)


def _engine(loaded, overlap: bool, **kw) -> LLMEngine:
    return LLMEngine(
        device="cpu", dtype="float32", preloaded=loaded, max_model_len=256, debug=True,
        async_scheduling=overlap, **kw,
    )  # fmt: skip


def _run(eng: LLMEngine, reqs: list[tuple[str, SamplingParams]], abort_at: dict | None = None):
    """Run to completion; abort_at {request_id: output tokens}: abort once it has that many."""
    for i, (prompt, p) in enumerate(reqs):
        eng.add_request(str(i), prompt, p)
    final, abort_at = {}, dict(abort_at or {})
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
            elif abort_at.get(o.request_id, 1 << 30) <= len(o.outputs[0].token_ids):
                del abort_at[o.request_id]
                eng.abort_request(o.request_id)
    eng.kv_cache.check_integrity()
    return final


def _summary(o, approx: bool = False):
    c = o.outputs[0]
    # logprobs to ~1e-4: another batch around a request changes fp32 sums in the last bits
    lps = [pytest.approx(d, abs=1e-4) if approx else d for d in c.logprobs or []]
    return (c.token_ids, c.text, c.finish_reason, c.stop_reason, lps, o.error)


def _requests(tok, plain_texts: list[str]) -> list[tuple[str, SamplingParams]]:
    """Stops chosen from the plain greedy run, so that each one really fires mid-stream."""
    word = plain_texts[0].split()[3]
    stop_id = tok.encode(plain_texts[1])[5]
    return [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop=[word])),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_id])),
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=17, ignore_eos=True)),
        (PROMPTS[3], SamplingParams(temperature=0, max_tokens=30, min_tokens=20, logprobs=3)),
        (PROMPTS[4], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=25,
                                    repetition_penalty=1.3, presence_penalty=0.5)),
        (PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=35, frequency_penalty=1.0,
                                    include_stop_str_in_output=True, stop=["\n"])),
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=1)),
    ]


@pytest.fixture(scope="module")
def plain_texts(loaded):
    eng = _engine(loaded, overlap=False)
    outs = _run(eng, [(p, SamplingParams(temperature=0, max_tokens=40)) for p in PROMPTS])
    eng.close()
    return [outs[str(i)].outputs[0].text for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kv_memory", [None, 12 * 2**18], ids=["roomy", "preempting"])
def test_overlapped_loop_emits_what_the_plain_loop_emits(loaded, plain_texts, kv_memory):
    reqs = _requests(loaded[2], plain_texts)
    results = {}
    for overlap in (False, True):
        # 256 KiB pages (5.7 tokens): 12 of them cannot hold every request at once
        eng = _engine(loaded, overlap, kv_memory=kv_memory, page_size=2**18,
                      max_num_batched_tokens=64, enable_prefix_cache=kv_memory is None)
        results[overlap] = {k: _summary(o, overlap) for k, o in _run(eng, reqs).items()}
        preemptions = eng.scheduler.num_preemptions
        eng.close()
    assert results[False] == results[True]
    reasons = {r[2] for r in results[True].values()}
    assert reasons == {"stop", "length"}
    if kv_memory is not None:
        assert preemptions > 0


def test_overlapped_abort_and_more_requests_than_slots(loaded, plain_texts):
    reqs = [(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) for p in PROMPTS]
    solo = _run(_engine(loaded, overlap=False), reqs)
    eng = _engine(loaded, overlap=True, max_num_seqs=2)
    outs = _run(eng, reqs, abort_at={"1": 5, "3": 1})
    for k, o in outs.items():
        ids, ref = o.outputs[0].token_ids, solo[k].outputs[0].token_ids
        if k in ("1", "3"):
            assert o.outputs[0].finish_reason == "abort" and ref[: len(ids)] == ids
        else:
            assert ids == ref
    assert eng.kv_cache.snapshot()["slots_active"] == 0
    eng.close()
