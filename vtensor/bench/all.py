"""`vtensor bench all --out bench/results/<date>/`: every benchmark, JSON + PNG + summary.md.

Each stage runs in its own subprocess (a fresh CUDA context, memory measured from a clean
device, a hard time cap) calling the benchmark module's `main(argv)`; a stage that fails or
hits its cap is noted in the summary and the run goes on. The default plan fits ~20 minutes on
one H200; one device command may run at most 10 minutes there, so split it:

    python -m vtensor.bench.all --out R --part 1/2     # first half of the stages
    python -m vtensor.bench.all --out R --part 2/2     # the rest (same R, or another folder)
    python -m vtensor.bench.all --out R --summarize-only [--merge R2 ...]   # summary.md

`--quick` is a toy run of the same plan on the CPU (host backend, embedded model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGE_RUNNER = (
    "import sys, importlib; sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]) or 0)"  # noqa: E501
)


@dataclass(slots=True)
class Stage:
    name: str
    module: str
    argv: list[str] = field(default_factory=list)
    cap_s: float = 120.0  # hard wall-clock cap for the subprocess
    kind: str = "other"  # "e2e" stages get --out/--time-cap from us; others are probed
    out_dir: bool = False  # the stage's --out names a folder (its JSON + PNG go there)


def _e2e(name: str, args: str, cap_s: float, online: str = "") -> Stage:
    return Stage(name, "vtensor.bench.e2e", [*args.split(), "--online", online], cap_s, "e2e")


def plan(quick: bool) -> list[Stage]:
    """The stages of a run; each e2e stage's own --time-cap is its cap minus 40 s."""
    others = [
        Stage("vmm", "vtensor.bench.vmm", cap_s=60 if quick else 30),  # H200: 13 s
        Stage("kv", "vtensor.bench.kv", cap_s=60 if quick else 40),  # H200: 21 s
        Stage("kernels", "vtensor.bench.kernels", cap_s=90 if quick else 100, out_dir=True),
        Stage(
            "throughput",
            "vtensor.bench.throughput",
            [] if quick else ["--time-cap", "35"],
            cap_s=150,
        ),
    ]
    if quick:  # CPU: the real default model at smoke size, the tiny dummy at quick size
        return others + [
            _e2e(
                "e2e-embedded",
                "--model embedded --size smoke --hf-weights random --threads 1",
                240,
                "multi_turn",
            ),  # fmt: skip
            _e2e("e2e-tiny", "--model tiny --size quick --threads 1", 180, "multi_turn,sharegpt"),
        ]
    return others + [
        _e2e("e2e-llama-3-8b", "--model llama-3-8b", 500, "multi_turn:32,sharegpt:128"),
        _e2e(
            "e2e-qwen2.5-7b", "--model qwen2.5-7b --workloads multi_turn,sharegpt,sharegpt:32", 200
        ),  # fmt: skip
        _e2e(
            "e2e-embedded",
            "--model embedded --workloads multi_turn:16,shared_prefix,sharegpt:32",
            200,  # H200: 131 s offline alone; 120 s cut it short
            "multi_turn:16",
        ),  # fmt: skip
    ]


def by_name(items: list, names: str | None, what: str) -> list:
    """The items (anything with a `.name`) named in `names` ("a,b"; None: all), in plan order;
    SystemExit naming any unknown one."""
    if not names:
        return items
    want = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(want) - {s.name for s in items})
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; have {[s.name for s in items]}")
    return [s for s in items if s.name in want]


def select(stages: list[Stage], names: str | None, part: str | None) -> list[Stage]:
    stages = by_name(stages, names, "stage")
    if part:
        try:
            k, n = (int(x) for x in part.split("/"))
        except ValueError:
            raise SystemExit(f"--part wants K/N, got {part!r}") from None
        if not 1 <= k <= n:
            raise SystemExit(f"--part {part}: need 1 <= K <= N")
        # greedy: biggest caps first onto the lightest part, order kept inside a part
        loads = [0.0] * n
        owner: dict[str, int] = {}
        for s in sorted(stages, key=lambda s: -s.cap_s):
            j = loads.index(min(loads))
            owner[s.name] = j
            loads[j] += s.cap_s
        stages = [s for s in stages if owner[s.name] == k - 1]
    return stages


def _help_text(module: str) -> str:
    try:
        r = subprocess.run([sys.executable, "-c", STAGE_RUNNER, module, "--help"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        return r.stdout + r.stderr
    except (subprocess.TimeoutExpired, OSError):
        return ""


def stage_argv(stage: Stage, out: Path, quick: bool) -> list[str]:
    """Our flags for a stage: e2e gets them all; other benches only what their --help shows."""
    if stage.kind == "e2e":
        argv = [*stage.argv, "--out", str(out), "--time-cap", str(max(30, stage.cap_s - 40))]
        return argv + (["--quick"] if quick else [])
    text = _help_text(stage.module)
    argv = list(stage.argv)
    json_path = str(out / stage.name) if stage.out_dir else str(out / f"{stage.name}.json")

    def has(flag: str) -> bool:
        return re.search(re.escape(flag) + r"\b(?!-)", text) is not None

    for flag in ("--json", "--out", "--output"):
        if has(flag):
            argv += [flag, json_path]
            break
    if has("--plot"):
        argv += ["--plot", str(out / f"{stage.name}.png")]
    if quick and has("--quick"):
        argv.append("--quick")
    return argv


def run_stage(stage: Stage, out: Path, quick: bool, cap_s: float) -> dict:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.name}.log"
    rec = {"stage": stage.name, "module": stage.module, "cap_s": round(cap_s)}
    t0 = time.time()
    try:
        argv = stage_argv(stage, out, quick)
    except Exception as e:
        return {**rec, "status": "failed", "note": f"argv: {e!r}", "elapsed_s": 0.0}
    rec["argv"] = argv
    cmd = [sys.executable, "-c", STAGE_RUNNER, stage.module, *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"[all] {stage.name}: {' '.join(argv)} (cap {cap_s:.0f} s)", flush=True)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, bufsize=1, start_new_session=True)  # fmt: skip

        def pump() -> None:  # progress: echo the stage's output, keep all of it in the log
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                print(f"  {stage.name}| {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=cap_s)
            status, note = ("ok", None) if rc == 0 else ("failed", f"exit code {rc}")
        except subprocess.TimeoutExpired:
            # the stage's own process group (its workers, servers): all started by this run
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status, note = "timeout", f"killed at its cap of {cap_s:.0f} s"
        reader.join(timeout=10)
    if status == "failed":
        note = f"{note}: {_last_error(log_path)}"
    rec.update(status=status, note=note, elapsed_s=round(time.time() - t0, 1),
               log=str(log_path.relative_to(out)))  # fmt: skip
    print(f"[all] {stage.name}: {status} in {rec['elapsed_s']} s {note or ''}", flush=True)
    return rec


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


# --- summary --------------------------------------------------------------------------------


def _flat_numbers(obj, prefix: str = "", out: dict | None = None, limit: int = 24) -> dict:
    out = {} if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flat_numbers(v, f"{prefix}{k}.", out, limit)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = obj
    return out


def write_summary(out: Path, dirs: list[Path], stage_recs: list[dict], command: str) -> str:
    from vtensor.bench.report import markdown_table, summary_rows

    e2e = []
    for d in dirs:
        for p in sorted(glob.glob(str(d / "e2e_*.json"))):
            with open(p) as f:
                e2e.append((Path(p), json.load(f)))
    hw = next((r["hardware"] for _, r in e2e if r.get("hardware")), None)
    lines = [
        f"# vtensor benchmark results ({_dt.date.today().isoformat()})",
        "",
        f"Command: `{command}`  ",
        f"Hardware: {hw.get('device') if hw else 'see logs'}"
        + (
            f" ({hw.get('memory_gib')} GiB, torch {hw.get('torch')}, CUDA {hw.get('cuda')})"
            if hw and hw.get("memory_gib")
            else ""
        ),  # fmt: skip
        "",
        "Every number below was measured in this run; ratios are virtual's advantage "
        "(>1 = virtual better: throughput virtual/baseline, latency and memory "
        "baseline/virtual). Workloads and method: docs/benchmarks.md.",
        "",
        "## End-to-end",
        "",
    ]
    rows = [r for _, res in e2e for r in summary_rows(res)]
    lines += [markdown_table(rows) if rows else "(no e2e results)", ""]
    for p, res in e2e:
        lines.append(f"### {res.get('model_name')} ({p.name}, {res.get('elapsed_s', 0):.0f} s)")
        lines.append("")
        for key, w in res.get("workloads", {}).items():
            wd = w.get("workload", {})
            same = w.get("virtual_paged_same_tokens")
            lines.append(
                f"- `{key}`: {wd.get('description')}; {wd.get('num_requests')} requests, "
                f"{wd.get('prompt_tokens')} prompt tokens, <= {wd.get('max_output_tokens')} "
                f"output tokens" + ("" if same is None else f"; virtual/paged same tokens: {same}")
            )
            for sysname, r in {**w.get("offline", {})}.items():
                if "error" in r:
                    lines.append(f"  - offline {sysname}: error {r['error']}")
                elif not r.get("complete", True):
                    lines.append(f"  - offline {sysname}: INCOMPLETE (time cap), "
                                 f"{r.get('output_tokens')}/{r.get('expected_output_tokens')} "
                                 "tokens")  # fmt: skip
        for n in res.get("notes", []):
            lines.append(f"- note: {n}")
        for png in res.get("plots", []):
            lines.append(f"\n![{png}]({png})")
        lines.append("")
    lines += ["## Stages", "", "| stage | status | time (s) | note |", "|---|---|---|---|"]
    for r in stage_recs:
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('elapsed_s', '')} | "
                     f"{(r.get('note') or '').replace('|', '/')} |")  # fmt: skip
    others = [r for r in stage_recs if not r["stage"].startswith("e2e")]
    for r in others:
        for d in dirs:
            jp = d / f"{r['stage']}.json"
            if not jp.exists():  # a stage that writes into its own folder
                found = sorted((d / r["stage"]).glob("*.json")) if (d / r["stage"]).is_dir() else []
                jp = found[0] if found else jp
            if jp.exists():
                try:
                    nums = _flat_numbers(json.loads(jp.read_text()))
                except (json.JSONDecodeError, OSError):
                    continue
                lines += ["", f"### {r['stage']} ({jp.name}, first numbers)", ""]
                lines += [f"- {k}: {v:.4g}" for k, v in nums.items()]
                pngs = [d / f"{r['stage']}.png"] + sorted((d / r["stage"]).glob("*.png"))
                for png in (p for p in pngs if p.exists()):
                    rel = png.relative_to(d)
                    lines.append(f"\n![{rel}]({rel})")
                break
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vtensor bench all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=f"bench/results/{_dt.date.today().isoformat()}")
    p.add_argument("--quick", action="store_true", help="toy sizes (CPU)")
    p.add_argument("--stages", default=None, help="comma list of stage names")
    p.add_argument("--part", default=None, help="K/N: run the K-th of N parts of the plan")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default: 21 min, quick 15 min)")  # fmt: skip
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--merge", nargs="*", default=[], help="more result folders to summarize")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--systems", default=None,
                   help="systems for the throughput and e2e stages, e.g. virtual,paged,hf,vllm "
                        "(e2e online: the same minus hf); default: each stage's own")  # fmt: skip
    return p.parse_args(argv)


def with_systems(stages: list[Stage], systems: str | None) -> list[Stage]:
    """--systems for the stages that compare systems (vllm: started once per stage)."""
    if not systems:
        return stages
    online = ",".join(s for s in systems.split(",") if s.strip() and s.strip() != "hf")
    for s in stages:
        if s.kind == "e2e":
            s.argv = [*s.argv, "--systems", systems, "--online-systems", online]
        elif s.module == "vtensor.bench.throughput":
            s.argv = [*s.argv, "--systems", systems]
    return stages


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = with_systems(select(plan(args.quick), args.stages, args.part), args.systems)
    if args.list:
        for s in stages:
            print(f"{s.name:18s} cap {s.cap_s:5.0f} s  {s.module} {' '.join(s.argv)}")
        return 0
    recs_path = out / "stages.json"
    recs: list[dict] = json.loads(recs_path.read_text()) if recs_path.exists() else []
    if not args.summarize_only:
        budget = args.budget or (900.0 if args.quick else 1260.0)
        t0 = time.time()
        total_cap = sum(s.cap_s for s in stages)
        for i, s in enumerate(stages):
            left = budget - (time.time() - t0)
            rest = sum(x.cap_s for x in stages[i:])
            cap = min(s.cap_s, left * s.cap_s / rest) if rest else s.cap_s
            recs = [r for r in recs if r["stage"] != s.name]
            if cap < min(5.0, s.cap_s):
                recs.append({"stage": s.name, "status": "skipped", "elapsed_s": 0,
                             "note": "run's time budget spent"})  # fmt: skip
                continue
            recs.append(run_stage(s, out, args.quick, cap))
            recs_path.write_text(json.dumps(recs, indent=1))
        print(f"[all] {len(stages)} stages in {time.time() - t0:.0f} s (caps {total_cap:.0f} s)")
    dirs = [out] + [Path(d) for d in args.merge]
    for d in dirs[1:]:  # bring merged results (JSON, PNG, logs, stage folders) into `out`
        for f in d.glob("*"):
            if f.is_file() and f.suffix in (".json", ".png") and f.name != "stages.json":
                shutil.copy2(f, out / f.name)
            elif f.is_dir() and not f.name.startswith("_work"):
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
        sp = d / "stages.json"
        if sp.exists():
            theirs = json.loads(sp.read_text())
            names = {r["stage"] for r in theirs}
            recs = [r for r in recs if r["stage"] not in names] + theirs
    recs_path.write_text(json.dumps(recs, indent=1))
    command = "vtensor bench all " + " ".join(argv)
    text = write_summary(out, [out], recs, command)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
