#!/usr/bin/env bash
# Call 3 (carry .vl/part.ac, .whl with httptools): heavy online ShareGPT (512 at 64/s), vtensor
# alone, as call 2 but the server on uvloop + httptools, the client on aiohttp, the step trace on.
mkdir -p /tmp/vl && cp .vl/part.* /tmp/vl/
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -c "import httptools, uvloop, aiohttp; print('httptools', httptools.__version__, 'uvloop', uvloop.__version__, 'aiohttp', aiohttp.__version__)"
for run in 16384_1 8192_1 16384_2; do
  b=${run%_*}
  python3 -m vtensor.bench.e2e --model llama-3-8b --workloads sharegpt --systems '' \
    --online sharegpt --online-systems virtual --rate 64 --out /tmp/h3/heavy_$run \
    --serve-extra="--max-num-batched-tokens $b" --time-cap 100 2>&1 | tail -1
  python3 bench/results/2026-11-30h/show.py /tmp/h3/heavy_$run/e2e_llama-3-8b-dummy.json
done
tar czf $OUT/call3.tgz -C /tmp/h3 .
