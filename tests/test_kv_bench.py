"""`python -m vtensor.bench.kv --quick` on the host backend: runs, and its numbers add up."""

from __future__ import annotations

import json

from vtensor.bench import kv as kv_bench
from vtensor.bench import workloads


def test_kv_bench_quick_runs_and_is_consistent(tmp_path):
    argv = ["--quick", "--backend", "host", "--out", str(tmp_path), "--conversations", "6",
            "--turns", "2", "--pool-gib", "1", "--idle-trim-s", "0"]  # fmt: skip
    assert kv_bench.main(argv) == 0
    res = json.loads((tmp_path / "kv.json").read_text())
    assert (tmp_path / "kv.png").stat().st_size > 0
    wl = workloads.multi_turn(6, 2, seed=0, len_scale=0.25, max_context=2048)
    want = sum(sum(c.reply_lens) for c in wl.conversations)  # every reply token generated once
    v, p = res["virtual"], res["paged_baseline"]
    assert v["generated_tokens"] == p["generated_tokens"] == want
    assert 0 < v["peak_bytes_physical"] <= p["pool_bytes"] == 1 << 30
    assert v["peak_bytes_live_tokens"] <= v["peak_bytes_mapped"] <= v["peak_bytes_physical"]
    assert v["bytes_physical_end_after_idle_trim"] <= v["peak_bytes_physical"]
    assert 0.0 < v["prefix_hit_rate"] < 1.0 and 0.0 < p["prefix_hit_rate"] < 1.0
    assert v["map_ops_per_generated_token"] > 0 and v["mapper_wait_s"] >= 0
    assert len(res["series"]) > 2
