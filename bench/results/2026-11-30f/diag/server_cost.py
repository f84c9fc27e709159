"""Host cost of the HTTP side per streamed token: the real app (build_app) over a stand-in
engine that hands out ready-made outputs (one token each, nothing computed), driven in-process
through httpx's ASGI transport by C concurrent streaming completions of N tokens. CPU seconds
of this process per token chunk = what the server's interpreter spends on one token of one
stream (SSE building, fan-out, queues), plus the stand-in's and the client's small share.
    PYTHONPATH=. python3 bench/results/2026-11-30f/diag/server_cost.py [--streams 64 --tokens 256]
"""

import argparse
import asyncio
import json
import time

import httpx

from vtensor.engine.outputs import CompletionOutput, RequestOutput
from vtensor.server.api import build_app


class StandIn:
    """EngineClient members the app reads; generate yields one token per turn of the loop."""

    max_model_len = 4096
    vocab_size = 32000
    kv_token_capacity = 4096
    dead = None

    def __init__(self) -> None:
        from vtensor.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(None)  # the embedded model's (the app requires one)

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "kv": {}, "ttft": [], "tpot": []}

    async def abort(self, request_id: str) -> None:
        pass

    async def generate(self, prompt, params, request_id):
        ids: list[int] = []
        text = ""
        n = params.max_tokens
        for i in range(n):
            tok, piece = 1000 + i % 50, f" w{i % 50}"
            ids.append(tok)
            text += piece
            fin = i == n - 1
            comp = CompletionOutput(0, text, list(ids), [tok], piece,
                                    finish_reason="length" if fin else None)  # fmt: skip
            yield RequestOutput(request_id, None, list(prompt), [comp], fin,
                                metrics={"arrival": 0.0, "first_token": 0.0,
                                         "finish": 0.0 if fin else None})  # fmt: skip
            await asyncio.sleep(0)


async def run(streams: int, tokens: int) -> dict:
    app = build_app(StandIn(), "m")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x", timeout=600) as c:
        body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": tokens, "stream": True,
                "return_token_ids": True}  # fmt: skip

        async def one() -> int:
            r = await c.post("/v1/completions", json=body)
            return r.text.count("data: ")

        await one()  # warm
        t0, c0 = time.perf_counter(), time.process_time()
        chunks = await asyncio.gather(*(one() for _ in range(streams)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(chunks)
    return {"streams": streams, "tokens": tokens, "chunks": n, "wall_s": wall, "cpu_s": cpu,
            "cpu_us_per_chunk": 1e6 * cpu / n, "chunks_per_cpu_s": n / cpu}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = asyncio.run(run(a.streams, a.tokens))
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
