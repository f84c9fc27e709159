"""CPU cost per streamed chunk of the online bench's HTTP clients (httpx vs aiohttp), on CPU.

A toy SSE server (uvicorn + starlette, one chunk per 10 ms per stream, vLLM-like chunk JSON)
in a subprocess; the client opens N concurrent streams of 300 chunks, parses every chunk as
the bench does, and reports its own CPU seconds per chunk (time.process_time).
    PYTHONPATH=. python3 bench/results/2026-11-30h/diag/client_cost.py --out F.json
"""

import argparse
import asyncio
import json
import subprocess
import sys
import textwrap
import time

import aiohttp
import httpx

SERVER = textwrap.dedent('''
    import asyncio, json
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    async def comp(request):
        body = await request.json()
        async def gen():
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(0.01)
                d = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "text": "", "token_ids": [1234],
                                  "logprobs": None, "finish_reason": None}]}
                yield "data: " + json.dumps(d) + "\\n\\n"
            yield "data: [DONE]\\n\\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    app = Starlette(routes=[Route("/v1/completions", comp, methods=["POST"])])
''')
URL = "http://127.0.0.1:8123"
BODY = {"max_tokens": 300}


async def one_httpx(c: httpx.AsyncClient) -> int:
    n = 0
    async with c.stream("POST", "/v1/completions", json=BODY) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                d = line[5:].strip()
                if d == "[DONE]":
                    break
                json.loads(d)
                n += 1
    return n


async def one_aiohttp(s: aiohttp.ClientSession) -> int:
    n = 0
    async with s.post("/v1/completions", json=BODY) as r:
        async for line in r.content:
            if line.startswith(b"data:"):
                d = line[5:].strip()
                if d == b"[DONE]":
                    break
                json.loads(d)
                n += 1
    return n


async def measure(client: str, streams: int) -> dict:
    t, p = time.perf_counter(), time.process_time()
    if client == "httpx":
        lim = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=URL, limits=lim, timeout=None) as c:
            ns = await asyncio.gather(*(one_httpx(c) for _ in range(streams)))
    else:
        async with aiohttp.ClientSession(URL, connector=aiohttp.TCPConnector(limit=0)) as s:
            ns = await asyncio.gather(*(one_aiohttp(s) for _ in range(streams)))
    wall, cpu = time.perf_counter() - t, time.process_time() - p
    return {"client": client, "streams": streams, "chunks": sum(ns),
            "chunks_per_s": round(sum(ns) / wall), "client_cpu_s": round(cpu, 3),
            "us_per_chunk": round(1e6 * cpu / sum(ns), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open("/tmp/_sse_server.py", "w") as f:
        f.write(SERVER)
    srv = subprocess.Popen([sys.executable, "-m", "uvicorn", "_sse_server:app", "--port", "8123",
                            "--log-level", "warning", "--app-dir", "/tmp"])
    try:
        time.sleep(3)
        rows = [asyncio.run(measure(c, n)) for c in ("httpx", "aiohttp") for n in (64, 200)]
    finally:
        srv.terminate()
        srv.wait()
    for r in rows:
        print(r)
    with open(a.out, "w") as f:
        json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
