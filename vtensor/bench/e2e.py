"""End-to-end benchmarks: workloads x systems, offline and online, one model per invocation.

    python -m vtensor.bench.e2e --model llama-3-8b --out bench/results/x/      # full sizes
    python -m vtensor.bench.e2e --quick --out /tmp/e2e                          # toy, CPU ok

Offline: every workload through each system (`--systems virtual,paged,hf`). Multi-turn runs
turn by turn over all conversations at once: turn t+1's prompt is turn t's prompt + the reply
the system generated + the next user message. Each system runs in its own subprocess (clean
device memory, a hard time cap) unless `--inprocess`; a worker writes its JSON after every
workload, so a cap that cuts a run short keeps what finished (marked `complete: false`).

Online (`--online multi_turn,sharegpt`): a `vtensor serve --kv X` subprocess per KV mode and a
Poisson client (online.py), TTFT / TPOT / E2E percentiles and goodput.

HF `generate` runs only on workloads small enough for it (`--hf-max-requests`,
`--hf-max-context`); a workload key `name:N` is workload `name` cut to its first N requests
(or conversations), so "sharegpt:64" gives a set every system, HF included, runs.

Writes `<out>/e2e_<model>.json` (raw results + ratios) and one PNG per workload.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vtensor.bench import workloads as W
from vtensor.bench.memory import MemorySampler
from vtensor.bench.report import compute_ratios, markdown_table, summary_rows
from vtensor.bench.systems import (
    EngineSystem,
    HFSystem,
    ModelSpec,
    model_limit,
    resolve_model,
    servable,
)

# most telling first: a stage that hits its time cap loses the tail of this list
FULL_WORKLOADS = "multi_turn,long_context,shared_prefix,sharegpt,multi_turn:8,sharegpt:32"
QUICK_WORKLOADS = "multi_turn,shared_prefix,long_context,sharegpt"
FULL_ONLINE = "multi_turn:32,sharegpt:128"
QUICK_ONLINE = "sharegpt"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- workloads ------------------------------------------------------------------------------


def build_workload(key: str, size: str, seed: int, token_range: tuple[int, int]) -> W.Workload:
    name, _, cut = key.partition(":")
    wl = W.make(name, size, seed=seed, token_range=token_range)
    if cut:
        wl = W.truncate(wl, int(cut))
        wl.name = key
    return wl


def token_range_for(vocab_size: int | None) -> tuple[int, int]:
    """Ids clear of the special tokens at both ends of the vocabulary."""
    if not vocab_size:
        return W.DEFAULT_TOKEN_RANGE
    margin = min(1000, vocab_size // 10)
    return margin, min(W.DEFAULT_TOKEN_RANGE[1], vocab_size - margin)


# --- offline runner -------------------------------------------------------------------------


def _digest(seqs: list[list[int]]) -> str:
    h = hashlib.sha1()
    for s in seqs:
        h.update(json.dumps(s).encode())
    return h.hexdigest()[:16]


def run_offline(system, wl: W.Workload, *, deadline: float | None = None,
                sample_interval: float = 0.05) -> dict:  # fmt: skip
    """Run `wl` to completion on `system` (EngineSystem | HFSystem); JSON-able record."""
    prompt_tokens = output_tokens = cached = 0
    outputs: list[list[int]] = []
    first: list[float] = []
    turn_s: list[float] = []
    complete = True
    with MemorySampler(sample_interval, system.kv_probe) as mem:
        t0 = time.perf_counter()
        if wl.multi_turn:
            convs = wl.conversations
            history: list[list[int]] = [[] for _ in convs]
            for t in range(max(len(c.user_turns) for c in convs)):
                live = [i for i, c in enumerate(convs) if t < len(c.user_turns)]
                prompts = [history[i] + convs[i].user_turns[t] for i in live]
                ts = time.perf_counter()
                res = system.generate(prompts, [convs[i].reply_lens[t] for i in live], deadline)
                turn_s.append(time.perf_counter() - ts)
                for j, i in enumerate(live):
                    history[i] = prompts[j] + res.output_token_ids[j]
                prompt_tokens += sum(map(len, prompts))
                output_tokens += sum(map(len, res.output_token_ids))
                cached += sum(res.num_cached_tokens)
                outputs += res.output_token_ids
                first += [f for f in res.first_token_s if f is not None]
                if not res.complete:
                    complete = False
                    break
        else:
            prompts = [r.prompt_token_ids for r in wl.requests]
            res = system.generate(prompts, [r.max_tokens for r in wl.requests], deadline)
            prompt_tokens = sum(map(len, prompts))
            output_tokens = sum(map(len, res.output_token_ids))
            cached = sum(res.num_cached_tokens)
            outputs = res.output_token_ids
            first = [f for f in res.first_token_s if f is not None]
            complete = res.complete
        elapsed = time.perf_counter() - t0
    expected = wl.stats()["max_output_tokens"]
    return {
        "system": system.name,
        "complete": complete and output_tokens == expected,
        "elapsed_s": elapsed,
        "load_s": getattr(system, "load_s", None),
        "num_requests": len(outputs),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "output_tokens": output_tokens,
        "expected_output_tokens": expected,
        "output_tokens_per_s": output_tokens / elapsed if elapsed > 0 else None,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed if elapsed > 0 else None,
        "requests_per_s": len(outputs) / elapsed if elapsed > 0 else None,
        "turn_s": turn_s,
        "first_token_s_p50": sorted(first)[len(first) // 2] if first else None,
        "output_digest": _digest(outputs),
        "memory": mem.summary(),
        "memory_series": mem.to_json(),
        "kv_final": _jsonable(system.kv_snapshot()),
    }


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


# --- one system over all its workloads (a worker) ------------------------------------------


def make_system(system: str, spec: ModelSpec, args, max_model_len: int):
    if system == "hf":
        return HFSystem(spec, batch_size=args.hf_batch, weights=args.hf_weights)
    return EngineSystem(
        spec,
        system,
        max_model_len=max_model_len,
        share=args.inprocess,
        kv_memory=args.kv_memory,
        max_num_seqs=args.max_num_seqs,
        device=args.device,
    )


def run_system(system: str, spec: ModelSpec, wls: list[W.Workload], args, deadline: float,
               out_path: str | None = None) -> dict:  # fmt: skip
    """Load `system` once, run each workload; write `out_path` after each one."""
    res: dict = {"system": system, "workloads": {}, "notes": [], "hardware": hardware()}
    limit = model_limit(spec)
    if limit and spec.load_format != "dummy":  # real weights: the model's context is the limit
        for w in wls:
            if w.max_context() > limit:
                res["notes"].append(f"{system}: skipped {w.name}: needs {w.max_context()} "
                                    f"tokens of context, the model has {limit}")  # fmt: skip
        wls = [w for w in wls if w.max_context() <= limit]
        if not wls:
            return res
    max_len = max(w.max_context() for w in wls)
    log(f"{spec.name} / {system}: loading (max_model_len {max_len})")
    try:
        sysobj = make_system(system, spec, args, max_len)
    except Exception as e:  # e.g. a package missing on this machine: say so, run the rest
        res["notes"].append(f"{system}: could not load {spec.name}: {type(e).__name__}: {e}")
        log(res["notes"][-1])
        if out_path:
            _write_json(out_path, res)
        return res
    res["load_s"] = sysobj.load_s
    res["ignored_engine_args"] = getattr(sysobj, "ignored_args", [])
    try:
        for wl in wls:
            if time.time() > deadline:
                res["notes"].append(f"{system}: skipped {wl.name} (time cap)")
                log(res["notes"][-1])
                continue
            log(f"{spec.name} / {system}: {wl.name} {wl.stats()}")
            # the engine's deadline is on perf_counter; convert from wall time
            dl = time.perf_counter() + (deadline - time.time())
            try:
                r = run_offline(sysobj, wl, deadline=dl, sample_interval=args.sample_interval)
            except Exception as e:  # one workload failing must not lose the others
                r = {"system": system, "error": f"{type(e).__name__}: {e}"}
            res["workloads"][wl.name] = r
            log(
                f"{spec.name} / {system}: {wl.name} done: "
                + (r.get("error") or f"{r['output_tokens_per_s']:.1f} out tok/s, "
                   f"{r['elapsed_s']:.1f} s, complete={r['complete']}")
            )  # fmt: skip
            if out_path:
                _write_json(out_path, res)
    finally:
        sysobj.close()
    return res


def run_workloads(system, wls: list[W.Workload], res: dict, out_path: str | os.PathLike, *,
                  reset: Callable[[], object], log: Callable[[str], None], label: str,
                  sample_interval: float = 0.1) -> dict:  # fmt: skip
    """A worker's loop (vtensor's and vLLM's alike): warm up, then each workload after
    `reset()` (the prefix cache), its record in res["workloads"]; `out_path` is rewritten after
    each, so a worker killed at its cap keeps the workloads it finished."""
    system.generate([W.warmup_prompt(wls)], [4])
    _write_json(out_path, res)
    for wl in wls:
        reset()
        log(f"{wl.name}: {wl.stats()}")
        try:
            r = run_offline(system, wl, sample_interval=sample_interval)
        except Exception as e:  # one workload failing must not lose the others
            r = {"system": label, "error": f"{type(e).__name__}: {str(e)[-500:]}"}
        res["workloads"][wl.name] = r
        log(f"{wl.name} done: " + (r.get("error") or f"{r['output_tokens_per_s']:.1f} out tok/s, "
            f"{r['elapsed_s']:.1f} s, peak "
            f"{(r['memory'].get('device_used_peak') or 0) / 2**30:.1f} GiB"))  # fmt: skip
        _write_json(out_path, res)
    return res


def _write_json(path: str | os.PathLike, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# --- orchestration --------------------------------------------------------------------------


def hardware() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                "torch": torch.__version__, "cuda": torch.version.cuda}  # fmt: skip
    return {"device": f"CPU ({platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores)", "torch": torch.__version__}  # fmt: skip


def hf_fits(wl: W.Workload, args) -> bool:
    st = wl.stats()
    n = st.get("num_conversations", st["num_requests"])
    return n <= args.hf_max_requests and st["max_context"] <= args.hf_max_context


def _worker_cmd(args, system: str, keys: list[str], out_path: str, deadline: float,
                trange: tuple[int, int]) -> list[str]:  # fmt: skip
    cmd = [sys.executable, "-m", "vtensor.bench.e2e", "--worker", system,
           "--worker-out", out_path, "--worker-deadline", f"{deadline:.1f}",
           "--workloads", ",".join(keys), "--token-range", f"{trange[0]},{trange[1]}"]  # fmt: skip
    for flag in ("model", "load_format", "dtype", "device", "kv_memory", "max_num_seqs",
                 "hf_batch", "hf_weights", "seed", "sample_interval", "threads"):  # fmt: skip
        v = getattr(args, flag)
        if v is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(v)]
    return cmd + ["--size", args.size]


def _run_vllm_offline(spec, wls, deadline, work_dir, args) -> dict:
    """vLLM always runs in a process of its own (vllm_system.py), whatever --inprocess says."""
    from vtensor.bench.vllm_system import run_offline_subprocess, vllm_unavailable

    why = vllm_unavailable()
    if why is None and spec.load_format == "dummy" and spec.model and not os.path.isdir(
        spec.model
    ):
        spec = servable(spec, max(w.max_context() for w in wls))  # a folder with a config.json
    if why is None and not (spec.model and os.path.isdir(spec.model)):
        why = f"vllm: skipped, {spec.name} is not an HF folder or a dummy preset"
    if why:
        return {"system": "vllm", "workloads": {}, "notes": [why]}
    return run_offline_subprocess(
        spec.model, wls, max_model_len=max(w.max_context() for w in wls),
        out_path=str(Path(work_dir) / "vllm.json"), timeout=deadline - time.time() + 20,
        dtype=spec.dtype, load_format=spec.load_format, sample_interval=args.sample_interval,
    )  # fmt: skip


def _run_offline_phase(system, spec, wls, args, deadline, work_dir, results) -> None:
    trange = tuple(results["token_range"])
    keys = [w.name for w in wls]
    if system == "vllm":
        r = _run_vllm_offline(spec, wls, deadline, work_dir, args)
    elif args.inprocess:
        try:
            r = run_system(system, spec, wls, args, deadline)
        except Exception as e:
            r = {"system": system, "workloads": {}, "notes": [f"{system} failed: {e!r}"]}
    else:
        out_path = str(Path(work_dir) / f"{system}.json")
        if os.path.exists(out_path):
            os.remove(out_path)
        cmd = _worker_cmd(args, system, keys, out_path, deadline, trange)
        timeout = max(10.0, deadline - time.time() + args.grace)
        note = None
        try:
            rc = subprocess.run(cmd, timeout=timeout).returncode
            if rc != 0:
                note = f"{system} worker exited with {rc}"
        except subprocess.TimeoutExpired:
            note = f"{system} worker killed at its time cap ({timeout:.0f} s)"
        r = {"system": system, "workloads": {}, "notes": []}
        if os.path.exists(out_path):
            with open(out_path) as f:
                r = json.load(f)
        if note:
            r["notes"].append(note)
    for n in r.get("notes", []):
        results["notes"].append(n)
        log(n)
    for key, rec in r.get("workloads", {}).items():
        results["workloads"][key]["offline"][system] = rec


def serve_args(spec: ModelSpec, system: str, max_model_len: int, args) -> list[str]:
    a = ["--kv", system, "--max-model-len", str(max_model_len), "--served-model-name", "bench",
         "--log-level", "warning", "--dtype", spec.dtype, "--device", args.device]  # fmt: skip
    if spec.model is not None:
        a += ["--model", spec.model]
    if spec.load_format != "auto":
        a += ["--load-format", spec.load_format]
    if args.kv_memory is not None:
        a += ["--kv-memory", str(args.kv_memory)]
    if args.max_num_seqs is not None:
        a += ["--max-num-seqs", str(args.max_num_seqs)]
    return a + list(args.serve_extra)


def _run_online_phase(system, spec, wls, args, deadline, work_dir, results) -> None:
    import importlib.util

    import httpx

    from vtensor.bench.online import (
        ServerProcess,
        VLLMServer,
        engine_step_stats,
        run_online,
        summarize_trace,
    )
    from vtensor.bench.vllm_system import ONLINE_EXTRA_BODY, parse_backend, vllm_unavailable
    from vtensor.engine.step_trace import ENV as TRACE_ENV

    if system == "vllm":
        why = vllm_unavailable()
        if why is None and spec.load_format not in ("dummy", "auto"):
            why = f"vllm: skipped, load format {spec.load_format}"
        if why is None and spec.model is None:
            why = "vllm: skipped, the embedded GGUF model (vLLM needs an HF folder or a preset)"
        if why:
            results["notes"].append(f"online {why}")
            log(results["notes"][-1])
            return
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing and system != "vllm":  # vLLM brings its own, in its own site
        results["notes"].append(f"online {system}: not run, `vtensor serve` needs {missing}")
        log(results["notes"][-1])
        return

    max_len = max(w.max_context() for w in wls)
    spec = servable(spec, max_len)  # dummy presets: a folder with a tokenizer the server needs
    limit = model_limit(spec)
    if limit and max_len > limit:  # the server has no config overrides: drop what cannot fit
        for w in [w for w in wls if w.max_context() > limit]:
            results["notes"].append(f"online {system}: skipped {w.name} (context > {limit})")
        wls = [w for w in wls if w.max_context() <= limit]
        if not wls:
            return
        max_len = max(w.max_context() for w in wls)
    log_path = str(Path(work_dir) / f"serve_{system}.log")
    startup = max(30.0, deadline - time.time())
    # both servers stream the reply's ids (return_token_ids): the client resends each
    # system's exact history, with no re-tokenizing on either side
    extra = ONLINE_EXTRA_BODY
    if system == "vllm":
        server = VLLMServer(spec.model, max_model_len=max_len, dtype=spec.dtype,
                            load_format=spec.load_format, startup_timeout=startup,
                            log_path=log_path)  # fmt: skip
    else:  # with its step trace: what a latency tail lines up with (step_trace.py)
        trace = str(Path(work_dir) / f"trace_{system}.jsonl")
        server = ServerProcess(serve_args(spec, system, max_len, args), log_path=log_path,
                               startup_timeout=startup, env={TRACE_ENV: trace})  # fmt: skip
    try:
        t_start = time.time()
        with server as srv:
            startup_s = time.time() - t_start
            for wl in wls:
                if time.time() > deadline:
                    results["notes"].append(f"online {system}: skipped {wl.name} (time cap)")
                    continue
                rate = args.rate_conv if wl.multi_turn else args.rate
                log(f"{spec.name} / online {system}: {wl.name} at {rate}/s")
                dl = time.perf_counter() + (deadline - time.time())
                rec = run_online(srv.base_url, "bench", wl, rate=rate, seed=args.seed,
                                 slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                                 deadline=dl, rss_pid=srv.proc.pid,
                                 extra_body=extra)  # fmt: skip
                rec["system"] = system
                if system != "vllm":  # where the server's engine spent its steps
                    rec["engine"] = engine_step_stats(httpx.get(srv.base_url + "/metrics").text)
                    time.sleep(0.6)  # the trace's last lines reach its file (<= 0.5 s behind)
                    rec["trace"] = summarize_trace(trace, *rec["t_monotonic"])
                rec["server_startup_s"] = round(startup_s, 1)
                if system == "vllm":
                    text = Path(log_path).read_text(errors="replace")
                    rec["vllm"] = {"serve_cmd": server.command()[1:], **parse_backend(text)}
                results["workloads"][wl.name]["online"][system] = rec
                log(f"online {system}: {wl.name}: {rec['num_ok']}/{rec['num_requests']} ok, "
                    f"TTFT p50 {rec['ttft_ms'].get('p50', float('nan')):.1f} ms")  # fmt: skip
    except Exception as e:
        msg = f"online {system} failed: {type(e).__name__}: {str(e)[-600:]}"
        results["notes"].append(msg)
        log(msg)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vtensor bench e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="embedded",
                   help="'embedded' (default model), a dummy preset (llama-3-8b, qwen2.5-7b) "
                        "or a path")  # fmt: skip
    p.add_argument("--load-format", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--workloads", default=None, help=f"default: {FULL_WORKLOADS}")
    p.add_argument(
        "--online",
        default=None,
        help=f"workloads to run online ('' for none); default {FULL_ONLINE}",
    )
    p.add_argument("--systems", default="virtual,paged,hf",
                   help="offline systems: virtual, paged, hf, vllm (vLLM in its own process; "
                        "skipped with a note where it is not installed)")  # fmt: skip
    p.add_argument("--online-systems", default="virtual,paged", help="also: vllm")
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU): --size quick")
    p.add_argument("--size", default=None, choices=sorted(W.SIZES),
                   help="workload sizes (default full; --quick: quick)")  # fmt: skip
    p.add_argument("--out", default="bench/results/e2e")
    p.add_argument("--time-cap", type=float, default=600.0, help="seconds for this invocation")
    p.add_argument("--grace", type=float, default=60.0, help="worker hard-kill margin, s")
    p.add_argument("--inprocess", action="store_true", help="no worker subprocesses")
    p.add_argument("--kv-memory", default=None, help="KV budget passed to both KV modes")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--serve-extra", type=shlex.split, default=[],
                   help="more `vtensor serve` arguments (online phase), one string")  # fmt: skip
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--hf-weights", default="real", choices=["real", "random"],
                   help="HF baseline weights (random: same shapes, faster to load)")  # fmt: skip
    p.add_argument("--hf-max-requests", type=int, default=32,
                   help="HF runs workloads of <= this many requests/conversations")  # fmt: skip
    p.add_argument("--hf-max-context", type=int, default=4096)
    p.add_argument("--rate", type=float, default=None, help="online requests/s")
    p.add_argument("--rate-conv", type=float, default=None, help="online conversations/s")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-interval", type=float, default=None, help="memory sampling, s")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (here, workers and servers); 1 avoids OpenMP "
                        "stalls on a loaded CPU")  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--token-range", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size = a.size or ("quick" if a.quick else "full")
    q = a.quick = a.quick or a.size != "full"
    a.workloads = a.workloads or (QUICK_WORKLOADS if q else FULL_WORKLOADS)
    a.online = (QUICK_ONLINE if q else FULL_ONLINE) if a.online is None else a.online
    a.rate = a.rate or (4.0 if q else 16.0)
    a.rate_conv = a.rate_conv or (2.0 if q else 4.0)
    a.slo_ttft_ms = a.slo_ttft_ms or (10000.0 if q else 2000.0)
    a.slo_tpot_ms = a.slo_tpot_ms or (1000.0 if q else 100.0)
    a.sample_interval = a.sample_interval or (0.02 if q else 0.05)
    if q:
        a.hf_max_requests = max(a.hf_max_requests, 64)
    return a


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.threads:
        return _main(args, argv)
    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the server subprocesses
    try:
        return _main(args, argv)
    finally:  # in-process callers (tests) get their settings back
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    spec = resolve_model(args.model, args.load_format, args.dtype)
    size = args.size
    if args.token_range:  # a worker: the orchestrator's range, no second metadata read
        lo, hi = (int(x) for x in args.token_range.split(","))
        trange = (lo, hi)
    else:
        trange = token_range_for(model_vocab_size(spec))
    if args.worker:  # one system in this process, results to --worker-out
        wls = [build_workload(k, size, args.seed, trange) for k in _split(args.workloads)]
        run_system(args.worker, spec, wls, args, args.worker_deadline or float("inf"),
                   args.worker_out)  # fmt: skip
        return 0

    t_start = time.time()
    deadline = t_start + args.time_cap
    out_dir = Path(args.out)
    work_dir = out_dir / f"_work_{spec.name}"
    work_dir.mkdir(parents=True, exist_ok=True)
    keys = _split(args.workloads)
    online_keys = _split(args.online)
    wls = {k: build_workload(k, size, args.seed, trange) for k in dict.fromkeys(keys + online_keys)}
    results: dict = {
        "model": args.model, "model_name": spec.name, "load_format": spec.load_format,
        "dtype": spec.dtype, "hardware": {}, "size": size, "seed": args.seed,
        "token_range": list(trange), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": list(argv or []), "notes": [],
        "workloads": {k: {"workload": {"description": w.description, "params": w.params,
                                       **w.stats()}, "offline": {}, "online": {}}
                      for k, w in wls.items()},
    }  # fmt: skip
    json_path = out_dir / f"e2e_{spec.name}.json"
    systems = _split(args.systems)
    online_systems = [s for s in _split(args.online_systems) if s != "hf"] if online_keys else []
    phases = [("offline", s) for s in systems] + [("online", s) for s in online_systems]
    # time shares: the engine's offline runs carry every workload; HF only the small sets
    weight = {("offline", "virtual"): 2.5, ("offline", "paged"): 2.5, ("offline", "hf"): 0.75,
              ("offline", "vllm"): 2.5}  # fmt: skip
    for i, (kind, system) in enumerate(phases):
        left = deadline - time.time()
        if left <= 0:
            results["notes"].append(f"{kind} {system}: not run (time cap)")
            continue
        w = [weight.get(p, 1.0) for p in phases[i:]]
        phase_deadline = time.time() + left * w[0] / sum(w)
        if kind == "offline":
            sel = [wls[k] for k in keys if system != "hf" or hf_fits(wls[k], args)]
            if not sel:
                results["notes"].append("hf: no workload small enough for HF generate")
                continue
            _run_offline_phase(system, spec, sel, args, phase_deadline, work_dir, results)
        else:
            sel = [wls[k] for k in online_keys]
            _run_online_phase(system, spec, sel, args, phase_deadline, work_dir, results)
        _write_json(json_path, results)  # what is done survives a kill of this stage
    # only now: querying the device creates a CUDA context in this process, which would have
    # sat in every memory reading of the phases above
    results["hardware"] = hardware()
    for w in results["workloads"].values():
        w["ratios"] = compute_ratios(w)
    _check_same_outputs(results)
    results["elapsed_s"] = time.time() - t_start
    _write_json(json_path, results)
    if not args.no_plots:
        from vtensor.bench.plots import plot_results

        results["plots"] = [os.path.basename(p) for p in plot_results(results, out_dir)]
        _write_json(json_path, results)
    print(markdown_table(summary_rows(results)))
    log(f"wrote {json_path} in {results['elapsed_s']:.0f} s")
    return 0


def _check_same_outputs(results: dict) -> None:
    """Greedy + same engine: virtual and paged should emit the same tokens; note if not."""
    for key, w in results["workloads"].items():
        off = w["offline"]
        if "virtual" in off and "paged" in off:
            a, b = off["virtual"].get("output_digest"), off["paged"].get("output_digest")
            w["virtual_paged_same_tokens"] = a is not None and a == b
            if a != b:
                results["notes"].append(
                    f"{key}: virtual and paged emitted different tokens "
                    "(greedy; small numeric differences can flip ties)"
                )


def model_vocab_size(spec: ModelSpec) -> int | None:
    """Vocabulary size without loading weights, to keep prompt ids inside it."""
    try:
        from vtensor.bench.systems import hf_config_dict

        return int(hf_config_dict(spec)["vocab_size"])
    except Exception:  # unknown model: the default id range (inside every vocabulary we bench)
        return None


if __name__ == "__main__":
    sys.exit(main())
