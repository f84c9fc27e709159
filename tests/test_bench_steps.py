"""bench steps: the trace summary on hand-made rows, and a CPU smoke run of the command."""

from __future__ import annotations

import json

import torch

from vtensor.bench.steps import main, summarize_trace, weight_bytes_read


def test_summary_splits_prefill_and_decode_by_running_count():
    rows = [
        {"wave": 0, "ms": 10.0, "running": 3, "prefill": True, "prompt_tokens": 300},
        {"wave": 0, "ms": 2.0, "running": 3, "prefill": False, "prompt_tokens": 0},
        {"wave": 0, "ms": 4.0, "running": 3, "prefill": False, "prompt_tokens": 0},
        {"wave": 1, "ms": 1.0, "running": 1, "prefill": False, "prompt_tokens": 0},
    ]
    s = summarize_trace(rows)
    assert s["steps"] == 4 and abs(s["total_s"] - 0.017) < 1e-12
    assert s["prefill_steps"] == {"n": 1, "s": 0.01, "prompt_tokens": 300}
    by = s["decode_steps_by_running"]
    assert set(by) == {"<=1", "<=4"}
    assert by["<=4"]["n"] == 2 and by["<=4"]["ms_per_step"] == 3.0
    assert s["wave_s"] == [0.016, 0.001]


def test_weight_bytes_skip_embedding_tables():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3, bias=False))
    assert weight_bytes_read(m) == 4 * 3 * 4  # fp32 Linear only


def test_steps_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "s.json"
    args = ["--model", "tiny", "--batches", "1,3", "--context", "32", "--steps", "4",
            "--size", "quick", "--trace", "multi_turn", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert [p["batch"] for p in res["decode"]] == [1, 3]
    assert all(p["wall_ms_per_step"] > 0 for p in res["decode"])
    tr = res["traces"]["multi_turn"]
    # every generated token of the workload shows up in the trace (3 conversations x 2 turns)
    from vtensor.bench.vs_vllm import build_workloads

    wl = build_workloads("tiny", ["multi_turn"], "quick")[0]
    assert sum(r["generated"] for r in tr["rows"]) == wl.stats()["max_output_tokens"]
    assert len(tr["summary"]["wave_s"]) == 2
    assert "trace multi_turn" in capsys.readouterr().out


def test_steps_traces_twice_after_touching_every_slot(tmp_path):
    """A workload named twice is traced twice (the second under its own key); --touch-slots
    maps a page into every slot first and leaves the cache as it found it."""
    out = tmp_path / "s.json"
    args = ["--model", "tiny", "--batches", "", "--size", "quick", "--trace",
            "multi_turn,multi_turn", "--touch-slots", "--trim", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert set(res["traces"]) == {"multi_turn", "multi_turn#2"}
    assert res["touched_slots"] > 1 and res["trim_before_traces"] is True
    a, b = (res["traces"][k]["rows"] for k in ("multi_turn", "multi_turn#2"))
    assert sum(r["generated"] for r in a) == sum(r["generated"] for r in b) > 0
