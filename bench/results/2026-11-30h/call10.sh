#!/usr/bin/env bash
# Call 10 (carry .vl/install.sh, .vl/sha256, .whl): same-call online comparison with vLLM
# 0.26.0: multi-turn at 4 conversations/s and ShareGPT-like at 64 requests/s.
source scripts/h200/vllm.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
python3 -m vtensor.bench.vs_vllm --out /tmp/vsv --part 3/3 --budget 500 2>&1 | tail -4
python3 bench/results/2026-11-30h/show.py /tmp/vsv/online-llama-3-8b.json
cp -r /tmp/vsv $OUT/
