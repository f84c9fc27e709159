#!/usr/bin/env bash
# Call 9 (carry .vl/part.af, .vl/install.sh, .vl/sha256, .whl; parts aa-ae in calls 4-8):
# same-call offline comparison with vLLM 0.26.0, Llama-3-8B workloads.
mkdir -p /tmp/vl && cp .vl/part.* /tmp/vl/
source scripts/h200/vllm.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -m vtensor.bench.vs_vllm --out /tmp/vsv --steps vtensor-llama-3-8b,vllm-llama-3-8b \
  --budget 540 2>&1 | grep -E "done|startup|Error|error" | tail -20
cp -r /tmp/vsv $OUT/
