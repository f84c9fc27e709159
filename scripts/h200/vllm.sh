#!/usr/bin/env bash
# On the H200, from the repo root, once the six vLLM pieces have arrived (README.md here):
#   source scripts/h200/vllm.sh
# vtensor's wheels (device.sh, carry .whl) and vLLM 0.26.0 in /tmp/vllm-site (carry
# .vl/install.sh and .vl/sha256; installs on first use, ~1 min). The bench puts that folder on
# the PYTHONPATH of vLLM's own processes only (vllm_system.worker_env): vtensor keeps its fastapi.
source scripts/h200/device.sh || return 1
[ -f .vl/install.sh ] && [ -f .vl/sha256 ] || { echo "vllm.sh: carry .vl/install.sh and .vl/sha256"; return 1; }
source .vl/install.sh || return 1
export VTENSOR_VLLM_SITE=/tmp/vllm-site
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
