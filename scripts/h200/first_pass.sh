#!/usr/bin/env bash
# On the H200 (carry .whl), from the repo root: is a first pass over ShareGPT slower than a
# second because its KV pages are fresh (cuMemCreate) or because its slots' address ranges
# were never mapped? (bench/results/2026-11-30c/README.md, "Prefill steps")
#   bash scripts/h200/first_pass.sh        # ~3.5 min; writes $OUT/first_pass*.json
# - second pass slow again after --trim: fresh physical pages;
# - first pass fast after --touch-slots: fresh address ranges;
# - the allocator counters per step tell whether torch's caching / pinned allocators take part.
set -u
source scripts/h200/device.sh >/dev/null || exit 1
run() {  # name, steps arguments...
  local name=$1; shift
  echo "== $name"
  timeout 150 python3 -m vtensor.bench.steps --batches '' "$@" --out "$OUT/$name.json" 2>&1 \
    | grep -E "trace sharegpt|with prefill|allocator"
}
run first_pass --trace sharegpt,sharegpt
run first_pass_trim --trace sharegpt,sharegpt --trim
run first_pass_touched --trace sharegpt --touch-slots
