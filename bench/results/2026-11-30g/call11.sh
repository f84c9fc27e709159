#!/usr/bin/env bash
# Call 11 (carry .whl): prefill-step graphs up to 2048 tokens (host cost per mixed step, as in
# call 2 at 512), and the small model offline with the graphs (512, default) and without (0).
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
python3 bench/results/2026-11-30f/diag/mixed_host.py --out $OUT/mixed_host_2048.json \
  --mixed-graph-tokens 2048 2>&1 | grep -E '^\{"new_tokens' | cut -c1-120
for n in 512 0; do
  python3 -m vtensor.bench.vs_vllm --out $OUT/small_$n --steps vtensor-smollm2-135m-small \
    --vtensor-engine-args mixed_graph_tokens=$n --budget 60 2>&1 | grep -E "sharegpt done|startup"
done
