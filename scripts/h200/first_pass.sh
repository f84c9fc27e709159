#!/usr/bin/env bash
# On the H200 (carry .whl), from the repo root: is a first pass over ShareGPT slower than a
# second because its KV pages are fresh (cuMemCreate) or because its slots' address ranges
# were never mapped? (bench/results/2026-11-30c/README.md, "Prefill steps")
#   bash scripts/h200/first_pass.sh        # ~2.5 min; writes $OUT/first_pass{,_trim}.json
# Second pass fast in both runs: fresh VA ranges (or something else the first pass touches).
# Second pass slow again after --trim: fresh physical pages. The allocator counters per step
# tell whether torch's caching / pinned allocators take part.
set -u
source scripts/h200/device.sh >/dev/null || exit 1
for trim in "" "--trim"; do
  timeout 150 python3 -m vtensor.bench.steps --batches '' --trace sharegpt,sharegpt $trim \
    --out "$OUT/first_pass${trim:+_trim}.json" 2>&1 | grep -E "trace sharegpt|prefill|allocator"
done
