#!/usr/bin/env bash
# Call 4 (carry .vl/part.aa, .whl): heavy online ShareGPT as call 3 (16384), the server's
# start-up heap now frozen out of the GC.
mkdir -p /tmp/vl && cp .vl/part.* /tmp/vl/
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -m vtensor.bench.e2e --model llama-3-8b --workloads sharegpt --systems '' \
  --online sharegpt --online-systems virtual --rate 64 --out /tmp/h4/heavy_frozen \
  --time-cap 100 2>&1 | tail -1
python3 bench/results/2026-11-30h/show.py /tmp/h4/heavy_frozen/e2e_llama-3-8b-dummy.json
tar czf $OUT/call4.tgz -C /tmp/h4 .
