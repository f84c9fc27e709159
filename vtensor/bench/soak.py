"""Soak test: a real `vtensor serve` app under hostile, random, bursty load, then invariants.

    python -m vtensor.bench.soak --minutes 2.5 --layers 2 --page-size 65536 \
        --kv-memory 1536KiB --require-preemption     # what CI runs (CPU; ~2900 requests)
    python -m vtensor.bench.soak --minutes 10 --device cuda --concurrency 64   # H200

The server is uvicorn on 127.0.0.1 (a DrainingServer, as `vtensor serve` runs it) in a thread
of this process, so the checks can look inside the engine. Load, from `--concurrency` clients:
random prompts and lengths, random sampling parameters (edge values included), `n` up to 3,
completions and chat, streaming and not, ~30% of streams cancelled mid-way, hostile bodies
(each must get a 4xx), greedy requests whose text must equal their solo run, and bursts past
`--max-waiting` (some get 503). The KV budget is small enough to force preemption.

At the end: every accepted request got exactly one terminal response (a finish_reason per
choice, `[DONE]` last), no 5xx, greedy == solo, the engine alive, KV integrity holds, KV pages
back to the idle baseline, no request counted as waiting; then SIGTERM-style shutdown with a
stream in flight must end it with an error chunk within the drain timeout. Exit status 0 when
every invariant holds; the figures go to stdout (and `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MODEL = "soak"
_TEXT = ("the cat sat on a mat while seven robots argued about Paris winter music moon sea "
         "history of virtual memory pages kernels tokens quietly loudly because")  # fmt: skip
WORDS = tuple(_TEXT.split())


def hostile_inputs() -> list[tuple[str, Any]]:
    """(path, body) pairs a client must never get a 5xx for (a dict is sent as JSON, a str or
    bytes as is): wrong types, out-of-range and non-finite numbers, bad Unicode, bad JSON."""
    out: list[tuple[str, Any]] = []
    bad_values = ["1e308", "-1e308", "Infinity", "-Infinity", "NaN", "-1", "1e20",
                  "100000000000000000000", '"x"', "[]", "{}", "true"]  # fmt: skip
    fields = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "max_tokens", "n", "seed", "logprobs"]  # fmt: skip
    for f in fields:
        for v in bad_values:
            out.append(("completions", f'{{"model": "{MODEL}", "prompt": "x", "{f}": {v}}}'))
    lone = "a\\ud800b"
    out += [
        ("completions", f'{{"prompt": "{lone}", "max_tokens": 1}}'),
        ("completions", f'{{"model": "{lone}", "prompt": "x"}}'),
        ("completions", f'{{"prompt": "x", "stop": "{lone}"}}'),
        ("chat/completions", f'{{"messages": [{{"role": "user", "content": "{lone}"}}]}}'),
        ("completions", '{"prompt": "x",,}'),
        ("completions", "not json at all"),
        ("completions", b"\xff\xfe\x00garbage"),
        ("completions", "[1, 2, 3]"),
        ("completions", '{"prompt": [-1]}'),
        ("completions", '{"prompt": [1e30]}'),
        ("completions", '{"prompt": [[]]}'),
        ("completions", '{"prompt": ""}'),
        ("completions", '{"prompt": "x", "max_tokens": 100000000}'),
        ("completions", '{"prompt": "x", "stop": [""]}'),
        ("completions", '{"prompt": "x", "suffix": "y"}'),
        ("completions", '{"prompt": "x", "echo": true, "logprobs": 2}'),
        ("completions", '{"prompt": "x", "n": 1000}'),
        ("completions", '{"prompt": ["x"], "n": 32, "max_tokens": 1}'),
        ("chat/completions", '{"messages": []}'),
        ("chat/completions", '{"messages": [{"role": "wizard", "content": "x"}]}'),
        ("chat/completions", '{"messages": [{"role": "user"}], "top_logprobs": 5}'),
        ("chat/completions", '{"messages": "hello"}'),
        ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": 1}]}]}'),
    ]
    return out


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    requests: int = 0

    def bad(self, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(what)
        self.outcomes["violation"] += 1


def _prompt(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def _params(rng: random.Random) -> dict[str, Any]:
    pick = rng.choice
    # mostly short (a CPU run must finish thousands), now and then long (KV pressure)
    p: dict[str, Any] = {"max_tokens": pick([1, 1, 2, 3, 4, 6, 8, 12, 16, rng.randint(1, 96)])}
    if rng.random() < 0.8:
        p["temperature"] = pick([0, 0.0001, 0.5, 1.0, 2.0])
    if rng.random() < 0.4:
        p["top_p"] = pick([1e-9, 0.1, 0.9, 1.0])
    if rng.random() < 0.4:
        p["top_k"] = pick([-1, 0, 1, 50, 2**31 - 1])
    if rng.random() < 0.3:
        p["min_p"] = pick([0.0, 0.5, 1.0])
    if rng.random() < 0.3:
        p["repetition_penalty"] = pick([1e-3, 0.5, 1.0, 2.0])
    if rng.random() < 0.3:
        p["presence_penalty"] = pick([-2.0, 0.0, 2.0])
        p["frequency_penalty"] = pick([-2.0, 0.0, 2.0])
    if rng.random() < 0.5:
        p["seed"] = pick([0, -(2**63), 2**63 - 33, rng.randint(0, 10**6)])
    if rng.random() < 0.2:
        p["stop"] = pick(["\n", [" the", "."], "zzz"])
    if rng.random() < 0.2:
        p["ignore_eos"] = True
    return p


class Soak:
    def __init__(self, url: str, args: argparse.Namespace, refs: dict[str, str]) -> None:
        self.url, self.args, self.refs = url, args, refs
        self.t = Tally()
        self.hostile = hostile_inputs()
        self.backoff = False

    async def run(self, seconds: float) -> Tally:
        import httpx

        limits = httpx.Limits(max_connections=self.args.concurrency * 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            self.c = c
            stop = time.monotonic() + seconds
            workers = [self._worker(i, stop) for i in range(self.args.concurrency)]
            await asyncio.gather(self._pressure(), *workers, self._bursts(stop))
        return self.t

    async def _pressure(self) -> None:
        """Long greedy requests at once, more KV than the budget: preemption, after which
        each must still equal the others (same prompt, greedy)."""
        body = {"prompt": "Pressure: " + " ".join(WORDS), "temperature": 0, "ignore_eos": True,
                "max_tokens": self.args.pressure_tokens}  # fmt: skip
        texts = await asyncio.gather(*(self._one("completions", dict(body), i % 2 == 1, None)
                                       for i in range(self.args.pressure)))  # fmt: skip
        done = [t for t in texts if t is not None]
        if len(set(done)) > 1:
            self.t.bad(f"greedy under KV pressure differs: {sorted(set(done))[:2]}")
        self.t.outcomes["pressure_checked"] += len(done)

    async def _worker(self, i: int, stop: float) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        while time.monotonic() < stop:
            if self.backoff:  # a well-behaved client honours Retry-After (shortened here)
                self.backoff = False
                await asyncio.sleep(0.05 + rng.random() * 0.1)
            r = rng.random()
            if r < 0.3:
                await self._hostile(rng)
            elif r < 0.42:
                await self._greedy(rng)
            else:
                await self._random(rng)

    async def _bursts(self, stop: float) -> None:
        """Every few seconds, 3 x max_waiting requests at once: past the queue cap."""
        rng = random.Random(self.args.seed + 7)
        while time.monotonic() + self.args.burst_every < stop:
            await asyncio.sleep(self.args.burst_every)
            body = {"prompt": _prompt(rng, 20), "max_tokens": 4, "temperature": 0}
            await asyncio.gather(
                *(self._one("completions", body, False, None, burst=True)
                  for _ in range(3 * self.args.max_waiting))  # fmt: skip
            )

    async def _hostile(self, rng: random.Random) -> None:
        path, body = rng.choice(self.hostile)
        self.t.requests += 1
        kw: dict[str, Any] = {"headers": {"content-type": "application/json"}}
        kw["content"] = body.encode() if isinstance(body, str) else body
        r = await self.c.post(f"{self.url}/v1/{path}", **kw)
        overloaded = r.status_code == 503 and b"server_overloaded" in r.content
        self.t.outcomes["hostile_503_overloaded" if overloaded else
                        f"hostile_{r.status_code // 100}xx"] += 1  # fmt: skip
        if overloaded:
            await asyncio.sleep(0.2)
        elif r.status_code >= 500:
            self.t.bad(f"hostile input got {r.status_code}: {body!r:.120} -> {r.text[:200]}")
        elif r.status_code == 200:  # n=32 with max_tokens 1 is legal: then it must be complete
            self._check_json(r.json(), 32 if '"n": 32' in str(body) else 1, "hostile")

    async def _greedy(self, rng: random.Random) -> None:
        prompt = rng.choice(list(self.refs))
        stream = rng.random() < 0.5
        body = {"prompt": prompt, "max_tokens": self.args.ref_tokens, "temperature": 0}
        text = await self._one("completions", body, stream, None)
        if text is not None and text != self.refs[prompt]:
            self.t.bad(f"greedy {prompt!r}: {text!r} != solo {self.refs[prompt]!r}")
        if text is not None:
            self.t.outcomes["greedy_checked"] += 1

    async def _random(self, rng: random.Random) -> None:
        body = _params(rng)
        body["n"] = rng.choice([1, 1, 1, 2, 3])
        chat = rng.random() < 0.4
        if chat:
            body["messages"] = [{"role": "user", "content": _prompt(rng, 40)}]
        elif rng.random() < 0.15:
            body["prompt"] = [_prompt(rng, 20) for _ in range(rng.randint(2, 3))]
        else:
            body["prompt"] = _prompt(rng, 60)
        stream = rng.random() < 0.5
        cancel_after = rng.randint(1, 6) if stream and rng.random() < 0.3 else None
        await self._one("chat/completions" if chat else "completions", body, stream, cancel_after)

    async def _one(self, path, body, stream, cancel_after, burst=False) -> str | None:
        """One request; checks its terminal response. Returns choice 0's text when complete."""
        self.t.requests += 1
        body = {"model": MODEL, **body}
        n = body.get("n", 1) * (len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1)
        tag = "burst" if burst else ("stream" if stream else "full")
        if not stream:
            r = await self.c.post(f"{self.url}/v1/{path}", json=body)
            if self._status(r, tag, body):
                return self._check_json(r.json(), n, tag)
            return None
        body["stream"] = True
        async with self.c.stream("POST", f"{self.url}/v1/{path}", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                self._status(r, tag, body)
                return None
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    cancel = cancel_after is not None and len(events) >= cancel_after
                    if cancel and events[-1] != "[DONE]":
                        self.t.outcomes["stream_cancelled"] += 1
                        return None  # leaving the block closes the connection
        return self._check_stream(events, n, path)

    def _status(self, r, tag: str, body: dict) -> bool:
        if r.status_code == 200:
            return True
        try:
            code = r.json().get("error", {}).get("code")
        except ValueError:
            code = None
        if r.status_code == 503 and code == "server_overloaded":
            self.t.outcomes["overloaded_503"] += 1
            self.backoff = True
        elif r.status_code == 400 and code == "context_length_exceeded":
            self.t.outcomes["too_long_400"] += 1
        else:
            self.t.bad(f"{tag} got {r.status_code}: {r.text[:200]} for {json.dumps(body)[:200]}")
        return False

    def _check_json(self, obj: dict, n: int, tag: str) -> str | None:
        choices = obj.get("choices", [])
        idx = sorted(c["index"] for c in choices)
        if idx != list(range(n)) or any(c.get("finish_reason") not in ("stop", "length")
                                         for c in choices):  # fmt: skip
            self.t.bad(f"{tag}: incomplete response {json.dumps(obj)[:300]}")
            return None
        self.t.outcomes["ok_full"] += 1
        c0 = next(c for c in choices if c["index"] == 0)
        return c0.get("text", (c0.get("message") or {}).get("content"))

    def _check_stream(self, events: list[str], n: int, path: str) -> str | None:
        if not events or events[-1] != "[DONE]":
            self.t.bad(f"stream without [DONE]: {events[-2:]}")
            return None
        finishes: Counter = Counter()
        text = ""
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj:
                self.t.bad(f"stream error chunk: {e[:200]}")
                return None
            for c in obj.get("choices", []):
                if c.get("finish_reason") is not None:
                    finishes[c["index"]] += 1
                if c["index"] == 0:
                    text += c.get("text") or (c.get("delta") or {}).get("content") or ""
        if sorted(finishes) != list(range(n)) or any(v != 1 for v in finishes.values()):
            self.t.bad(f"stream terminal chunks per choice {dict(finishes)} for n={n}")
            return None
        self.t.outcomes["ok_stream"] += 1
        return text


# ----------------------------------------------------------------------------- driver


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _pinned_pages(stats: dict) -> int:
    """Pages held by requests: in use minus what only the prefix cache / parked slots hold."""
    kv = stats["kv"]
    return kv["pages_in_use"] - kv.get("pages_evictable", 0)


def _wait_idle(engine: Any, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if not s.get("running") and not s.get("waiting") and not s.get("swapped"):
            time.sleep(0.3)  # let the idle loop refresh the KV snapshot
            return engine.stats()
        time.sleep(0.05)
    raise RuntimeError(f"engine not idle after {timeout} s: {engine.stats()}")


async def _drain_check(url: str, server: Any, drain_s: float) -> dict:
    """A long stream in flight, then shutdown: it must end with an error chunk, in time."""
    import httpx

    body = {"model": MODEL, "prompt": "Tell a very long story.", "max_tokens": 10_000,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    body["max_tokens"] = None
    events: list[str] = []
    async with httpx.AsyncClient(timeout=120) as c, c.stream(
        "POST", f"{url}/v1/completions", json=body
    ) as r:
        t0 = None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 3 and t0 is None:
                t0 = time.monotonic()
                server.should_exit = True  # what uvicorn's SIGTERM handler does
    took = time.monotonic() - (t0 or time.monotonic())
    last_err = json.loads(events[-2]).get("error", {}) if len(events) >= 2 else {}
    return {"stream_ended_s": round(took, 2), "done_last": events[-1:] == ["[DONE]"],
            "error_code": last_err.get("code"), "ok": events[-1:] == ["[DONE]"]
            and last_err.get("code") == "server_shutting_down" and took < drain_s + 5}  # fmt: skip


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    """The served model: `--model`, or with `--layers N` the embedded model's shapes cut to N
    layers with dummy weights and its real tokenizer (much faster on a CPU: more requests in
    the same minutes; greedy runs are still deterministic, so greedy == solo still holds)."""
    if args.layers is None:
        return {"model": args.model}
    from vtensor.model import default_model_path

    return {"model": "smollm2-135m", "load_format": "dummy", "tokenizer": default_model_path(),
            "config_overrides": {"num_layers": args.layers}}  # fmt: skip


def run_soak(args: argparse.Namespace) -> dict:
    import httpx
    import uvicorn

    from vtensor.engine import AsyncLLM, EngineArgs
    from vtensor.server.api import build_app
    from vtensor.server.lifecycle import DrainingServer, Lifecycle

    t_start = time.monotonic()
    engine = AsyncLLM(EngineArgs(
        device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, kv_memory=args.kv_memory, page_size=args.page_size,
        **_model_args(args),
    ))  # fmt: skip
    life = Lifecycle()
    app = build_app(engine, MODEL, max_waiting=args.max_waiting, lifecycle=life)
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = DrainingServer(uvicorn.Config(app, log_level="error", lifespan="off"), life,
                            args.drain_timeout)  # fmt: skip
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)  # fmt: skip
    thread.start()
    while not server.started:
        time.sleep(0.01)
    report: dict[str, Any] = {"kv_token_capacity": engine.kv_token_capacity}
    try:
        # Greedy references, each run alone (sequentially) before the load.
        rng = random.Random(args.seed)
        prompts = [f"Fact {i}: " + _prompt(rng, 12) for i in range(args.refs)]
        refs = {}
        for p in prompts:
            body = {"model": MODEL, "prompt": p, "max_tokens": args.ref_tokens, "temperature": 0}
            refs[p] = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()[
                "choices"][0]["text"]  # fmt: skip
        base = _pinned_pages(_wait_idle(engine))
        t0 = time.monotonic()
        tally = asyncio.run(Soak(url, args, refs).run(args.minutes * 60))
        report["load_s"] = round(time.monotonic() - t0, 1)
        stats = _wait_idle(engine)
        report["requests"] = tally.requests
        report["outcomes"] = dict(tally.outcomes)
        report["violations"] = tally.violations
        report["preemptions"] = stats.get("num_preemptions", 0)
        report["generation_tokens"] = stats.get("generation_tokens", 0)
        report["engine_alive"] = engine.dead is None and httpx.get(
            f"{url}/health").status_code == 200  # fmt: skip
        try:
            engine.engine.kv_cache.check_integrity()
            report["kv_integrity"] = True
        except Exception as e:  # reported, not raised: the figures still come out
            report["kv_integrity"] = f"{type(e).__name__}: {e}"
        report["pinned_pages"] = {"baseline": base, "after": _pinned_pages(stats)}
        metrics = httpx.get(f"{url}/metrics").text
        report["waiting_after"] = next(
            (float(x.split()[-1]) for x in metrics.splitlines()
             if x.startswith("vtensor:num_requests_waiting_first_token ")), None)  # fmt: skip
        report["drain"] = asyncio.run(_drain_check(url, server, args.drain_timeout))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
    report["total_s"] = round(time.monotonic() - t_start, 1)
    report["ok"] = (
        not report["violations"] and report["engine_alive"] and report["kv_integrity"] is True
        and report["pinned_pages"]["after"] == report["pinned_pages"]["baseline"]
        and report["waiting_after"] == 0 and report["drain"]["ok"]
        and (report["preemptions"] > 0 or not args.require_preemption)
    )  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("--minutes", type=float, default=2.0, help="length of the load phase (2)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--layers", type=int, default=None,
                   help="serve the embedded model's shapes with N layers and dummy weights")
    p.add_argument("--page-size", type=int, default=None,
                   help="KV page bytes (host default): small pages make a small model preempt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--max-model-len", type=int, default=256, help="tokens (256)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine batch (16)")
    p.add_argument("--kv-memory", default="12MiB",
                   help="KV budget, small to force preemption (12MiB: 6 host pages of 2 MiB)")
    p.add_argument("--max-waiting", type=int, default=24, help="queue cap for the bursts (24)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--burst-every", type=float, default=15.0, help="seconds between bursts")
    p.add_argument("--pressure", type=int, default=4, help="long greedy requests at start (4)")
    p.add_argument("--pressure-tokens", type=int, default=120, help="their max_tokens (120)")
    p.add_argument("--refs", type=int, default=6, help="greedy prompts checked against solo")
    p.add_argument("--ref-tokens", type=int, default=12, help="tokens per greedy check")
    p.add_argument("--drain-timeout", type=float, default=2.0, help="shutdown drain (s)")
    p.add_argument("--require-preemption", action="store_true",
                   help="fail unless the KV budget forced at least one preemption")
    p.add_argument("--seed", type=int, default=0, help="load generator seed")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    report = run_soak(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
