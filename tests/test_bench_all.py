"""`vtensor bench all`: stage selection and parts, subprocess stages that pass, fail or hang,
and summary.md from the results folder (fake stage modules; the real e2e is in test_bench_e2e)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from vtensor.bench import all as A

FAKE = textwrap.dedent(
    """
    import argparse, json, sys, time

    def main(argv):
        p = argparse.ArgumentParser()
        p.add_argument("--json")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--mode", default="ok")
        a = p.parse_args(argv)
        print("progress line", flush=True)
        if a.mode == "fail":
            raise RuntimeError("stage exploded")
        if a.mode == "hang":
            time.sleep(60)
        json.dump({"tokens_per_s": 123.5, "nested": {"ms": 4.25}, "quick": a.quick},
                  open(a.json, "w"))
        return 0
    """
)


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    (tmp_path / "fakebench_mod.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    stages = [
        A.Stage("good", "fakebench_mod", ["--mode", "ok"], cap_s=30),
        A.Stage("bad", "fakebench_mod", ["--mode", "fail"], cap_s=30),
        A.Stage("slow", "fakebench_mod", ["--mode", "hang"], cap_s=3),
        A.Stage("missing", "no_such_bench_module", cap_s=30),
    ]
    monkeypatch.setattr(A, "plan", lambda quick: stages)
    return stages


def test_all_runs_stages_notes_failures_and_writes_summary(tmp_path, fake_stages, capsys):
    out = tmp_path / "res"
    assert A.main(["--out", str(out), "--quick", "--budget", "80"]) == 0
    recs = {r["stage"]: r for r in json.loads((out / "stages.json").read_text())}
    assert recs["good"]["status"] == "ok"
    assert recs["bad"]["status"] == "failed" and "stage exploded" in recs["bad"]["note"]
    assert recs["missing"]["status"] == "failed"
    assert recs["slow"]["status"] == "timeout"
    good = json.loads((out / "good.json").read_text())
    assert good["quick"] is True  # --quick reached the stage because its --help lists it
    assert "progress line" in (out / "logs" / "good.log").read_text()
    md = (out / "summary.md").read_text()
    assert "| good | ok |" in md and "| bad | failed |" in md and "| slow | timeout |" in md
    assert "tokens_per_s: 123.5" in md and "nested.ms: 4.25" in md
    assert "good| progress line" in capsys.readouterr().out


def test_part_split_covers_every_stage_once():
    stages = A.plan(quick=False)
    parts = [A.select(stages, None, f"{k}/3") for k in (1, 2, 3)]
    names = [s.name for p in parts for s in p]
    assert sorted(names) == sorted(s.name for s in stages)
    loads = [sum(s.cap_s for s in p) for p in parts]
    assert max(loads) <= 600  # each part fits one 10-minute device command
    assert sum(loads) <= 1300  # the whole plan: ~20 minutes
    assert [s.name for s in A.select(stages, "kv,vmm", None)] == ["vmm", "kv"]
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(SystemExit):
            A.select(stages, None, bad)
    with pytest.raises(SystemExit):
        A.select(stages, "nope", None)


def test_summarize_only_merges_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "stages.json").write_text(json.dumps([{"stage": "vmm", "status": "ok", "elapsed_s": 1}]))
    (b / "stages.json").write_text(json.dumps([{"stage": "kv", "status": "ok", "elapsed_s": 2}]))
    res = {
        "model_name": "toy",
        "hardware": {"device": "Testbox"},
        "workloads": {
            "sharegpt": {
                "workload": {"description": "d", "num_requests": 2},
                "offline": {
                    "virtual": {"output_tokens_per_s": 20.0, "memory": {"host_rss_peak": 2**30}},
                    "paged": {"output_tokens_per_s": 10.0, "memory": {"host_rss_peak": 2**31}},
                },
                "online": {},
                "ratios": {"offline_throughput_vs_paged": 2.0, "peak_memory_saving_vs_paged": 2.0},
            }
        },
    }
    (b / "e2e_toy.json").write_text(json.dumps(res))
    assert A.main(["--out", str(a), "--summarize-only", "--merge", str(b)]) == 0
    md = (a / "summary.md").read_text()
    assert "| vmm | ok |" in md and "| kv | ok |" in md
    assert "| Testbox | toy | sharegpt | offline output tok/s (higher better) | 20.0 | 10.0 |" in md
    assert "2.00x" in md
