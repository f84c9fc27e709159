#!/usr/bin/env bash
# On the H200 (carry .whl), from the repo root: the next questions of bench/results/2026-11-30d.
#   bash scripts/h200/gil_probe.sh      # ~6 min; writes $OUT/*.json, *.png, *.txt
# 1. Does the CUDA mapper starve for the GIL while the main thread runs Python, and does the
#    held-GIL driver path fix it? (bench vmm stage 4: cuda-bindings vs held GIL)
# 2. The same on the engine: shared prefix and ShareGPT traced with and without
#    VTENSOR_VMM_HELD_GIL=1 (kv_wait per step is the number to read).
#    Also with 32 MiB pages: cuMemSetAccess cost ~30 us per 2 MiB page even batched (2026-11-29).
# 3. What blocks two of ShareGPT's first-pass mixed steps (torch's sync debug mode, JIT misses
#    and GC passes logged while tracing).
set -u
source scripts/h200/device.sh >/dev/null || exit 1
echo "== bench vmm"
timeout 200 python3 -m vtensor.bench.vmm --out "$OUT/vmm.json" --plot "$OUT/vmm.png" 2>&1 \
  | grep -E "stage|thread|median" | tee "$OUT/vmm.txt"
echo "== bench vmm, 32 MiB pages (does cuMemSetAccess scale with bytes or with mappings?)"
timeout 120 python3 -m vtensor.bench.vmm --page-size 33554432 --ops 16 --batches 1,8,32 \
  --trials 1 --iters 1 --prefix-pages 8 --prefix-requests 100 --out "$OUT/vmm32.json" 2>&1 \
  | grep -E "median|batch|idle" | tee "$OUT/vmm32.txt"
for mode in bindings held; do
  echo "== steps ($mode)"
  env $([ $mode = held ] && echo VTENSOR_VMM_HELD_GIL=1) timeout 150 python3 -m vtensor.bench.steps \
    --batches '' --trace shared_prefix,sharegpt --out "$OUT/steps_$mode.json" 2>&1 \
    | grep -E "trace |with prefill"
done
echo "== sync debug"
PYTHONPATH=.:${PYTHONPATH:-} timeout 120 python3 bench/results/2026-11-30d/diag/compiles.py \
  --sync-debug --batches '' --trace sharegpt --out "$OUT/sync.json" 2>&1 \
  | grep -E "\[sync\]|jit-miss|\[gc\]|trace |with prefill" | cut -c1-400 > "$OUT/sync.txt"
grep -c "\[sync\]" "$OUT/sync.txt"; grep -v "jit-miss" "$OUT/sync.txt" | tail -20
