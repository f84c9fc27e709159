#!/usr/bin/env bash
# Call 2 (carry .vl/part.ab, .whl): heavy online ShareGPT (512 requests at 64/s), vtensor alone,
# the server's step budget 16384 (its default) against 8192 (vLLM serve's), each twice.
mkdir -p /tmp/vl && cp .vl/part.* /tmp/vl/
source scripts/h200/device.sh >/dev/null 2>&1
export PYTHONPATH=$PWD:$PYTHONPATH
for run in 1 2; do
  for b in 16384 8192; do
    python3 -m vtensor.bench.e2e --model llama-3-8b --workloads sharegpt --systems '' \
      --online sharegpt --online-systems virtual --rate 64 --out $OUT/heavy_${b}_$run \
      --serve-extra="--max-num-batched-tokens $b" --time-cap 100 2>&1 | tail -1
    python3 - $OUT/heavy_${b}_$run/e2e_llama-3-8b-dummy.json $b <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["workloads"]["sharegpt"]["online"]["virtual"]
e = r.get("engine") or {}
print(sys.argv[2], "tok/s %.0f" % r["output_tokens_per_s"], "ttft p50/p99 %.1f/%.1f" % (
    r["ttft_ms"]["p50"], r["ttft_ms"]["p99"]), "tpot p50/p99 %.2f/%.2f" % (
    r["tpot_ms"]["p50"], r["tpot_ms"]["p99"]), "lag p99 %.1f" % r["client_loop_lag_ms"]["p99"],
    {k: v for k, v in e.items() if k.endswith(("p50", "p99"))})
PY
  done
done
