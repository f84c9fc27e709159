"""MPAsyncLLM (the engine in its own process, `vtensor serve`'s default) against AsyncLLM (the
same engine on a thread): same tokens and text for concurrent streams, the same error
contract (bad input at once, duplicate ids, start-up errors of the same type), cancellation
that frees the request's KV, and a dead engine process reported to every stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from vtensor.engine import AsyncLLM, EngineArgs, MPAsyncLLM, SamplingParams
from vtensor.engine.streams import EngineDeadError

MAX_LEN = 256


def _args(**kw) -> EngineArgs:
    kw = {"model": None, "dtype": "float32", "device": "cpu", "max_model_len": MAX_LEN,
          "max_num_seqs": 8, **kw}  # fmt: skip
    return EngineArgs(**kw)


@pytest.fixture(scope="module")
def mp_engine(default_gguf_path):
    eng = MPAsyncLLM(_args())
    try:
        yield eng
    finally:
        eng.shutdown()


JOBS = [
    ("Once upon a time", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
    ("The capital of France is", SamplingParams(temperature=0.0, max_tokens=30, stop=[" the"])),
    ([1, 2, 3, 4, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
    ("Count: one, two,", SamplingParams(temperature=0.8, seed=7, max_tokens=16, logprobs=2)),
]


async def _collect(engine, prompt, params, rid):
    deltas, last = [], None
    async for out in engine.generate(prompt, params, rid):
        deltas.append(out.outputs[0].new_token_ids)
        last = out
    return last, deltas


async def _run_all(engine, tag: str):
    return await asyncio.wait_for(
        asyncio.gather(*(_collect(engine, p, sp, f"{tag}{i}") for i, (p, sp) in enumerate(JOBS))),
        120,
    )


def test_same_outputs_as_the_thread_engine(mp_engine):
    thread = AsyncLLM(_args())
    try:
        want = asyncio.run(_run_all(thread, "t"))
    finally:
        thread.shutdown()
    got = asyncio.run(_run_all(mp_engine, "p"))
    for (w, _), (g, deltas) in zip(want, got, strict=True):
        wo, go = w.outputs[0], g.outputs[0]
        assert go.token_ids == wo.token_ids and go.text == wo.text
        assert (go.finish_reason, go.stop_reason) == (wo.finish_reason, wo.stop_reason)
        # batches differ between the two runs (arrival timing): fp32 sums may differ in the
        # last bits, so logprobs are compared to a tolerance, tokens exactly
        assert (go.logprobs is None) == (wo.logprobs is None)
        for lg, lw in zip(go.logprobs or [], wo.logprobs or [], strict=True):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t] - lw[t]) < 1e-3 for t in lg), (lg, lw)
        m = g.metrics  # the engine process's timestamps, on the parent's monotonic clock
        assert g.finished and m["arrival"] <= m["scheduled"] <= m["first_token"] <= m["finish"]
        assert [t for d in deltas for t in d] == go.token_ids  # the stream adds up
    assert got[1][0].outputs[0].finish_reason == "stop"  # the stop string was exercised
    s = mp_engine.stats()
    assert len(s["ttft"]) >= len(JOBS) and "running" in s and "kv" in s


def test_bad_input_and_duplicate_ids(mp_engine):
    async def first(prompt, params, rid):
        async for out in mp_engine.generate(prompt, params, rid):
            return out

    with pytest.raises(ValueError, match="too long"):
        asyncio.run(first([5] * MAX_LEN, SamplingParams(max_tokens=4), "long"))
    with pytest.raises(ValueError, match="token ids must be in"):
        asyncio.run(first([10**9], SamplingParams(max_tokens=4), "vocab"))

    async def dup():
        slow = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        a = mp_engine.generate("Hello", slow, "same")
        await a.__anext__()
        try:
            with pytest.raises(ValueError, match="already running"):
                await first("Hello", slow, "same")
        finally:
            await a.aclose()

    asyncio.run(asyncio.wait_for(dup(), 60))
    assert mp_engine.dead is None  # bad requests never hurt the engine


def _wait_idle(engine, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if not s["running"] and not s["waiting"] and s["kv"]["slots_active"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_cancel_mid_stream_frees_kv(mp_engine):
    base = _wait_idle(mp_engine)["kv"]

    async def cancel_after(n: int):
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        agen = mp_engine.generate("Write a long story about a dragon.", params, "cancel")
        got = 0
        async for _ in agen:
            got += 1
            if got == n:
                break
        await agen.aclose()  # the client went away: abort
        return got

    t0 = time.monotonic()
    assert asyncio.run(asyncio.wait_for(cancel_after(3), 60)) == 3
    kv = _wait_idle(mp_engine)["kv"]
    assert time.monotonic() - t0 < 20, "the request ran on after its stream closed"
    pinned = lambda k: k["pages_in_use"] - k["pages_evictable"]  # noqa: E731
    assert pinned(kv) == pinned(base)


def test_start_up_error_has_the_engines_type(tmp_path):
    from vtensor.engine import LLMEngine

    bad = _args(model=str(tmp_path / "nowhere"))
    with pytest.raises(Exception) as thread_err:  # noqa: PT011 - compared below
        LLMEngine(bad)
    with pytest.raises(type(thread_err.value)):
        MPAsyncLLM(bad)


def test_engine_process_death_fails_every_stream(default_gguf_path):
    eng = MPAsyncLLM(_args())
    try:
        async def main():
            params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            agens = [eng.generate("Tell me a story", params, f"d{i}") for i in range(3)]
            for a in agens:
                await a.__anext__()  # all three are running
            os.kill(eng._proc.pid, signal.SIGKILL)
            errors = []
            for a in agens:
                with pytest.raises(EngineDeadError):
                    async for _ in a:
                        pass
                errors.append(True)
            return errors

        assert asyncio.run(asyncio.wait_for(main(), 60)) == [True] * 3
        assert eng.dead is not None

        async def after():
            async for _ in eng.generate("x", SamplingParams(max_tokens=2), "late"):
                pass

        with pytest.raises(EngineDeadError):
            asyncio.run(after())
    finally:
        eng.shutdown()


def test_a_lagging_caller_gets_waiting_outputs_as_one():
    """Outputs queued while the caller was busy come out merged (latest cumulative state, the
    deltas joined); an error queued after them is raised after they are yielded."""
    from vtensor.engine.outputs import CompletionOutput, RequestOutput
    from vtensor.engine.streams import RequestStreams

    def out(ids, new, finished=False):
        text = "".join(f"<{t}>" for t in ids)
        comp = CompletionOutput(0, text, list(ids), list(new), "".join(f"<{t}>" for t in new),
                                finish_reason="length" if finished else None)  # fmt: skip
        return RequestOutput("r", None, [1], [comp], finished)

    async def main(tail):
        streams, aborted = RequestStreams(), []
        q = streams.open("r")
        for item in [out([5], [5]), out([5, 6], [6]), out([5, 6, 7], [7]), tail]:
            q.put_nowait(item)
        got, err = [], None
        try:
            async for o in streams.stream("r", q, aborted.append):
                got.append(o)
        except RuntimeError as e:
            err = e
        return got, err, aborted

    got, err, aborted = asyncio.run(main(out([5, 6, 7, 8], [8], finished=True)))
    assert len(got) == 1 and got[0].finished and err is None and not aborted
    c = got[0].outputs[0]
    assert c.new_token_ids == [5, 6, 7, 8] and c.new_text == "<5><6><7><8>" == c.text

    got, err, aborted = asyncio.run(main(RuntimeError("engine failed")))
    assert [o.outputs[0].new_token_ids for o in got] == [[5, 6, 7]] and str(err) == "engine failed"
    assert not aborted  # an error ends the request: nothing left to abort


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_vtensor_serve_stops_with_its_engine_process(default_gguf_path, sig):
    """`vtensor serve` (engine process by default) answers, then on SIGTERM / a terminal's
    Ctrl-C (SIGINT to the whole process group) drains, exits and leaves no engine process;
    killed outright (SIGKILL to the server alone), its engine process notices and exits."""
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vtensor.cli", "serve", "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--max-model-len", "256", "--drain-timeout", "5",
           "--served-model-name", "x"]  # fmt: skip
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never came up"
            time.sleep(0.5)
        body = {"model": "x", "prompt": "Hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        children = _children(p.pid)
        assert children, "no engine process under vtensor serve"
        os.killpg(p.pid, sig) if sig == signal.SIGINT else p.send_signal(sig)
        rc = p.wait(timeout=60)
        log = p.stdout.read().decode()
        if sig != signal.SIGKILL:
            # uvicorn drains, then re-raises the signal it caught (SIGINT: the CLI's exit 130)
            assert rc in (0, -int(sig), 128 + int(sig)), (rc, log[-3000:])
            assert "Finished server process" in log, log[-3000:]
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(c) for c in children), "engine process outlived the server"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except OSError:
        return False
