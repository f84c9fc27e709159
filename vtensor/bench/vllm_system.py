"""vLLM (0.26) as a benchmark system, always in a process of its own.

    offline   `python -m vtensor.bench.vllm_system --job JOB.json --out OUT.json`: one
              `vllm.LLM` runs every workload of the job in turn (prefix cache reset between
              them), through e2e.run_offline, so turns, histories and records are built exactly
              as for vtensor's engine; OUT.json is rewritten after each workload.
    online    online.VLLMServer: `vllm serve DIR --load-format dummy` behind the same client as
              `vtensor serve` (online.py), token ids back via `return_token_ids`; DIR's
              tokenizer is loaded, so vLLM detokenizes its stream as `vtensor serve` does.

vLLM keeps its own defaults (prefix caching, chunked prefill, CUDA graphs, torch.compile);
what it resolved (max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, attention
backend, ...) is recorded next to the results. Requests: `TokensPrompt` ids, greedy,
`ignore_eos`, no detokenization: the work vtensor's engine does for the same ids.

Where vLLM lives: importable here, or in the folder `$VTENSOR_VLLM_SITE` (default
/tmp/vllm-site, where scripts/h200 installs it): that folder goes first on the PYTHONPATH of
vLLM's processes only, so vtensor's own processes keep their packages (fastapi differs).
Without vLLM the system is skipped with `vllm_unavailable()`'s one-line reason.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_SITE = "/tmp/vllm-site"
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def vllm_site() -> str | None:
    site = os.environ.get("VTENSOR_VLLM_SITE", DEFAULT_SITE)
    return site if site and os.path.isdir(os.path.join(site, "vllm")) else None


def vllm_unavailable() -> str | None:
    """None if a vLLM process can be started here, else why not (one line)."""
    if importlib.util.find_spec("vllm") is not None or vllm_site() is not None:
        return None
    return (f"vllm: not installed (no `vllm` module, none in $VTENSOR_VLLM_SITE or "
            f"{DEFAULT_SITE}; scripts/h200/README.md installs it): skipped")  # fmt: skip


def worker_env(base: dict | None = None) -> dict[str, str]:
    """Environment of a vLLM process: its site first on PYTHONPATH, then this repo."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in (vllm_site(), REPO_ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not in the H200 bundle
    for k in ("HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):  # no network there
        env.setdefault(k, "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- what we ask of vLLM (pure functions: unit-tested on the CPU) ----------------------------


def llm_kwargs(
    model_dir: str,
    *,
    max_model_len: int,
    dtype: str = "bfloat16",
    load_format: str = "dummy",
    gpu_memory_utilization: float | None = None,
) -> dict:
    """`vllm.LLM(**kwargs)`: vLLM's defaults except what must match vtensor's run."""
    kw = dict(model=model_dir, load_format=load_format, dtype=dtype, skip_tokenizer_init=True,
              max_model_len=int(max_model_len), seed=0)  # fmt: skip
    if gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = float(gpu_memory_utilization)
    return kw


def sampling_kwargs(max_tokens: int) -> dict:
    """`vllm.SamplingParams(**kwargs)`: exactly `max_tokens` greedy tokens, ids only."""
    return dict(max_tokens=int(max_tokens), temperature=0.0, ignore_eos=True, detokenize=False)


def serve_cmd(
    model_dir: str,
    *,
    port: int,
    max_model_len: int,
    dtype: str = "bfloat16",
    load_format: str = "dummy",
    served_name: str = "bench",
    gpu_memory_utilization: float | None = None,
    python: str | None = None,
) -> list[str]:
    """`vllm serve` as a module run (the console script is not installed by --target); the
    folder's tokenizer is loaded, so vLLM detokenizes as `vtensor serve` does."""
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--load-format", load_format,
           "--dtype", dtype, "--max-model-len", str(int(max_model_len)),
           "--served-model-name", served_name]  # fmt: skip
    if gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.3f}"]
    return cmd


ONLINE_EXTRA_BODY = {"return_token_ids": True}  # chunks carry the reply's ids (no tokenizer)


def equal_memory_utilization(peak_bytes: int, total_bytes: int) -> float:
    """vLLM's gpu_memory_utilization for a budget of `peak_bytes` (vtensor's measured peak,
    device-wide): rounded up to 0.01, within vLLM's (0, 1]."""
    if peak_bytes <= 0 or total_bytes <= 0:
        raise ValueError(f"need positive peak and total, got {peak_bytes}, {total_bytes}")
    return min(1.0, -(-peak_bytes * 100 // total_bytes) / 100)


_BACKEND_PATTERNS = (
    re.compile(r"Using (\w+) attention backend"),  # "Using FLASH_ATTN attention backend out of"
    re.compile(r"Using ([\w .-]+?) backend"),  # older: "Using Flash Attention backend on V1"
)
_FA_VERSION = re.compile(r"FlashAttention version (\d)|fa_version[=: ]+(\d)", re.IGNORECASE)


def parse_backend(log_text: str) -> dict:
    """The attention backend vLLM logged at startup (its engine core process logs it, so the
    parent reads the worker's or server's log)."""
    out: dict = {}
    for line in log_text.splitlines():
        if "backend" in line and "attention_backend" not in out:
            for pat in _BACKEND_PATTERNS:
                m = pat.search(line)
                if m:
                    out["attention_backend"] = m.group(1)
                    out["attention_backend_log"] = line.strip()[-300:]
                    break
        m = _FA_VERSION.search(line)
        if m and "flash_attn_version" not in out:
            out["flash_attn_version"] = int(m.group(1) or m.group(2))
    return out


def _get(obj, path: str):
    for name in path.split("."):
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def _plain(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


CONFIG_FIELDS = {
    "max_num_seqs": "scheduler_config.max_num_seqs",
    "max_num_batched_tokens": "scheduler_config.max_num_batched_tokens",
    "chunked_prefill": "scheduler_config.enable_chunked_prefill",
    "async_scheduling": "scheduler_config.async_scheduling",
    "gpu_memory_utilization": "cache_config.gpu_memory_utilization",
    "prefix_caching": "cache_config.enable_prefix_caching",
    "block_size": "cache_config.block_size",
    "num_gpu_blocks": "cache_config.num_gpu_blocks",
    "kv_cache_dtype": "cache_config.cache_dtype",
    "max_model_len": "model_config.max_model_len",
    "dtype": "model_config.dtype",
    "enforce_eager": "model_config.enforce_eager",
    "compilation_mode": "compilation_config.mode",
    "compilation_level": "compilation_config.level",
    "cudagraph_mode": "compilation_config.cudagraph_mode",
    "attention_backend_setting": "attention_config.backend",
}


def read_config(vllm_config) -> dict:
    """What vLLM resolved (its VllmConfig); a field this version lacks is left out."""
    out = {}
    for key, path in CONFIG_FIELDS.items():
        v = _get(vllm_config, path)
        if v is not None:
            out[key] = _plain(v)
    return out


# --- the system (runs only in the vLLM process) ---------------------------------------------


class VLLMSystem:
    """e2e's System interface over `vllm.LLM`: generate() runs one batch to completion."""

    name = "vllm"

    def __init__(self, kwargs: dict):
        import vllm

        self.version = vllm.__version__
        self.kwargs = dict(kwargs)
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.load_s = time.perf_counter() - t0
        self.config = read_config(_get(self.llm, "llm_engine.vllm_config"))
        self._TokensPrompt = _tokens_prompt_cls()
        self._SamplingParams = vllm.SamplingParams

    def kv_probe(self) -> dict:
        return {}  # the KV pool lives in the engine core process; memory is read device-wide

    def kv_snapshot(self) -> dict:
        return {}

    def reset(self) -> None:
        """Between workloads: nothing cached from the previous one (ids never repeat across
        workloads anyway)."""
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], max_tokens: list[int],
                 deadline: float | None = None):  # fmt: skip
        from vtensor.bench.systems import GenResult

        # LLM.generate runs the batch to completion: the caller's process cap is the deadline
        inputs = [self._TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [self._SamplingParams(**sampling_kwargs(m)) for m in max_tokens]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        cached = [int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs]
        return GenResult(ids, cached, [None] * len(outs), True)

    def close(self) -> None:
        self.llm = None
        gc.collect()


def _tokens_prompt_cls():
    try:
        from vllm import TokensPrompt
    except ImportError:  # older layouts
        from vllm.inputs import TokensPrompt
    return TokensPrompt


# --- the offline worker ---------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_job(job: dict, out_path: str) -> dict:
    """Start vLLM once, run the job's workloads in order, write `out_path` after each."""
    from vtensor.bench.e2e import _write_json, run_workloads
    from vtensor.bench.workloads import workload_from_json

    res: dict = {"system": "vllm", "label": job.get("label", "vllm"), "workloads": {},
                 "notes": [], "llm_kwargs": job["llm_kwargs"]}  # fmt: skip
    log(f"starting vllm.LLM({job['llm_kwargs']})")
    try:
        sysobj = VLLMSystem(job["llm_kwargs"])
    except Exception as e:
        res["notes"].append(f"vllm: could not start: {type(e).__name__}: {str(e)[-500:]}")
        log(res["notes"][-1])
        _write_json(out_path, res)
        raise
    # no hardware() here: it would open a CUDA context in this process, counted in every
    # (device-wide) memory reading; vtensor's worker records the hardware
    res.update(version=sysobj.version, startup_s=round(sysobj.load_s, 1), load_s=sysobj.load_s,
               config=sysobj.config)  # fmt: skip
    log(f"vllm {sysobj.version} up in {sysobj.load_s:.1f} s: {sysobj.config}")
    wls = [workload_from_json(wj) for wj in job["workloads"]]
    run_workloads(sysobj, wls, res, out_path, reset=sysobj.reset, log=log, label="vllm",
                  sample_interval=job.get("sample_interval", 0.1))  # fmt: skip
    sysobj.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vtensor.bench.vllm_system",
        description="vLLM offline worker: a job file in, JSON out",
    )
    p.add_argument("--job", required=True, help="JSON: llm_kwargs, workloads, sample_interval")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with open(a.job) as f:
        job = json.load(f)
    run_job(job, a.out)
    return 0


# --- running a worker from the orchestrating process ---------------------------------------


def _die_with_parent() -> None:  # preexec_fn: a killed orchestrator takes its worker along
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_logged(cmd: list[str], *, env: dict, log_path: str, timeout: float,
               echo: str | None = None) -> str | None:  # fmt: skip
    """Run `cmd` in its own process group, all output to `log_path`; lines that look like
    progress or errors are echoed (prefixed `echo`). Kills the whole group at `timeout` and
    once it is done (vLLM's engine core must not outlive it). Returns a note, or None."""
    import contextlib
    import signal
    import subprocess
    import threading

    keep = ("[vllm ", "[vs ", "[e2e ", "Error", "Traceback", "ERROR", "out of memory")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, bufsize=1, start_new_session=True,
                                preexec_fn=_die_with_parent)  # fmt: skip

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if echo is not None and any(k in line for k in keep):
                    print(f"  {echo}| {line.rstrip()[:400]}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        note = None
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            if rc != 0:
                note = f"exited with {rc}"
        except subprocess.TimeoutExpired:
            note = f"killed at its time cap ({timeout:.0f} s)"
        finally:  # also when we are being stopped (SIGTERM -> SystemExit)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    wait_device_released()
    return note


def wait_device_released(max_wait: float = 30.0, frac: float = 0.2) -> None:
    """After a vLLM process: wait (NVML, no CUDA context here) until the device is mostly free
    again, so the next system starts on an empty GPU. Without NVML: a fixed pause."""
    import torch

    from vtensor.bench.memory import _Nvml

    if not torch.cuda.is_available():
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        got = None if torch.cuda.is_initialized() else _Nvml.used_total()
        if got is None:
            time.sleep(5.0)
            return
        if got[0] < frac * got[1]:
            return
        time.sleep(1.0)


def run_offline_subprocess(model_dir: str, wls: list, *, max_model_len: int, out_path: str,
                           timeout: float, dtype: str = "bfloat16", load_format: str = "dummy",
                           gpu_memory_utilization: float | None = None,
                           sample_interval: float = 0.1, label: str = "vllm") -> dict:  # fmt: skip
    """One vLLM process over `wls` (Workload objects); its JSON record, with the attention
    backend from its log and a note if it failed or hit `timeout`."""
    from vtensor.bench.workloads import workload_to_json

    kwargs = llm_kwargs(model_dir, max_model_len=max_model_len, dtype=dtype,
                        load_format=load_format,
                        gpu_memory_utilization=gpu_memory_utilization)  # fmt: skip
    job = {"label": label, "llm_kwargs": kwargs, "sample_interval": sample_interval,
           "workloads": [workload_to_json(w) for w in wls]}  # fmt: skip
    base = os.path.splitext(out_path)[0]
    job_path, log_path = f"{base}.job.json", f"{base}.log"
    with open(job_path, "w") as f:
        json.dump(job, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    cmd = [sys.executable, "-m", "vtensor.bench.vllm_system", "--job", job_path, "--out", out_path]
    note = run_logged(cmd, env=worker_env(), log_path=log_path, timeout=timeout, echo=label)
    res: dict = {"system": "vllm", "label": label, "workloads": {}, "notes": []}
    if os.path.exists(out_path):
        with open(out_path) as f:
            res = json.load(f)
    with open(log_path, errors="replace") as f:
        res.setdefault("config", {}).update(parse_backend(f.read()))
    if note:
        res["notes"].append(f"{label}: worker {note} (log: {os.path.basename(log_path)})")
    os.remove(job_path)  # big (every prompt), and rebuilt from the seed on demand
    return res


if __name__ == "__main__":
    sys.exit(main())
