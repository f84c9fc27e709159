#!/usr/bin/env bash
# Here, after `bash ../shared/baselines/vllm-0.26.0/bundle.sh .vl`: cut the bundle again into
# 40 MiB pieces (.vl/part.aa .. .af). A 50 MiB piece no longer fits a device call next to the
# ~15 MiB working tree (64 MiB per call); install.sh joins part.* in order and checks the sha.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)/.vl"
tmp=$(mktemp -d)
cat part.* | split -b 41943040 -a 2 - "$tmp/part."
[ "$(cat "$tmp"/part.* | sha256sum | cut -d' ' -f1)" = "$(cat sha256)" ] || { echo "bad sha"; exit 1; }
rm -f part.* && mv "$tmp"/part.* . && rmdir "$tmp"
ls -la part.*
