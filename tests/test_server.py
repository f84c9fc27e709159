"""`vtensor serve` end to end: a real uvicorn server on 127.0.0.1 over the real engine with the
embedded default model (SmolLM2-135M-Instruct, CPU, fp32), driven by the official `openai`
client and raw httpx. One engine and one server thread for the whole module (loading the model
is the expensive part); a few extra apps (API key, queue cap) share that engine."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from vtensor.server.api import build_app  # noqa: E402

MODEL = "smollm2-test"
API_KEY = "sk-vtensor-test"
MAX_MODEL_LEN = 512


def make_engine():
    from vtensor.engine import AsyncLLM, EngineArgs

    return AsyncLLM(
        EngineArgs(
            model=None, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=64
        )
    )


class ServerThread:
    """Several uvicorn servers on one event loop in one daemon thread, so that every
    engine.generate() call happens on the same loop, as in `vtensor serve`."""

    def __init__(self, apps: dict[str, object]) -> None:
        self.socks, self.servers, self.urls = [], [], {}
        for name, app in apps.items():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))  # a free port, no race with another process
            self.socks.append(sock)
            self.urls[name] = f"http://127.0.0.1:{sock.getsockname()[1]}"
            cfg = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30)
            self.servers.append(uvicorn.Server(cfg))
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve_all():
            await asyncio.gather(
                *(s.serve(sockets=[k]) for s, k in zip(self.servers, self.socks, strict=True))
            )

        asyncio.run(serve_all())

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not all(s.started for s in self.servers):
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def server(default_gguf_path):  # skips without the embedded model; the engine finds it itself
    engine = make_engine()
    apps = {
        "main": build_app(engine, MODEL),
        "auth": build_app(engine, MODEL, api_key=API_KEY),
        "full": build_app(engine, MODEL, max_waiting=0),
    }
    srv = ServerThread(apps).start()
    srv.engine = engine
    try:
        yield srv
    finally:
        srv.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.urls["main"]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, prompt: str, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def sse_events(raw: str) -> list[str]:
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), raw[:500]
    return [e[len("data: ") :] for e in events]


# ----------------------------------------------------------------------------- basics


def test_health_and_models(server, url, client):
    assert httpx.get(f"{url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completion(server, client):
    r = complete(client, "The capital of France is")
    assert r.object == "text_completion" and r.model == MODEL
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length" and c.text
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    # A list of prompts (text and token ids) gives one choice each, in order, each equal to
    # the prompt run alone; echo prepends the prompt.
    ids = server.engine.tokenizer.encode("Once upon a time", add_special_tokens=False)
    solo = complete(client, "Once upon a time").choices[0].text
    r2 = complete(client, ["The capital of France is", "Once upon a time"], echo=True)
    assert [x.index for x in r2.choices] == [0, 1]
    assert r2.choices[0].text == "The capital of France is" + c.text
    assert r2.choices[1].text == "Once upon a time" + solo
    assert r2.usage.completion_tokens == 16
    assert complete(client, ids).choices[0].text == solo


def test_completion_stream_matches_full(client, url):
    full = complete(client, "Once upon a time", max_tokens=10)
    chunks = list(
        complete(
            client,
            "Once upon a time",
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "text_completion" for ch in chunks)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # Raw wire format: SSE `data:` events, [DONE] last.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in json.loads(events[0]) or json.loads(events[0])["usage"] is None


def test_completion_return_token_ids(server, url):
    """vLLM's return_token_ids: the exact ids, whole or per chunk, and the prompt's."""
    tok = server.engine.tokenizer
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    (c,) = full["choices"]
    assert len(c["token_ids"]) == full["usage"]["completion_tokens"] == 12
    assert tok.decode(c["token_ids"]) == c["text"]
    assert c["prompt_token_ids"] == tok.encode("Once upon a time", add_special_tokens=True)
    raw = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(e) for e in sse_events(raw.text)[:-1]]
    streamed = [i for ch in chunks for i in ch["choices"][0]["token_ids"]]
    assert streamed == c["token_ids"]
    assert all(ch["choices"][0]["prompt_token_ids"] is None for ch in chunks)
    plain = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": False},
                       timeout=60).json()  # fmt: skip
    assert plain["choices"][0]["token_ids"] is None and plain["choices"][0]["text"] == c["text"]
    # chat: the same fields; the prompt's ids are the templated conversation's
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6,
            "temperature": 0, "return_token_ids": True}  # fmt: skip
    full = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    ids = full["choices"][0]["token_ids"]
    assert len(ids) == full["usage"]["completion_tokens"] == 6
    assert len(full["prompt_token_ids"]) == full["usage"]["prompt_tokens"]
    raw = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(e) for e in sse_events(raw.text)[:-1]]
    assert [i for ch in chunks for i in (ch["choices"][0]["token_ids"] or [])] == ids


def test_chat_and_stream(client, url):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    full = chat(client, msgs, max_tokens=12)
    assert full.object == "chat.completion"
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.choices[0].finish_reason in ("stop", "length")
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 12
    chunks = list(chat(client, msgs, max_tokens=12, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # max_completion_tokens is the new name of max_tokens.
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0
    )
    assert r.usage.completion_tokens <= 3
    assert full.choices[0].message.content.startswith(r.choices[0].message.content)


def test_finish_reason_stop_on_eos(client):
    # A chat model answers briefly and ends with its end-of-turn token: "stop", not "length".
    r = chat(client, [{"role": "user", "content": "Say hi."}], max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200


# ----------------------------------------------------------------------------- sampling


def test_n_choices(client):
    r = complete(client, "My favourite colour is", n=3, temperature=1.0, seed=7, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(8 for _ in r.choices)
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # derived seeds: the choices differ
    # Streaming n: every index streams to its own finish, and the same seeds give the same texts.
    chunks = list(
        complete(client, "My favourite colour is", n=3, temperature=1.0, seed=7, stream=True)
    )
    streamed = {i: "" for i in range(3)}
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(3)] == texts
    rc = chat(client, [{"role": "user", "content": "Hi"}], n=2, temperature=0)
    assert [c.index for c in rc.choices] == [0, 1]
    assert rc.choices[0].message.content == rc.choices[1].message.content  # greedy


def test_seed_reproducible(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=12)
    a = complete(client, "In the forest there", seed=1234, **kw).choices[0].text
    b = complete(client, "In the forest there", seed=1234, **kw).choices[0].text
    assert a == b
    others = {complete(client, "In the forest there", seed=s, **kw).choices[0].text for s in (1, 2)}
    assert others - {a}, "different seeds should give a different sample"


def test_stop_strings(client):
    prompt = "Count: one, two, three, four,"
    ref = complete(client, prompt, max_tokens=16).choices[0].text
    assert len(ref) > 6
    stop = ref[3:6]  # a string that greedy decoding is known to produce
    cut = ref[: ref.find(stop)]
    r = complete(client, prompt, max_tokens=16, stop=stop)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    r = complete(client, prompt, max_tokens=16, stop=["\u00a7never\u00a7", stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(complete(client, prompt, max_tokens=16, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = complete(client, "The sky is", max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 4
        # Greedy picks the most likely token: its logprob is the top one.
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)
    r = chat(
        client, [{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(c.logprob <= 0 and len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


# ----------------------------------------------------------------------------- KV reuse


def test_multi_turn_chat_reports_cached_tokens(client):
    msgs = [
        {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
        {"role": "user", "content": "Name a planet in the solar system."},
    ]
    first = chat(client, msgs, max_tokens=16)
    msgs += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And another one?"},
    ]
    second = chat(client, msgs, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    # The first turn's prompt is a prefix of the second's: most of it was reused.
    assert cached >= first.usage.prompt_tokens // 2


# ----------------------------------------------------------------------------- concurrency


def test_64_concurrent_streams_match_solo(client, url):
    # 64 distinct prompts of different lengths, each run alone first, then all 64 at once as
    # streams in one continuous batch: every stream must equal its solo greedy text.
    words = ["sea", "robot", "Paris", "math", "cat", "winter", "music", "moon"]
    prompts = [f"Fact {i} about the {words[i % 8]}:" + " very" * (i // 8) for i in range(64)]
    solo = [complete(client, p, max_tokens=8).choices[0].text for p in prompts]
    assert len(set(solo)) > 8  # the prompts really differ

    async def one(ac, p):
        text, fr = "", None
        stream = await ac.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True
        )
        async for ch in stream:
            text += ch.choices[0].text
            fr = ch.choices[0].finish_reason or fr
        return text, fr

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()

    results = asyncio.run(main())
    for i, (text, fr) in enumerate(results):
        assert fr in ("stop", "length")
        assert text == solo[i], f"request {i}: {prompts[i]!r}"


# ----------------------------------------------------------------------------- cancellation


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if not s.get("running") and not s.get("waiting"):
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine still busy after client disconnect: {engine.stats()}")


def _pinned_pages(engine):
    """Pages held by requests: in use minus what only the prefix cache / parked slots hold
    (those are evictable and legitimately outlive a request)."""
    kv = engine.stats()["kv"]
    assert kv["slots_active"] == 0
    return kv["pages_in_use"] - kv["pages_evictable"]


def test_disconnect_mid_stream_frees_kv(server, url):
    engine = server.engine
    _wait_idle(engine)
    base = _pinned_pages(engine)
    body = {
        "model": MODEL,
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break  # leaving the block closes the connection mid-stream
    _wait_idle(engine)
    assert time.monotonic() - t0 < 20, "the request was not cancelled"
    kv = engine.engine.kv_cache  # the LLMEngine inside the AsyncLLM
    kv.check_integrity()
    assert _pinned_pages(engine) == base

    # Non-streaming: a client that times out and goes away also cancels its request.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    _wait_idle(engine)
    kv.check_integrity()
    assert _pinned_pages(engine) == base


# ----------------------------------------------------------------------------- errors


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def test_error_unknown_model(client, url):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    err = _error(httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}), 404)  # fmt: skip
    assert err["code"] == "model_not_found" and err["param"] == "model"


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("completions", {"prompt": "hi", "temperature": 5}, "temperature"),
        ("completions", {"prompt": "hi", "n": 0}, "n"),
        ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "hi", "logprobs": 99}, "logprobs"),
        ("completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
        ("completions", {"max_tokens": 2}, "prompt"),
        ("completions", {"prompt": ""}, "prompt"),
        ("completions", {"prompt": [10**9]}, "prompt"),
        ("completions", {"prompt": "hi", "stop": [""]}, "stop"),
        ("completions", {"prompt": "hi", "seed": 2**70}, "seed"),
        ("completions", {"prompt": ["hi"] * 300}, "prompt"),
        ("chat/completions", {}, "messages"),
        ("chat/completions", {"messages": []}, "messages"),
        ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
        ),  # fmt: skip
    ],
)
def test_error_invalid_params(url, path, body, field):
    err = _error(httpx.post(f"{url}/v1/{path}", json={"model": MODEL, **body}), 400)
    assert field in err["message"] and err["type"] == "invalid_request_error"


def test_error_bad_json_and_route(url):
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    _error(r, 400)
    _error(httpx.get(f"{url}/v1/nothing-here"), 404)


def test_error_prompt_too_long(client, url):
    long_prompt = "hello " * (MAX_MODEL_LEN + 50)
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert "maximum context length" in str(ei.value)
    err = _error(
        httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN + 1},
        ),
        400,
    )
    assert err["code"] == "context_length_exceeded"
    err = _error(
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]},
        ),
        400,
    )
    assert err["code"] == "context_length_exceeded"


def test_error_api_key(server):
    url = server.urls["auth"]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    err = _error(httpx.post(f"{url}/v1/completions", json=body), 401)
    assert err["code"] == "invalid_api_key"
    bad = {"Authorization": "Bearer wrong"}
    _error(httpx.post(f"{url}/v1/completions", json=body, headers=bad), 401)
    _error(httpx.get(f"{url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_error_overloaded_503(server):
    url = server.urls["full"]
    for path, body in [
        ("completions", {"prompt": "hi", "stream": True}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, "max_tokens": 2, **body})
        _error(r, 503)
        assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(f"{url}/v1/models").status_code == 200  # only generation is refused


# ----------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
    r"(-?[0-9.eE+-]+|NaN|[+-]Inf)$"
)


def parse_prometheus(text: str) -> dict[str, float]:
    samples, types = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or base in types, f"sample without TYPE: {line!r}"
    return samples


def test_metrics(client, url):
    complete(client, "Metrics warm-up", max_tokens=4)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = parse_prometheus(r.text)
    for name in (
        "vtensor:num_requests_running",
        "vtensor:num_requests_waiting",
        "vtensor:generation_tokens_per_second",
        "vtensor:kv_pages_in_use",
        "vtensor:kv_pages_cached",
        "vtensor:kv_pages_free",
        "vtensor:kv_fragmentation",
        "vtensor:prefix_cache_hit_rate",
    ):
        assert name in s, name
    assert s["vtensor:generation_tokens_total"] >= 4
    assert s["vtensor:num_requests_waiting_first_token"] == 0  # nothing leaked by cancellations
    assert s["vtensor:engine_prefill_steps_graphed_total"] == 0  # the CPU: no CUDA graphs
    ttft = s["vtensor:time_to_first_token_seconds_count"]
    for h in ("request_queue_time_seconds", "request_prefill_time_seconds"):  # engine-side
        assert s[f"vtensor:{h}_count"] == ttft and s[f"vtensor:{h}_sum"] <= s[
            "vtensor:time_to_first_token_seconds_sum"]  # fmt: skip
    assert 0 <= s["vtensor:prefix_cache_hit_rate"] <= 1 and s["vtensor:kv_pages_in_use"] > 0
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds"):
        buckets = [v for k, v in s.items() if k.startswith(f"vtensor:{h}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == s[f"vtensor:{h}_count"] > 0


# Last: an engine failure here must not take the other tests down with it.
def test_penalties_accepted(client):
    base = complete(client, "la la la la la la", max_tokens=12).choices[0].text
    pen = complete(
        client, "la la la la la la", max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0
    ).choices[0]
    assert pen.finish_reason in ("stop", "length")
    # Greedy output repeats some tokens within 12 ("-1000.\n\n..."): penalties change it.
    assert pen.text != base


def test_cli_arguments(monkeypatch):
    import argparse

    from vtensor.server import cli

    monkeypatch.setenv("VTENSOR_API_KEY", "sk-env")
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = p.parse_args([])
    assert (a.host, a.port, a.api_key, a.max_waiting) == ("127.0.0.1", 8000, "sk-env", None)
    assert cli.served_name(a) == cli.DEFAULT_MODEL_NAME
    a = p.parse_args(["--model", "/m/Llama-3.gguf", "--kv", "paged", "--max-model-len", "64",
                      "--kv-memory", "1GiB", "--api-key", "k", "--max-waiting", "3"])  # fmt: skip
    assert cli.served_name(a) == "Llama-3" and a.api_key == "k" and a.max_waiting == 3
    from vtensor.engine.cli_args import from_cli_args

    ea = from_cli_args(a)
    assert (ea.model, ea.kv, ea.max_model_len, ea.kv_memory) == (
        "/m/Llama-3.gguf",
        "paged",
        64,
        2**30,
    )
    with pytest.raises(SystemExit):
        p.parse_args(["--kv", "nope"])
