"""Memory over time, sampled in a background thread.

What a sample holds (bytes unless named otherwise; None where the source does not exist):

    t               seconds since start()
    device_used     total - free from torch.cuda.mem_get_info: everything on the GPU, including
                    VMM pages mapped with cuMemCreate (which the caching allocator never sees)
    allocated       torch.cuda.memory_allocated: tensors of the caching allocator (weights,
                    activations, a preallocated paged pool)
    host_rss        this process's resident set (the CPU path, where "device" memory is host)
    kv_*            from a KV probe (engine snapshot or server /metrics), see `kv_probe`

A KV probe is any callable returning a dict with some of `kv_physical_bytes` (pages that exist:
mapped, cached or idle in the pool; for kv="paged" the whole preallocated pool),
`kv_mapped_bytes` (pages held by requests or the prefix cache), `kv_live_bytes` (what the live
tokens need), `kv_pages_in_use`, `kv_pages_cached`: the plot puts KV bytes mapped next to the
bytes the live tokens actually need. The probe runs in the sampler's thread while the engine
steps; a probe that raises (a dict changed size under it) just skips that sample.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default: preallocate 90% of the GPU at start


KV_KEYS = ("kv_physical_bytes", "kv_mapped_bytes", "kv_live_bytes", "kv_pages_in_use",
           "kv_pages_cached")  # fmt: skip


@dataclass(slots=True)
class MemSample:
    t: float
    device_used: int | None
    allocated: int | None
    host_rss: int | None
    kv_physical_bytes: int | None = None
    kv_mapped_bytes: int | None = None
    kv_live_bytes: int | None = None
    kv_pages_in_use: int | None = None
    kv_pages_cached: int | None = None


def _rss(pid: int | None = None) -> int | None:
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _pynvml():
    """nvidia-ml-py's module, or the copy vLLM ships (its worker process has that one)."""
    try:
        import pynvml

        return pynvml
    except ImportError:
        from vllm.third_party import pynvml

        return pynvml


class _Nvml:
    """Device-wide memory through NVML when it is there: no CUDA context needed, so a process
    that only watches (the online client) does not add a context's ~500 MB to what it sees."""

    handle = None
    tried = False

    @classmethod
    def used_total(cls) -> tuple[int, int] | None:
        if not cls.tried:
            cls.tried = True
            try:
                pynvml = _pynvml()
                pynvml.nvmlInit()
                vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
                cls.handle = pynvml.nvmlDeviceGetHandleByIndex(int(vis) if vis.isdigit() else 0)
            except Exception:  # not installed, no driver, or a sandbox without NVML
                cls.handle = None
        if cls.handle is None:
            return _nvidia_smi()
        info = _pynvml().nvmlDeviceGetMemoryInfo(cls.handle)
        return int(info.used), int(info.total)


def _nvidia_smi() -> tuple[int, int] | None:
    """The same reading through `nvidia-smi` (slower, ~50 ms) where no NVML binding exists."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total",
                              "--format=csv,noheader,nounits", "-i", vis if vis.isdigit() else "0"],
                             capture_output=True, text=True, timeout=5).stdout  # fmt: skip
        used, total = (int(x) * 2**20 for x in out.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return used, total


def device_used_total() -> tuple[int, int] | None:
    """(bytes in use on the whole device, total), or None without a GPU. A process without a
    CUDA context (the online client, the orchestrator) reads NVML and never creates one: a
    context here would take ~500 MB from the server it measures."""
    if not torch.cuda.is_available():
        return None
    if not torch.cuda.is_initialized():
        return _Nvml.used_total()
    free, total = torch.cuda.mem_get_info()
    return int(total - free), int(total)


def device_total() -> int | None:
    got = device_used_total()
    return None if got is None else got[1]


def preallocated_pool_bytes(utilization: float = VLLM_GPU_MEMORY_UTILIZATION) -> int | None:
    """What a vLLM-style engine holds from its start: `utilization` of the whole GPU."""
    total = device_total()
    return None if total is None else int(total * utilization)


def read_sample(
    t: float, kv_probe: Callable[[], dict] | None = None, rss_pid: int | None = None
) -> MemSample:
    got = device_used_total()
    used = None if got is None else got[0]
    alloc = int(torch.cuda.memory_allocated()) if torch.cuda.is_initialized() else None
    s = MemSample(t, used, alloc, _rss(rss_pid))
    if kv_probe is not None:
        try:
            kv = kv_probe() or {}
        except Exception:  # the engine's dicts may change under us; skip this KV reading
            kv = {}
        for k in KV_KEYS:
            v = kv.get(k)
            setattr(s, k, None if v is None else int(v))
    return s


class MemorySampler:
    """`with MemorySampler(0.05, probe) as m: ...` then `m.samples`, `m.summary()`."""

    def __init__(
        self,
        interval: float = 0.05,
        kv_probe: Callable[[], dict] | None = None,
        rss_pid: int | None = None,  # whose RSS to read (a server process); default: ours
    ):
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self.kv_probe = kv_probe
        self.rss_pid = rss_pid
        self.samples: list[MemSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> MemorySampler:
        if self._thread is not None:
            raise RuntimeError("MemorySampler already started")
        self._t0 = time.perf_counter()
        self.samples.append(read_sample(0.0, self.kv_probe, self.rss_pid))
        self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(
                read_sample(time.perf_counter() - self._t0, self.kv_probe, self.rss_pid)
            )

    def stop(self) -> list[MemSample]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.samples.append(
                read_sample(time.perf_counter() - self._t0, self.kv_probe, self.rss_pid)
            )
        return self.samples

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        return summarize(self.samples)

    def to_json(self, max_points: int = 400) -> dict:
        return samples_to_json(self.samples, max_points)


def _peak(values: list[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def summarize(samples: list[MemSample]) -> dict:
    """Peaks over the run; `*_start` is the first sample (memory held before the workload)."""
    if not samples:
        return {}
    first = samples[0]
    kv_phys = [s.kv_physical_bytes for s in samples]
    kv_mapped = [s.kv_mapped_bytes for s in samples]
    kv_live = [s.kv_live_bytes for s in samples]
    # fragmentation = mapped KV bytes not holding a live token, at the moment of peak mapping
    frag = None
    pairs = [(m, v) for m, v in zip(kv_mapped, kv_live, strict=True) if m and v is not None]
    if pairs:
        m, v = max(pairs)
        frag = 1.0 - v / m
    return {
        "num_samples": len(samples),
        "duration_s": samples[-1].t,
        "device_used_start": first.device_used,
        "device_used_peak": _peak([s.device_used for s in samples]),
        "allocated_peak": _peak([s.allocated for s in samples]),
        "host_rss_peak": _peak([s.host_rss for s in samples]),
        "kv_physical_peak": _peak(kv_phys),
        "kv_mapped_peak": _peak(kv_mapped),
        "kv_live_peak": _peak(kv_live),
        "kv_pages_in_use_peak": _peak([s.kv_pages_in_use for s in samples]),
        "kv_unused_fraction_at_peak": frag,
        "device_total": device_total(),
        "vllm_preallocated": preallocated_pool_bytes(),
    }


def samples_to_json(samples: list[MemSample], max_points: int = 400) -> dict:
    """Columns (t, device_used, ...), thinned to <= max_points; the peaks survive thinning."""
    if len(samples) > max_points:
        step = len(samples) / max_points
        keep = {int(i * step) for i in range(max_points)} | {len(samples) - 1}
        peak_i = max(
            range(len(samples)), key=lambda i: samples[i].device_used or samples[i].host_rss or 0
        )
        keep.add(peak_i)
        samples = [samples[i] for i in sorted(keep)]
    cols: dict[str, list] = {k: [] for k in asdict(samples[0])} if samples else {}
    for s in samples:
        for k, v in asdict(s).items():
            cols[k].append(round(v, 4) if k == "t" else v)
    return cols
