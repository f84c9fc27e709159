"""Issue 15, server side: no request can kill the engine; overload, shutdown and bad input.

One real engine (embedded SmolLM2-135M, CPU) with a small KV budget, and proxies over it that
fail or hold requests on demand, so each failure mode is reproduced exactly and fast."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_server import MODEL, ServerThread, sse_events  # noqa: E402

from vtensor.engine import AsyncLLM, EngineClient, RequestOutput  # noqa: E402
from vtensor.engine.errors import ErrorKind, RequestError, RequestFailedError  # noqa: E402
from vtensor.server.api import build_app  # noqa: E402
from vtensor.server.cli import fit_kv_budget  # noqa: E402
from vtensor.server.lifecycle import DrainingServer, Lifecycle  # noqa: E402

MAX_MODEL_LEN = 512
KV_MEMORY = "8MiB"  # 4 host pages of 2 MiB: ~180 tokens of SmolLM2 fp32 KV, < MAX_MODEL_LEN
INTERNAL_SEED, TOO_LARGE_SEED, BUG_SEED = 6660, 6661, 6662


class Proxy:
    """An EngineClient that delegates each member to the real AsyncLLM; subclasses override
    generate() or dead."""

    def __init__(self, real: AsyncLLM) -> None:
        self._real = real
        self.tokenizer = real.tokenizer
        self.max_model_len = real.max_model_len
        self.vocab_size = real.vocab_size
        self.kv_token_capacity = real.kv_token_capacity

    @property
    def dead(self) -> BaseException | None:
        return self._real.dead

    def generate(self, prompt, params, request_id) -> AsyncIterator[RequestOutput]:
        return self._real.generate(prompt, params, request_id)

    async def abort(self, request_id: str) -> None:
        await self._real.abort(request_id)

    def stats(self) -> dict:
        return self._real.stats()


class FaultyEngine(Proxy):
    """Fails requests by seed the way the engine does: INTERNAL after a first token (as when
    the sampler raises mid-stream), TOO_LARGE before any, or an unexpected bug."""

    async def generate(self, prompt, params, request_id):
        seed = params.seed
        if seed == TOO_LARGE_SEED:
            raise RequestFailedError(
                RequestError(ErrorKind.TOO_LARGE, "The request needs more KV than the server has.")
            )
        n = 0
        async for out in self._real.generate(prompt, params, request_id):
            yield out
            n += 1
            if seed == INTERNAL_SEED and n == 2:
                await self._real.abort(request_id)
                raise RequestFailedError(
                    RequestError(ErrorKind.INTERNAL, "The engine failed on this request.")
                )
            if seed == BUG_SEED:
                raise RuntimeError(f"secret detail of {request_id} at 0xdeadbeef")


class GateEngine(Proxy):
    """Holds every request before the engine until `release` is set: requests stay waiting."""

    def __init__(self, real: AsyncLLM) -> None:
        super().__init__(real)
        self.release = threading.Event()

    async def generate(self, prompt, params, request_id):
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        async for out in self._real.generate(prompt, params, request_id):
            yield out


class DeadEngine(Proxy):
    @property
    def dead(self) -> BaseException | None:
        return RuntimeError("CUDA error: an illegal memory access at 0x7f00 (req-internal-42)")


@pytest.fixture(scope="module")
def srv(default_gguf_path):
    from vtensor.engine import EngineArgs

    engine = AsyncLLM(
        EngineArgs(model=None, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
                   max_num_seqs=16, kv_memory=KV_MEMORY)  # fmt: skip
    )
    gate = GateEngine(engine)
    apps = {
        "main": build_app(engine, MODEL, max_body_size=2**20),
        "faulty": build_app(FaultyEngine(engine), MODEL),
        "gate": build_app(gate, MODEL, max_waiting=4),
        "dead": build_app(DeadEngine(engine), MODEL),
    }
    s = ServerThread(apps).start()
    s.engine, s.gate = engine, gate
    try:
        yield s
    finally:
        gate.release.set()
        s.stop()
        engine.shutdown()


def post(url: str, path: str, body: Any, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{url}/v1/{path}", content=body, timeout=60,
                          headers={"content-type": "application/json"}, **kw)  # fmt: skip
    return httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}, timeout=60, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def assert_clean(text: str) -> None:
    """No exception type names, internal ids or addresses in what a client sees."""
    for leak in ("Error:", "Traceback", "RuntimeError", "req-", "0x", "secret", "CUDA"):
        assert leak not in text, text


# ----------------------------------------------------------------------------- item 1


def test_item1_huge_top_k_is_400_and_engine_lives(srv):
    url = srv.urls["main"]
    body = {"prompt": "x", "max_tokens": 2, "temperature": 1, "top_k": 10**20}
    err = error_of(post(url, "completions", body), 400)
    assert "top_k" in err["message"] and err["param"] == "top_k"
    # The largest accepted value runs (clamped to the vocabulary), and nothing died.
    r = post(url, "completions", {**body, "top_k": 2**31 - 1})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{url}/health").status_code == 200


def test_item1_failed_request_is_clean_error_others_go_on(srv):
    url = srv.urls["faulty"]
    base = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    good = post(url, "completions", base).json()["choices"][0]["text"]
    # Non-streaming: 500 with a message and a code, nothing internal.
    r = post(url, "completions", {**base, "seed": INTERNAL_SEED})
    err = error_of(r, 500)
    assert err["code"] == "internal_error" and err["type"] == "server_error"
    assert_clean(r.text)
    # TOO_LARGE before any token: 400, for streams too (nothing was sent yet).
    for stream in (False, True):
        r = post(url, "completions", {**base, "seed": TOO_LARGE_SEED, "stream": stream})
        assert error_of(r, 400)["code"] == "request_too_large"
    # Streaming, failing after tokens went out: 200, then a final error event, then [DONE].
    r = post(url, "completions", {**base, "seed": INTERNAL_SEED, "stream": True})
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"
    assert_clean(r.text)
    # A bug in the path: 500 / error chunk without its text.
    for stream in (False, True):
        r = post(url, "chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                           "seed": BUG_SEED, "stream": stream})  # fmt: skip
        assert r.status_code == (200 if stream else 500)
        assert "internal_error" in r.text
        assert_clean(r.text)
    # The engine lives; the same request without the fault gives the same text.
    assert httpx.get(f"{url}/health").status_code == 200
    assert post(url, "completions", base).json()["choices"][0]["text"] == good


# ----------------------------------------------------------------------------- item 2


def test_item2_max_waiting_counts_engine_requests(srv):
    url, gate = srv.urls["gate"], srv.gate
    gate.release.clear()
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    # n beyond the cap can never be admitted: a 400, not a 503 to retry forever.
    assert error_of(post(url, "completions", {**body, "n": 5}), 400)["param"] == "n"
    with httpx.Client(timeout=60) as c:
        results: dict[str, Any] = {}

        def send(key, extra):
            results[key] = c.post(f"{url}/v1/completions", json={"model": MODEL, **body, **extra})

        t1 = threading.Thread(target=send, args=("three", {"n": 3}))
        t1.start()
        deadline = time.monotonic() + 10
        while srv.gate._real is not None and time.monotonic() < deadline:
            m = httpx.get(f"{url}/metrics").text
            if "vtensor:num_requests_waiting_first_token 3" in m:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the n=3 request was not admitted")
        # 3 waiting + 2 > 4: refused (before the fix it was one waiting HTTP request, < 4).
        r = c.post(f"{url}/v1/completions", json={"model": MODEL, **body, "n": 2})
        assert error_of(r, 503)["code"] == "server_overloaded" and r.headers["retry-after"]
        # 2 prompts x n=1 also count as 2.
        r = c.post(f"{url}/v1/completions", json={"model": MODEL, **body, "prompt": ["a", "b"]})
        assert r.status_code == 503
        t2 = threading.Thread(target=send, args=("one", {"n": 1}))
        t2.start()
        time.sleep(0.3)
        gate.release.set()
        t1.join(60)
        t2.join(60)
    assert results["three"].status_code == 200 and len(results["three"].json()["choices"]) == 3
    assert results["one"].status_code == 200
    assert "vtensor:num_requests_waiting_first_token 0" in httpx.get(f"{url}/metrics").text


# ----------------------------------------------------------------------------- item 3


def test_engine_missing_a_protocol_member_is_refused_at_build(srv):
    stand_in = Proxy(srv.engine)
    assert isinstance(srv.engine, EngineClient) and isinstance(stand_in, EngineClient)
    build_app(stand_in, MODEL)
    del stand_in.kv_token_capacity  # e.g. a stand-in written before the member existed
    assert not isinstance(stand_in, EngineClient)
    with pytest.raises(TypeError, match=r"^Proxy is not an EngineClient: it lacks kv_token_capa"):
        build_app(stand_in, MODEL)
    with pytest.raises(TypeError, match="it lacks abort, dead, generate, kv_token_capacity, max"):
        build_app(object(), MODEL)


def test_item3_kv_budget_below_max_model_len(srv):
    url, engine = srv.urls["main"], srv.engine
    cap = engine.kv_token_capacity
    assert 16 <= cap < MAX_MODEL_LEN
    warning = fit_kv_budget(engine)
    assert warning and str(cap) in warning and "--kv-memory" in warning
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["max_model_len"] == cap
    # Can never fit: 400 before any token, streams included (docs/serving.md says 400 too).
    for stream in (False, True):
        body = {"prompt": "hi", "max_tokens": cap, "stream": stream}
        err = error_of(post(url, "completions", body), 400)
        assert err["code"] == "context_length_exceeded" and "KV cache" in err["message"]
    # Fits: served, even several at once that do not fit together (they wait / preempt).
    async def many():
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": cap // 2,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=body)
                                          for _ in range(4)))  # fmt: skip

    rs = asyncio.run(many())
    assert all(r.status_code == 200 for r in rs), [r.text[:200] for r in rs]
    assert len({r.json()["choices"][0]["text"] for r in rs}) == 1  # greedy, same under pressure


# ----------------------------------------------------------------------------- item 4


def test_item4_body_limit_413_and_tokenizing_off_the_loop(srv):
    url = srv.urls["main"]  # max_body_size 1 MiB
    big = json.dumps({"model": MODEL, "prompt": "a " * 600_000, "max_tokens": 1}).encode()
    # A declared Content-Length over the limit: Starlette answers 413 before reading it.
    assert post(url, "completions", big).status_code == 413
    # A chunked body (no length) is counted as it arrives: 413 as OpenAI JSON.
    r = httpx.post(f"{url}/v1/completions", content=iter([big[i : i + 65536]
                   for i in range(0, len(big), 65536)]), timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    err = error_of(r, 413)
    assert err["code"] == "too_large" and "limit" in err["message"]
    # Just under the limit: a long tokenization (then 400: too long for the model), while
    # /health answers at once.
    body = json.dumps({"model": MODEL, "prompt": "word, " * 170_000, "max_tokens": 1})
    assert len(body) < 2**20
    done: dict[str, Any] = {}
    t = threading.Thread(target=lambda: done.setdefault("r", post(url, "completions", body)))
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    t.join()
    assert error_of(done["r"], 400)["code"] == "context_length_exceeded"
    assert worst < 0.5, f"/health took {worst:.2f} s while a prompt was tokenized"


# ----------------------------------------------------------------------------- item 5


def test_item5_drain_timeout_ends_streams_with_error_chunk(srv):
    engine = srv.engine
    life = Lifecycle()
    app = build_app(engine, MODEL, lifecycle=life)
    st = ServerThread({"drain": app})
    cfg = st.servers[0].config
    st.servers[0] = DrainingServer(cfg, life, drain_timeout_s=1.0)
    st.start()
    url = st.urls["drain"]
    body = {"model": MODEL, "prompt": "Write a long story.", "max_tokens": 150,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    lines: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if len([x for x in lines if x.startswith("data: ")]) >= 2:
                break
        t0 = time.monotonic()
        st.servers[0].should_exit = True  # what uvicorn's SIGTERM handler does
        lines += list(it)
    took = time.monotonic() - t0
    st.thread.join(timeout=15)
    events = [x[6:] for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert err["code"] == "server_shutting_down"
    assert took < 6, f"the stream ran {took:.1f} s past SIGTERM (drain timeout 1 s)"
    assert not st.thread.is_alive()
    deadline = time.monotonic() + 10
    while engine.stats().get("running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.stats().get("running")  # its engine request was aborted


# ----------------------------------------------------------------------------- items 6, 7


@pytest.mark.parametrize(
    "path,raw,field",
    [
        ("completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
        ("completions", '{"prompt": ["ok", "a\\udfffb"], "max_tokens": 1}', "prompt"),
        ("completions", '{"model": "a\\ud800b", "prompt": "x", "max_tokens": 1}', "model"),
        ("completions", '{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 1}', "stop"),
        ("chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
         "content"),  # fmt: skip
        ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
         '"text": "\\udc00"}]}]}', "text"),  # fmt: skip
    ],
)
def test_item6_lone_surrogates_are_400(srv, path, raw, field):
    err = error_of(post(srv.urls["main"], path, raw), 400)
    assert field in err["message"] and "surrogate" in err["message"]


def test_item7_bad_json_params_and_no_internals_in_errors(srv):
    url = srv.urls["main"]
    err = error_of(post(url, "completions", '{"prompt": "x", "max_tokens": 1,,}'), 400)
    assert err["param"] is None and "not valid JSON" in err["message"]
    for value in ("1e308", "Infinity", "NaN", "-Infinity", "2.5"):
        raw = f'{{"prompt": "x", "max_tokens": 1, "repetition_penalty": {value}}}'
        err = error_of(post(url, "completions", raw), 400)
        assert "repetition_penalty" in err["message"]
    for field, value in (("temperature", "Infinity"), ("top_p", "NaN"), ("min_p", "NaN"),
                         ("presence_penalty", "-Infinity")):  # fmt: skip
        raw = f'{{"prompt": "x", "max_tokens": 1, "{field}": {value}}}'
        assert field in error_of(post(url, "completions", raw), 400)["message"]
    # A dead engine: /health and requests say so, without the engine's exception text.
    dead = srv.urls["dead"]
    r = httpx.get(f"{dead}/health")
    assert error_of(r, 503)["code"] == "engine_dead"
    assert_clean(r.text)
    r = post(dead, "completions", {"prompt": "x", "max_tokens": 1})
    assert error_of(r, 503)["code"] == "engine_dead"
    assert_clean(r.text)
    assert httpx.get(f"{url}/health").status_code == 200
