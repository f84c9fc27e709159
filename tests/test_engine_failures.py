"""A failure tied to one request ends that request with a typed error; the engine, the other
requests and AsyncLLM's thread go on. Only device errors (or steps failing again and again)
propagate. Dummy 2-layer SmolLM2 shapes on the CPU."""

from __future__ import annotations

import asyncio

import pytest
from engine_utils import engine_env, greedy  # noqa: F401

from vtensor.engine import (
    AsyncLLM,
    ErrorKind,
    LLMEngine,
    RequestFailedError,
    SamplingParams,
)
from vtensor.engine.sampler import Sampler

pytestmark = pytest.mark.usefixtures("engine_env")
BAD_SEED = 666
PROMPTS = [[5, 9, 33, 7, 81, 4], [17, 3, 2, 99], [44, 45, 46, 47, 48, 49, 50, 51, 52]]


def _engine(**kw) -> LLMEngine:
    return LLMEngine(
        model="smollm2-135m", load_format="dummy", device="cpu", dtype="float32", max_model_len=64,
        config_overrides={"num_layers": 2}, debug=True, **kw,
    )  # fmt: skip


def _run(eng: LLMEngine, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    for rid, (ids, p) in reqs.items():
        eng.add_request(rid, ids, p)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


@pytest.fixture
def poisoned_sampler(monkeypatch):
    """The sampler raises whenever the batch holds the request seeded BAD_SEED."""
    real = Sampler.__call__

    def call(self, logits, seqs):
        if any(s.params.seed == BAD_SEED for s in seqs):
            raise OverflowError("boom")
        return real(self, logits, seqs)

    monkeypatch.setattr(Sampler, "__call__", call)


@pytest.fixture(scope="module")
def solo():
    eng = _engine()
    outs = _run(eng, {f"s{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)})
    eng.close()
    return [outs[f"s{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]


def test_sampler_failure_fails_only_its_request(poisoned_sampler, solo):
    eng = _engine()
    bad = SamplingParams(temperature=1.0, seed=BAD_SEED, max_tokens=12)
    reqs = {f"g{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)}
    outs = _run(eng, {**reqs, "bad": (PROMPTS[0], bad)})
    assert outs["bad"].outputs[0].finish_reason == "error"
    assert outs["bad"].error.kind == ErrorKind.INTERNAL
    assert "OverflowError" not in outs["bad"].error.message  # no internals to the client
    for i in range(len(PROMPTS)):
        assert outs[f"g{i}"].error is None
        assert outs[f"g{i}"].outputs[0].token_ids == solo[i]
    eng.kv_cache.check_integrity()
    # still serving
    assert _run(eng, {"again": (PROMPTS[1], greedy(12))})["again"].outputs[0].token_ids == solo[1]
    eng.close()


def test_failed_step_fails_its_batch_then_the_engine_goes_on(monkeypatch, solo):
    eng = _engine()
    real, calls = eng.runner.execute, []

    def execute(batch, fill=None):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("transient")
        return real(batch, fill)

    monkeypatch.setattr(eng.runner, "execute", execute)
    outs = _run(eng, {f"g{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)})
    failed = [o for o in outs.values() if o.error is not None]
    assert failed and all(o.outputs[0].finish_reason == "error" for o in failed)
    assert len(outs) == len(PROMPTS)
    eng.kv_cache.check_integrity()
    again = _run(eng, {f"h{i}": (p, greedy(12)) for i, p in enumerate(PROMPTS)})
    assert [again[f"h{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == solo
    eng.close()


@pytest.mark.parametrize(
    "error", [RuntimeError("CUDA error: an illegal memory access"), RuntimeError("again")]
)
def test_device_errors_and_repeated_failures_propagate(monkeypatch, error):
    eng = _engine()

    def execute(batch, fill=None):
        raise error

    monkeypatch.setattr(eng.runner, "execute", execute)
    eng.add_request("a", PROMPTS[0], greedy(4))
    with pytest.raises(RuntimeError):
        for _ in range(10):  # "again" is transient: it fails requests until the limit
            eng.add_request(f"r{_}", PROMPTS[1], greedy(4))
            eng.step()
    eng.close()


def test_top_k_beyond_the_vocabulary_is_clamped(solo):
    eng = _engine()
    p = SamplingParams(temperature=1.0, top_k=10**9, top_p=0.9, seed=1, max_tokens=6)
    outs = _run(eng, {"k": (PROMPTS[0], p)})
    assert outs["k"].error is None and len(outs["k"].outputs[0].token_ids) == 6
    eng.close()


def test_async_engine_survives_a_request_failure(poisoned_sampler, solo):
    allm = AsyncLLM(engine=_engine())

    async def collect(rid, ids, p):
        last = None
        async for out in allm.generate(ids, p, rid):
            last = out
        return last

    async def main():
        bad = SamplingParams(temperature=1.0, seed=BAD_SEED, max_tokens=12)
        return await asyncio.gather(
            collect("ok", PROMPTS[2], greedy(12)), collect("bad", PROMPTS[0], bad),
            return_exceptions=True,
        )  # fmt: skip

    ok, bad = asyncio.run(main())
    assert isinstance(bad, RequestFailedError) and bad.kind == ErrorKind.INTERNAL
    assert ok.outputs[0].token_ids == solo[2]
    assert allm._thread.is_alive() and allm._dead is None
    later = asyncio.run(collect("later", PROMPTS[1], greedy(12)))
    assert later.outputs[0].token_ids == solo[1]
    allm.shutdown()
