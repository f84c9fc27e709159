"""E2E runners: offline turn-by-turn semantics (recording system), ratios and summary rows,
and the real thing at toy scale on the CPU: the engine with the embedded model (virtual,
paged, HF generate) offline, and a real `vtensor serve` subprocess online."""

from __future__ import annotations

import json
import time

import pytest

from vtensor.bench import e2e
from vtensor.bench import workloads as W
from vtensor.bench.systems import GenResult


class Recorder:
    """A system whose reply to a prompt is a function of the prompt (so histories can be
    checked), recording every batch it is given."""

    name = "virtual"

    def __init__(self, slow_s: float = 0.0):
        self.batches: list[list[list[int]]] = []
        self.slow_s = slow_s

    def kv_probe(self):
        return {"kv_mapped_bytes": 100, "kv_live_bytes": 50}

    def kv_snapshot(self):
        return {"pages_in_use": 1}

    @staticmethod
    def reply(prompt: list[int], n: int) -> list[int]:
        return [(sum(prompt) + 7 * k) % 997 for k in range(n)]

    def generate(self, prompts, max_tokens, deadline=None):
        self.batches.append([list(p) for p in prompts])
        if self.slow_s:
            time.sleep(self.slow_s)
        late = deadline is not None and time.perf_counter() > deadline
        outs = [self.reply(p, 0 if late else m) for p, m in zip(prompts, max_tokens, strict=True)]
        return GenResult(outs, [len(p) // 2 for p in prompts], [0.001] * len(prompts), not late)


def test_offline_multi_turn_resends_history_with_generated_replies():
    wl = W.multi_turn(5, 3, seed=1, len_scale=0.1, max_context=300)
    sysm = Recorder()
    r = e2e.run_offline(sysm, wl, sample_interval=0.01)
    assert len(sysm.batches) == 3  # one batch per turn, all conversations together
    for c, conv in enumerate(wl.conversations):
        hist: list[int] = []
        for t in range(3):
            prompt = sysm.batches[t][c]
            assert prompt == hist + conv.user_turns[t]
            hist = prompt + Recorder.reply(prompt, conv.reply_lens[t])
    st = wl.stats()
    assert r["output_tokens"] == r["expected_output_tokens"] == st["max_output_tokens"]
    assert r["prompt_tokens"] == sum(len(p) for b in sysm.batches for p in b)
    assert r["cached_tokens"] == sum(len(p) // 2 for b in sysm.batches for p in b)
    assert r["complete"] and len(r["turn_s"]) == 3 and r["num_requests"] == 15
    assert r["output_tokens_per_s"] > 0 and r["memory"]["kv_mapped_peak"] == 100


def test_offline_deadline_marks_incomplete():
    wl = W.multi_turn(2, 3, seed=0, len_scale=0.1, max_context=200)
    r = e2e.run_offline(Recorder(slow_s=0.05), wl, deadline=time.perf_counter() + 0.01)
    assert not r["complete"] and r["output_tokens"] < r["expected_output_tokens"]


def test_ratios_and_summary_rows():
    def off(tps, peak):
        return {"output_tokens_per_s": tps, "complete": True, "output_digest": "d",
                "memory": {"device_used_peak": peak, "vllm_preallocated": 1000}}  # fmt: skip

    def on(ttft, good):
        lat = {"p50": ttft, "p99": 2 * ttft}
        return {"num_ok": 4, "num_failed": 0, "complete": True, "ttft_ms": lat, "tpot_ms": lat,
                "e2e_ms": lat, "goodput_rps": good}  # fmt: skip

    w = {
        "offline": {"virtual": off(300.0, 200), "paged": off(100.0, 900), "hf": off(50.0, 400)},
        "online": {"virtual": on(10.0, 4.0), "paged": on(30.0, 2.0)},
    }
    rt = e2e.compute_ratios(w)
    assert rt["offline_throughput_vs_paged"] == pytest.approx(3.0)
    assert rt["offline_throughput_vs_hf"] == pytest.approx(6.0)
    assert rt["peak_memory_saving_vs_paged"] == pytest.approx(4.5)
    assert rt["peak_memory_vs_vllm_pool"] == pytest.approx(0.2)
    assert rt["online_ttft_p50_vs_paged"] == pytest.approx(3.0)
    assert rt["online_goodput_vs_paged"] == pytest.approx(2.0)
    # a run its time cap cut short is not the same work: it never enters a ratio
    cut = {**w, "offline": {**w["offline"], "paged": {**off(100.0, 900), "complete": False}}}
    assert "offline_throughput_vs_paged" not in e2e.compute_ratios(cut)
    w["ratios"] = rt
    rows = e2e.summary_rows({"model_name": "m", "hardware": {"device": "H"}, "workloads": {"x": w}})
    tput = next(r for r in rows if r["metric"].startswith("offline output"))
    assert (tput["virtual"], tput["paged"], tput["hf"]) == ("300.0", "100.0", "50.0")
    assert (tput["virtual_vs_paged"], tput["virtual_vs_hf"]) == ("3.00x", "6.00x")
    assert any(r["metric"].startswith("online goodput") for r in rows)
    md = e2e.markdown_table(rows)
    assert md.count("\n") == len(rows) + 1


# --- the real engine and server, at smoke size, on the tiny dummy model -----------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    out = tmp_path_factory.mktemp("e2e")
    argv = ["--model", "tiny", "--size", "smoke", "--inprocess", "--out", str(out),
            "--systems", "virtual,paged,hf", "--online", "multi_turn",
            "--online-systems", "virtual", "--rate-conv", "50", "--time-cap", "240",
            "--threads", "1"]  # fmt: skip
    assert e2e.main(argv) == 0
    with open(out / "e2e_tiny-dummy.json") as f:
        return out, json.load(f)


def test_smoke_offline_every_workload_every_system(smoke_run):
    out, res = smoke_run
    assert res["notes"] == []
    assert set(res["workloads"]) == {"multi_turn", "shared_prefix", "long_context", "sharegpt"}
    for key, w in res["workloads"].items():
        wl = e2e.build_workload(key, "smoke", 0, tuple(res["token_range"]))
        assert w["workload"]["max_output_tokens"] == wl.stats()["max_output_tokens"]
        assert set(w["offline"]) == {"virtual", "paged", "hf"}, key
        for system, r in w["offline"].items():
            assert "error" not in r, (key, system, r)
            # ignore_eos + greedy: exactly the requested work, in full
            assert r["complete"] and r["output_tokens"] == wl.stats()["max_output_tokens"]
            assert r["prompt_tokens"] == wl.stats()["prompt_tokens"]
            assert r["output_tokens_per_s"] > 0 and r["memory"]["num_samples"] >= 2
        v, p = w["offline"]["virtual"], w["offline"]["paged"]
        assert v["memory"]["kv_physical_peak"] > 0 and p["memory"]["kv_physical_peak"] > 0
        # the paged baseline holds its whole pool from the start; virtual maps on demand
        assert v["memory"]["kv_physical_peak"] < p["memory"]["kv_physical_peak"]
        assert w["ratios"]["offline_throughput_vs_paged"] > 0
        assert (out / f"tiny-dummy_{key}.png").exists()
    # multi-turn: later turns resend the history, which the virtual KV serves from cache
    assert res["workloads"]["multi_turn"]["offline"]["virtual"]["cached_tokens"] > 0


def test_smoke_online_multi_turn_against_a_real_server(smoke_run):
    _, res = smoke_run
    r = res["workloads"]["multi_turn"]["online"]["virtual"]
    wl = e2e.build_workload("multi_turn", "smoke", 0, tuple(res["token_range"]))
    assert r["num_failed"] == 0 and r["num_ok"] == wl.stats()["num_requests"]
    assert r["output_tokens"] == wl.stats()["max_output_tokens"]
    assert r["complete"] and r["server_token_ids"] == 1.0  # histories resent as exact ids
    assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p99"]
    assert r["goodput_rps"] > 0 and r["slo_attainment"] == 1.0
    # turn 2 carries turn 1 (prompt + the reply's ids): the server reports cached tokens
    assert r["cached_tokens"] > 0
    assert r["prompt_tokens"] == wl.stats()["prompt_tokens"]
    assert 0 <= r["client_loop_lag_ms"]["p50"] <= r["client_loop_lag_ms"]["max"]
    tl = r["timeline"]  # one row per request, by sending time
    assert len(tl["sent_s"]) == r["num_ok"] and tl["sent_s"] == sorted(tl["sent_s"])
    assert sum(tl["completion_tokens"]) == r["output_tokens"]
    assert max(tl["ttft_ms"]) == pytest.approx(r["ttft_ms"]["max"], abs=0.01)
    tr = r["trace"]  # the server's step trace over this run's window
    assert tr["steps"] >= wl.stats()["num_requests"] and tr["step_ms"]["max"] > 0
    assert tr["longest_steps"][0]["ms"] == pytest.approx(tr["step_ms"]["max"])
    assert any(s["prefill"] and s["prompt_tokens"] > 0 for s in tr["longest_steps"])
    # where TTFT goes: the server's view, and the engine's queue + prefill parts of it
    eng = r["engine"]
    assert 0 < eng["server_ttft_ms_p50"] <= r["ttft_ms"]["max"] * 1.5  # bucket-interpolated
    assert eng["queue_ms_p50"] is not None and eng["prefill_ms_p50"] > 0


def test_workload_keys_and_hf_selection():
    wl = e2e.build_workload("sharegpt:5", "full", 0, (1000, 30000))
    assert wl.name == "sharegpt:5" and len(wl.requests) == 5
    assert wl.requests == W.make("sharegpt", "full").requests[:5]  # a prefix of the full set
    args = e2e.parse_args([])
    assert e2e.hf_fits(e2e.build_workload("multi_turn:8", "full", 0, (1000, 30000)), args)
    assert not e2e.hf_fits(e2e.build_workload("multi_turn", "full", 0, (1000, 30000)), args)
    assert not e2e.hf_fits(e2e.build_workload("long_context", "full", 0, (1000, 30000)), args)
    assert e2e.token_range_for(512) == (51, 461)
    assert e2e.token_range_for(128256) == (1000, 30000)


def test_dummy_model_dir_serves_a_round_tripping_tokenizer():
    from vtensor.bench.systems import TINY_CONFIG, model_dir
    from vtensor.model import load_tokenizer

    d = model_dir("tiny", TINY_CONFIG, min_context=8192)
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    assert cfg["max_position_embeddings"] == 8192 and cfg["hidden_size"] == 64
    tok = load_tokenizer(d)
    ids = [3, 77, 300, 511]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert model_dir("tiny", TINY_CONFIG, min_context=8192) == d  # written once


def test_engine_step_stats_from_metrics():
    from vtensor.bench.online import engine_step_stats

    text = "\n".join([
        "# TYPE vtensor:engine_steps_total counter",
        'vtensor:engine_steps_total{kind="prefill"} 10',
        'vtensor:engine_steps_total{kind="decode"} 90',
        "vtensor:engine_prefill_steps_graphed_total 7",
        'vtensor:engine_host_seconds_total{phase="launch"} 0.2',
        'vtensor:engine_host_seconds_total{phase="process"} 0.5',
        'vtensor:engine_host_seconds_total{phase="schedule"} 0.1',
        'vtensor:engine_host_seconds_total{phase="wait"} 0.4',
        "vtensor:num_requests_running 3",
    ])  # fmt: skip
    s = engine_step_stats(text)
    assert s["steps"] == {"prefill": 10, "decode": 90}
    assert s["prefill_graphed"] == 7
    assert s["queue_ms_p50"] is None and s["server_ttft_ms_p99"] is None  # no histograms here
    assert s["host_ms_per_step"] == {"launch": 2.0, "process": 5.0, "schedule": 1.0, "wait": 4.0}
    assert s["wait_share"] == 0.5  # 0.4 of 0.8 s (process includes wait)
    assert engine_step_stats("vllm:num_requests_running 3\n") is None


def test_histogram_quantile_interpolates_like_promql():
    from vtensor.bench.online import histogram_quantile

    name = "vtensor:request_queue_time_seconds"
    text = "\n".join([f'{name}_bucket{{le="0.01"}} 10', f'{name}_bucket{{le="0.1"}} 90',
                      f'{name}_bucket{{le="1.0"}} 100', f'{name}_bucket{{le="+Inf"}} 100',
                      f"{name}_sum 5.0", f"{name}_count 100"])  # fmt: skip
    assert histogram_quantile(text, name, 0.05) == 0.005  # half of the first bucket
    assert abs(histogram_quantile(text, name, 0.5) - (0.01 + 0.09 * 40 / 80)) < 1e-12
    assert abs(histogram_quantile(text, name, 0.95) - (0.1 + 0.9 * 5 / 10)) < 1e-12
    assert histogram_quantile(text.replace(" 100", " 0").replace(" 90", " 0")
                              .replace(" 10", " 0"), name, 0.5) is None  # fmt: skip


def test_step_trace_records_steps_gc_and_loop_stalls(tmp_path, monkeypatch):
    import asyncio
    import gc
    import time

    from vtensor.bench.online import summarize_trace
    from vtensor.engine.step_trace import ENV, StepTrace

    path = str(tmp_path / "trace.jsonl")
    monkeypatch.setenv(ENV, path)
    eng, srv = StepTrace.from_env(), StepTrace.from_env(".server")
    t_from = time.monotonic()

    def stats(steps, prefill, prompt, gen, wait_s):
        return {"steps": steps, "prefill_steps": prefill, "prompt_tokens_computed": prompt,
                "generation_tokens": gen, "running": 2, "waiting": 1,
                "host_s": {"kv_wait_s": 0.0, "wait_s": wait_s}}  # fmt: skip

    t = time.monotonic()
    eng.step(t, t + 0.010, stats(1, 1, 300, 2, 0.004))  # a prefill step of 300 tokens
    eng.step(t + 0.010, t + 0.015, stats(2, 1, 300, 4, 0.005))  # then a decode step
    gc.collect()  # both traces see it (gc.callbacks are per interpreter)

    async def stall() -> None:  # the server's loop blocked ~50 ms by synchronous work
        watch = asyncio.create_task(srv.watch_loop())
        await asyncio.sleep(0.02)
        time.sleep(0.05)
        await asyncio.sleep(0.02)
        watch.cancel()

    asyncio.run(stall())
    eng.close()
    srv.close()
    s = summarize_trace(path, t_from, time.monotonic())
    assert s["steps"] == 2 and s["step_ms"]["max"] == pytest.approx(10.0, abs=0.01)
    first = s["longest_steps"][0]
    assert first["prefill"] and first["prompt_tokens"] == 300 and first["gen_tokens"] == 2
    assert first["gpu_wait_ms"] == pytest.approx(4.0) and first["waiting"] == 1
    assert s["longest_steps"][1]["prompt_tokens"] == 0  # deltas, not totals
    assert s["gc_engine"]["count"] >= 1 and s["gc_engine"]["gen2"] >= 1
    assert s["gc_server"]["count"] >= 1
    assert s["server_loop_stalls"] >= 1 and s["longest_server_stalls"][0]["loop_lag_ms"] > 30
    assert summarize_trace(path, t_from - 100, t_from - 50) is None  # nothing in that window
    assert summarize_trace(str(tmp_path / "none.jsonl"), 0, 1) is None


def test_step_trace_gc_passes_reach_the_file_without_a_stall(tmp_path):
    """The server's trace writes only on stalls; its watcher still writes (and flushes,
    within ~0.5 s) the GC passes queued meanwhile."""
    import asyncio
    import gc
    import json

    from vtensor.engine.step_trace import StepTrace

    path = tmp_path / "t.server"
    tr = StepTrace(str(path))

    async def run() -> None:
        watch = asyncio.create_task(tr.watch_loop(threshold=10.0))  # no stall counts
        await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0.7)  # past the flush interval
        watch.cancel()

    asyncio.run(run())
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # before close()
    tr.close()
    assert any(r.get("gc") == 2 for r in rows)
    assert not any("loop_lag_ms" in r for r in rows)
