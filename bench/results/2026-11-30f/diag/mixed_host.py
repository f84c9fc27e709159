"""Host cost of a mixed step (a new request's prompt + running decodes) in the engine, as
`vtensor serve` runs them: 16 requests decoding, then one new request at a time. Per step: wall
time with the GPU drained before and after, the engine's host phases, and a cProfile of the
mixed steps (top functions by own time). The online multi-turn run (2026-11-30f call 3)
showed ~36 ms of host `forward` per mixed step against ~0.5 ms per graphed decode step.
    PYTHONPATH=. python3 bench/results/2026-11-30f/diag/mixed_host.py --out F.json
"""

import argparse
import cProfile
import io
import json
import pstats
import random
import time

import torch

from vtensor.bench.vs_vllm import spec_for
from vtensor.engine import LLMEngine, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--mixed-graph-tokens", type=int, default=0,
                   help="replay prefill steps of <= N tokens from CUDA graphs (0: eager)")
    a = p.parse_args()
    spec = spec_for(a.model)
    eng = LLMEngine(model=spec.model, load_format=spec.load_format, dtype=spec.dtype,
                    max_model_len=8192 if a.model != "tiny" else 4096,
                    mixed_graph_tokens=a.mixed_graph_tokens)  # fmt: skip
    rng = random.Random(0)
    vocab = eng.model_config.vocab_size
    par = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    def prompt(n):
        return [rng.randrange(vocab // 4, vocab) for _ in range(n)]

    for i in range(16):
        eng.add_request(f"bg{i}", prompt(512), par)
    for _ in range(8):
        eng.step()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mixed = eng.runner.mixed
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": [],
           "mixed_graph_tokens": a.mixed_graph_tokens,
           "graphs": len(mixed.graphs) if mixed else 0,
           "capture_s": mixed.capture_s if mixed else 0.0,
           "reserved_gib": torch.cuda.memory_reserved() / 2**30 if cuda else 0.0}
    prof = cProfile.Profile()
    for k, new in enumerate([150] * 12 + [1000] * 6 + [4000] * 3):
        sync()
        tm0 = dict(eng.timing)
        eng.add_request(f"new{k}", prompt(new), SamplingParams(max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        if k >= 2:  # the first two compile / warm the shapes
            prof.enable()
        eng.step()
        prof.disable()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        row = {"new_tokens": new, "host_ms": 1e3 * (t1 - t0), "drained_ms": 1e3 * (t2 - t0),
               **{k2[:-2] + "_ms": round(1e3 * (v - tm0[k2]), 3) for k2, v in eng.timing.items()}}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        for _ in range(3):  # back to decode-only steps
            eng.step()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(40)
    st.sort_stats("cumulative").print_stats(50)
    res["cprofile"] = s.getvalue()
    print(res["cprofile"], flush=True)
    res["static_steps"] = mixed.steps if mixed else 0
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    eng.close()


if __name__ == "__main__":
    main()
