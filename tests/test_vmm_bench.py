"""Smoke tests of `python -m vtensor.bench.vmm` and `vtensor info` on the host backend."""

from __future__ import annotations

import json

from vtensor.bench import vmm as bench
from vtensor.cli import main as cli_main
from vtensor.vmm.info import collect


def test_bench_vmm_quick_host(tmp_path):
    out, png = tmp_path / "vmm.json", tmp_path / "vmm.png"
    argv = ["--backend", "host", "--page-size", str(64 << 10), "--quick", "--out", str(out)]
    assert bench.main([*argv, "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "host" and res["page_size"] == 64 << 10
    assert {"create", "map_and_access", "unmap", "release"} <= set(res["per_op_latency"])
    assert all(v["median_us"] > 0 for v in res["per_op_latency"].values())
    assert {(r["mode"], r["batch_pages"]) for r in res["throughput"]} == {
        (m, b) for m in ("inline", "mapper") for b in (1, 8, 64)
    }
    it = res["interference"]
    assert it["alone_median_s"] > 0 and it["busy_median_s"] > 0 and "slowdown" in it
    assert sum(it["churn_map_unmap_cycles"]) >= 1  # the mapper really churned meanwhile
    # on the host: idle and Python loads (CUDA adds a GEMM load)
    assert [(r["load"], r["threads"]) for r in res["shared_prefix"]] == [
        (load, t) for load in ("idle", "python") for t in (1, 2, 4)
    ]
    assert all(r["us_per_page"] > 0 for r in res["shared_prefix"])
    assert png.stat().st_size > 1000 and res["torch"] and res["timestamp"]


def test_info_reports_backend_and_pool(capsys):
    info = collect("host", 64 << 10, pages=3)
    assert info["backend"] == "host" and info["page_size"] == 64 << 10
    assert info["smoke_test_ok"] and info["pool_after_map"]["in_use"] == 3
    assert info["pool_after_trim"]["live"] == 0 and info["versions"]["torch"]
    assert cli_main(["info", "--backend", "host", "--page-size", str(64 << 10), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "host"
