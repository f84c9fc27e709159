#!/usr/bin/env bash
# Call 2 (carry .whl): the GPU test of the prefill-step graphs (both layouts), the host cost of
# a mixed step eager vs graphed, heavy online ShareGPT with the new default, then the GPU suite.
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
set -x
python3 -m pytest -q -m gpu tests/test_mixed_graphs.py 2>&1 | tail -4
for n in 0 512; do
  python3 bench/results/2026-11-30f/diag/mixed_host.py --out $OUT/mixed_host_$n.json \
    --mixed-graph-tokens $n 2>&1 | grep -E '^\{"new_tokens|captured|Error' | cut -c1-300
done
python3 -m vtensor.bench.e2e --model llama-3-8b --workloads sharegpt --systems '' --online sharegpt \
  --online-systems virtual --rate 64 --out $OUT/online_heavy --time-cap 160 --no-plots 2>&1 | tail -3
timeout 170 python3 -m pytest -q -m gpu -x tests 2>&1 | tail -8
