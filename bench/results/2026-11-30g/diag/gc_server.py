"""Cyclic-GC pauses in the server process (`vtensor serve` with the engine in its own
process), streaming: the app runs in-process behind httpx's ASGI transport, the engine
(embedded SmolLM2, CPU) in its process; gc.callbacks time every collection of the server's
interpreter while `--requests` streams run, with the startup heap frozen or not.
    PYTHONPATH=. python3 bench/results/2026-11-30g/diag/gc_server.py --out F.json
"""

import argparse
import asyncio
import gc
import json
import time

import httpx

from vtensor.engine import EngineArgs, MPAsyncLLM
from vtensor.server.api import build_app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    eng = MPAsyncLLM(EngineArgs(max_num_seqs=64))
    app = build_app(eng, "m")
    res = {"tracked_objects": len(gc.get_objects()), "runs": {}}
    try:
        for frozen in (False, True):
            if frozen:
                gc.collect()
                gc.freeze()
            res["runs"]["frozen" if frozen else "not_frozen"] = asyncio.run(
                _load(app, a.requests, a.tokens))
            gc.unfreeze()
            print(json.dumps(res["runs"]), flush=True)
    finally:
        eng.shutdown()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


async def _load(app, n: int, tokens: int) -> dict:
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    t0 = [0.0]

    def cb(phase: str, info: dict) -> None:
        if phase == "start":
            t0[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(1e3 * (time.perf_counter() - t0[0]))

    gc.collect()
    gc.callbacks.append(cb)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x", timeout=600) as c:

        async def one(i: int) -> int:
            body = {"model": "m", "prompt": f"Story {i}: once upon a time", "max_tokens": tokens,
                    "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
            chunks = 0
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: ")
            return chunks

        t = time.perf_counter()
        chunks = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t
    gc.callbacks.remove(cb)
    return {"wall_s": round(wall, 2), "chunks": sum(chunks),
            **{f"gen{g}_collections": len(v) for g, v in pauses.items()},
            **{f"gen{g}_ms_total": round(sum(v), 1) for g, v in pauses.items()},
            **{f"gen{g}_ms_max": round(max(v, default=0.0), 1) for g, v in pauses.items()}}


if __name__ == "__main__":
    main()
