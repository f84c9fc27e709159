#!/usr/bin/env bash
# On the H200 (carry .whl), from the repo root: the skinny GEMM's first measurements.
#   bash scripts/h200/skinny.sh      # ~6 min; writes $OUT/skinny/*, $OUT/steps_{off,on}.json
# 1. GPU correctness (tests/test_ops_skinny.py -m gpu: against cuBLAS, in a CUDA graph);
# 2. the tune (bench skinny_tune), installed into vtensor/ops/skinny_configs.json here;
# 3. decode steps with the table off, then on (bench steps, same process setup each).
set -u
source scripts/h200/device.sh >/dev/null || exit 1
python3 -m pytest -q -m gpu tests/test_ops_skinny.py 2>&1 | tail -3
timeout 300 python3 -m vtensor.bench.skinny_tune --out "$OUT/skinny" --models llama-3-8b \
  --budget-s ${SKINNY_BUDGET:-220} --install 2>&1 | grep -v "^\s*$" | tail -40
cp vtensor/ops/skinny_configs.json "$OUT/skinny/" 2>/dev/null
for mode in off on; do
  echo "== steps, skinny $mode"
  env $([ $mode = off ] && echo VTENSOR_SKINNY_GEMM=0) timeout 150 python3 -m vtensor.bench.steps \
    --batches 1,8,32,64 --trace '' --out "$OUT/steps_$mode.json" 2>&1 | grep -E "decode b=|floor"
done
