#!/usr/bin/env bash
# Call 1 (carry .whl): prefill-step CUDA graphs on the H200: the GPU test, host cost of a mixed
# step eager vs graphed, online multi-turn (vtensor only) without and with them.
source scripts/h200/device.sh >/dev/null 2>&1
set -x
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -m pytest -q -m gpu tests/test_mixed_graphs.py -x 2>&1 | tail -30
for n in 0 512; do
  python3 bench/results/2026-11-30f/diag/mixed_host.py --out $OUT/mixed_host_$n.json \
    --mixed-graph-tokens $n 2>&1 | grep -v '^ ' | grep -E 'new_tokens|captured|Error|error' | cut -c1-400
done
python3 -m vtensor.bench.vs_vllm --out $OUT/online_off --part 3/3 --online-systems virtual --budget 150 2>&1 | tail -5
python3 -m vtensor.bench.vs_vllm --out $OUT/online_512 --part 3/3 --online-systems virtual --budget 150 \
  --vtensor-serve-args="--mixed-graph-tokens 512" 2>&1 | tail -5
