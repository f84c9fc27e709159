"""Which Triton kernel variants does a traced workload meet that the startup did not build, and
does Python's cyclic GC stop the loop? Logs every in-memory JIT cache miss (a compile or a
disk-cache load) with its constexprs and the arguments specialized as 16-divisible, and every
GC pass over 20 ms (`--no-freeze`: without the startup's gc.freeze(); `--sync-debug`: every
torch op that syncs the host, as torch's sync debug mode reports it), then runs
`vtensor.bench.steps` with the given arguments.
    PYTHONPATH=. python3 bench/results/2026-11-30d/diag/compiles.py --batches '' --trace sharegpt
"""

import gc
import sys
import time

from triton import knobs

from vtensor.bench.steps import main

T0 = time.perf_counter()


def hook(*, fn, compile, **_):  # noqa: A002
    consts = {k[-1] if isinstance(k, tuple) else k: v for k, v in compile["constants"].items()}
    div16 = sorted(i[0] for i, attrs in compile["configs"][0].items() if attrs)
    print(f"[jit-miss] t={time.perf_counter() - T0:7.2f}s {fn.name} warps={compile['num_warps']} "
          f"stages={compile['num_stages']} constexprs={consts} div16-args={div16}",
          file=sys.stderr, flush=True)
    return False


_gc_start = [0.0]


def gc_timer(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
        return
    ms = 1e3 * (time.perf_counter() - _gc_start[0])
    if ms > 20:
        print(f"[gc] t={time.perf_counter() - T0:7.2f}s generation {info['generation']} "
              f"{ms:.0f} ms, collected {info['collected']}, tracked {len(gc.get_objects())}",
              file=sys.stderr, flush=True)


gc.callbacks.append(gc_timer)
if "--no-freeze" in sys.argv:  # the startup's gc.freeze() undone: the A/B's other side
    sys.argv.remove("--no-freeze")
    gc.freeze = lambda: None
if "--sync-debug" in sys.argv:  # torch warns (with the stack) at every op that syncs the host
    sys.argv.remove("--sync-debug")
    import warnings

    import torch

    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        print(f"[sync] t={time.perf_counter() - T0:7.2f}s {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
knobs.runtime.jit_cache_hook = hook
sys.exit(main(sys.argv[1:]))
