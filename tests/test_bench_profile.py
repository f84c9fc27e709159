"""bench profile: the GPU-busy union and a CPU smoke run of the whole command."""

from __future__ import annotations

import json

from vtensor.bench.profile import _busy_union, idle_gaps, main


def test_busy_union_counts_overlaps_once():
    assert _busy_union([]) == 0
    assert _busy_union([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert _busy_union([(3, 4), (0, 1)]) == 2


def test_idle_gaps_by_the_pair_they_sit_between():
    ks = [(0, 10, "gemm"), (12, 14, "norm"), (13, 20, "rope"), (25, 26, "gemm"), (27, 30, "norm")]
    g = idle_gaps(ks)
    assert g["idle_us"] == 2 + 5 + 1
    top = {x["between"]: (x["count"], x["us"]) for x in g["top"]}
    # overlapping norm/rope: the gap after them is counted from rope's (later) end
    assert top == {"gemm -> norm": (2, 3), "rope -> gemm": (1, 5)}


def test_profile_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["--model", "smollm2-135m", "--requests", "8", "--warmup-steps", "2", "--steps", "4",
            "--layers", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["window_steps"] == 4 and res["wall_ms_per_step"] > 0
    assert set(res["host_ms_per_step"]) == {"schedule", "launch", "kv_wait", "forward", "process",
                                            "wait"}  # fmt: skip
    # kv_wait and forward are parts of launch; wait is part of process
    h = res["host_ms_per_step"]
    assert h["kv_wait"] + h["forward"] <= h["launch"] and h["wait"] <= h["process"]
    assert "ms/step" in capsys.readouterr().out
