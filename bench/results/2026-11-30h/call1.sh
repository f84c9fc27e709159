#!/usr/bin/env bash
# Call 1 (carry .vl/part.aa, .whl): stash the first vLLM piece; the GPU suite at this code.
mkdir -p /tmp/vl && cp .vl/part.* /tmp/vl/
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
timeout 300 python3 -m pytest -q -m gpu tests 2>&1 | tail -8 | tee $OUT/gpu_suite.log
