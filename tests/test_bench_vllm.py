"""The vLLM system on the CPU: skipped cleanly without vLLM; what we ask of vLLM (kwargs, the
serve command line); identical token ids for both systems; the whole offline / online path
through a fake `vllm` package (same API surface: LLM, SamplingParams, TokensPrompt,
`vllm.entrypoints.cli.main serve`), and the merge / summary / plot on synthetic results."""

from __future__ import annotations

import argparse
import json
import textwrap
import time

import pytest

from vtensor.bench import vllm_system as V
from vtensor.bench import vs_vllm
from vtensor.bench import workloads as W

FAKE_INIT = '''
import sys
from types import SimpleNamespace

__version__ = "0.26.0+fake"
CALLS = []


def TokensPrompt(**kw):  # a TypedDict in vLLM: calling it gives a dict
    return dict(kw)


class SamplingParams:
    def __init__(self, **kw):
        assert kw["ignore_eos"] is True and kw["temperature"] == 0.0, kw
        assert kw["detokenize"] is False, kw
        self.max_tokens = kw["max_tokens"]


class LLM:
    def __init__(self, **kw):
        assert kw["skip_tokenizer_init"] is True and kw["load_format"] == "dummy", kw
        print("INFO [cuda.py:300] Using FLASH_ATTN attention backend out of potential "
              "backends: ['FLASH_ATTN']", flush=True)
        sched = SimpleNamespace(max_num_seqs=1024, max_num_batched_tokens=16384,
                                enable_chunked_prefill=True)
        cache = SimpleNamespace(gpu_memory_utilization=kw.get("gpu_memory_utilization", 0.9),
                                enable_prefix_caching=True, block_size=16)
        model = SimpleNamespace(max_model_len=kw["max_model_len"], dtype="torch.bfloat16")
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(
            scheduler_config=sched, cache_config=cache, model_config=model))
        self.resets = 0

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for p, sp in zip(prompts, params):
            ids = [p["prompt_token_ids"][-1]] * sp.max_tokens
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)],
                                        num_cached_tokens=0))
        return outs
'''

FAKE_SERVER = '''
import argparse, json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.add_argument("model")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--load-format")
    p.add_argument("--dtype")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--served-model-name")
    a = p.parse_args()
    assert a.cmd == "serve" and not a.skip_tokenizer_init and a.load_format == "dummy"
    record = os.environ["FAKE_VLLM_REQUESTS"]
    print("INFO Using FLASH_ATTN attention backend out of potential backends", flush=True)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(record, "a") as f:
                f.write(json.dumps(body) + "\\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            tok = body["prompt"][-1]
            for _ in range(body["max_tokens"]):  # no tokenizer: empty text, ids only
                ch = {"choices": [{"index": 0, "text": "", "token_ids": [tok]}]}
                self.wfile.write(f"data: {json.dumps(ch)}\\n\\n".encode())
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\\n\\n".encode())
            self.wfile.write(b"data: [DONE]\\n\\n")

    ThreadingHTTPServer((a.host, a.port), H).serve_forever()


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "vllm"
    (pkg / "entrypoints" / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_INIT))
    (pkg / "entrypoints" / "__init__.py").write_text("")
    (pkg / "entrypoints" / "cli" / "__init__.py").write_text("")
    (pkg / "entrypoints" / "cli" / "main.py").write_text(textwrap.dedent(FAKE_SERVER))
    monkeypatch.setenv("VTENSOR_VLLM_SITE", str(site))
    monkeypatch.setenv("FAKE_VLLM_REQUESTS", str(tmp_path / "requests.jsonl"))
    return site


@pytest.fixture
def no_vllm(monkeypatch, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    monkeypatch.setenv("VTENSOR_VLLM_SITE", str(tmp_path / "nowhere"))


# --- without vLLM ---------------------------------------------------------------------------


def test_skipped_with_one_line_reason_without_vllm(no_vllm, tmp_path):
    why = V.vllm_unavailable()
    assert why and "\n" not in why and "vllm" in why and "skipped" in why
    from vtensor.bench import e2e

    wl = W.sharegpt(2, len_scale=1 / 32)
    results = {"token_range": [1000, 30000], "notes": [], "workloads": {wl.name: {"offline": {}}}}
    args = argparse.Namespace(inprocess=True, sample_interval=0.1)
    spec = e2e.resolve_model("tiny")
    e2e._run_offline_phase("vllm", spec, [wl], args, time.time() + 60, tmp_path, results)
    assert results["notes"] == [why] and results["workloads"][wl.name]["offline"] == {}


def test_vs_vllm_records_skip_per_step(no_vllm, tmp_path):
    args = vs_vllm.parse_args(["--quick", "--out", str(tmp_path), "--workloads", "sharegpt"])
    steps = vs_vllm.select(vs_vllm.plan(quick=True), None, "vllm-tiny")
    vs_vllm.run_steps(steps, tmp_path, args)
    res = json.loads((tmp_path / "vllm-tiny.json").read_text())
    assert res["workloads"] == {} and res["notes"] == [V.vllm_unavailable()]
    assert res["kind"] == "vllm" and res["role"] == "default"


# --- what we ask of vLLM --------------------------------------------------------------------


def test_llm_and_sampling_kwargs():
    kw = V.llm_kwargs("/m", max_model_len=8192)
    assert kw == {"model": "/m", "load_format": "dummy", "dtype": "bfloat16",
                  "skip_tokenizer_init": True, "max_model_len": 8192, "seed": 0}  # fmt: skip
    # vLLM's own defaults stay: no max_num_seqs, no batched-token budget, no pool size...
    assert V.llm_kwargs("/m", max_model_len=10, gpu_memory_utilization=0.41)[
        "gpu_memory_utilization"] == 0.41  # fmt: skip
    assert V.sampling_kwargs(7) == {"max_tokens": 7, "temperature": 0.0, "ignore_eos": True,
                                    "detokenize": False}  # fmt: skip


def test_serve_cmd():
    cmd = V.serve_cmd("/m", port=8123, max_model_len=4096, python="py")
    assert cmd[:5] == ["py", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    flags = dict(zip(cmd[5::1], cmd[6::1], strict=False))
    assert flags["--port"] == "8123" and flags["--load-format"] == "dummy"
    assert flags["--max-model-len"] == "4096" and flags["--dtype"] == "bfloat16"
    assert "--skip-tokenizer-init" not in cmd and "--gpu-memory-utilization" not in cmd
    cmd = V.serve_cmd("/m", port=1, max_model_len=8, gpu_memory_utilization=0.5)
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.500"


def test_equal_memory_utilization():
    gib = 2**30
    assert V.equal_memory_utilization(55 * gib, 140 * gib) == 0.4  # 0.3929 rounded up
    assert V.equal_memory_utilization(70 * gib, 140 * gib) == 0.5
    assert V.equal_memory_utilization(200, 100) == 1.0
    with pytest.raises(ValueError):
        V.equal_memory_utilization(0, 100)


def test_parse_backend_and_read_config():
    log = (
        "INFO 11-30 [cuda.py:300] Using FLASH_ATTN attention backend out of potential "
        "backends: ['FLASH_ATTN', 'FLEX_ATTENTION']\nINFO Using FlashAttention version 3\n"
    )
    got = V.parse_backend(log)
    assert got["attention_backend"] == "FLASH_ATTN" and got["flash_attn_version"] == 3
    assert V.parse_backend("INFO Using Flash Attention backend on V1 engine.")[
        "attention_backend"] == "Flash Attention"  # fmt: skip
    assert V.parse_backend("nothing here") == {}
    from types import SimpleNamespace as NS

    cfg = NS(scheduler_config=NS(max_num_seqs=1024, max_num_batched_tokens=16384),
             cache_config=NS(gpu_memory_utilization=0.9, enable_prefix_caching=True))  # fmt: skip
    want = {"max_num_seqs": 1024, "max_num_batched_tokens": 16384,
            "gpu_memory_utilization": 0.9, "prefix_caching": True}  # fmt: skip
    assert V.read_config(cfg) == want


def test_worker_env_puts_vllm_site_first(fake_vllm):
    env = V.worker_env({"PYTHONPATH": "/tmp/site"})
    parts = env["PYTHONPATH"].split(":")
    assert parts[0] == str(fake_vllm) and parts[-1] == "/tmp/site" and V.REPO_ROOT in parts
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


# --- the same ids for both systems ----------------------------------------------------------


def test_workloads_match_the_issue_and_roundtrip():
    full = {k: W.GENERATORS[k](**kw) for k, kw in vs_vllm.SIZES["full"].items()}
    assert len(full["sharegpt"].requests) == 1000
    assert len(full["multi_turn"].conversations) == 128
    assert all(len(c.user_turns) == 4 for c in full["multi_turn"].conversations)
    lc = full["long_context"].requests
    assert len(lc) == 64 and all(4096 <= len(r.prompt_token_ids) <= 6144 for r in lc)
    assert all(1024 <= r.max_tokens <= 2048 for r in lc)
    assert vs_vllm.max_len(list(full.values())) <= 8192  # Llama-3-8B's context: no override
    for wl in full.values():
        back = W.workload_from_json(json.loads(json.dumps(W.workload_to_json(wl))))
        assert back == wl


def test_both_workers_get_identical_ids(fake_vllm, tmp_path):
    """The vtensor job and the vLLM job of one model carry the very same workloads."""
    a = vs_vllm.build_workloads("tiny", ["sharegpt", "multi_turn"], "quick")
    b = vs_vllm.build_workloads("tiny", ["sharegpt", "multi_turn"], "quick")
    assert [W.workload_to_json(w) for w in a] == [W.workload_to_json(w) for w in b]
    assert max(max(r.prompt_token_ids) for r in a[0].requests) < 512  # tiny vocabulary


# --- the whole path through a fake vLLM -----------------------------------------------------


def test_vs_vllm_offline_with_fake_vllm(fake_vllm, tmp_path):
    out = tmp_path / "r"
    rc = vs_vllm.main(["--quick", "--out", str(out), "--workloads", "sharegpt,multi_turn",
                       "--steps", "vtensor-tiny,vllm-tiny,vllm-tiny-equal",
                       "--equal-memory-util", "0.4"])  # fmt: skip
    assert rc == 0
    vt = json.loads((out / "vtensor-tiny.json").read_text())
    vl = json.loads((out / "vllm-tiny.json").read_text())
    vq = json.loads((out / "vllm-tiny-equal.json").read_text())
    assert vl["version"] == "0.26.0+fake" and vl["notes"] == []
    assert vl["config"]["max_num_seqs"] == 1024 and vl["config"]["prefix_caching"] is True
    assert vl["config"]["attention_backend"] == "FLASH_ATTN"
    assert "gpu_memory_utilization" not in vl["llm_kwargs"]  # default run: vLLM's default
    assert vq["llm_kwargs"]["gpu_memory_utilization"] == 0.4
    assert vq["config"]["gpu_memory_utilization"] == 0.4 and list(vq["workloads"]) == ["sharegpt"]
    for k in ("sharegpt", "multi_turn"):  # same work: the same prompt and output token counts
        assert vl["workloads"][k]["complete"] and vt["workloads"][k]["complete"]
        for f in ("prompt_tokens", "output_tokens", "num_requests"):
            assert vl["workloads"][k][f] == vt["workloads"][k][f], (k, f)
    s = json.loads((out / "summary.json").read_text())
    rows = {r["workload"]: r for r in s["offline"]}
    assert rows["sharegpt"]["vtensor_vs_vllm"] == pytest.approx(
        rows["sharegpt"]["vtensor_tok_s"] / rows["sharegpt"]["vllm_tok_s"])  # fmt: skip
    assert rows["sharegpt"]["vllm_equal_util"] == 0.4
    assert (out / "vs_vllm.png").stat().st_size > 0
    assert "vtensor/vLLM" in (out / "summary.md").read_text()
    assert (out / "logs" / "vllm-tiny.log").exists()
    assert not list(out.glob("*.job.json"))


def test_online_vllm_with_fake_server(fake_vllm, tmp_path):
    """`vllm serve` is driven by the same client; replies come back as ids and go into the
    next turn's history exactly."""
    from vtensor.bench import e2e

    wl = W.multi_turn(2, 2, len_scale=1 / 16, max_context=64, token_range=(10, 500))
    spec = e2e.resolve_model("tiny")
    results = {"notes": [], "workloads": {wl.name: {"online": {}}}}
    ns = argparse.Namespace(device="auto", kv_memory=None, max_num_seqs=None, seed=0, rate=4.0,
                            rate_conv=4.0, slo_ttft_ms=10000.0, slo_tpot_ms=1000.0)  # fmt: skip
    e2e._run_online_phase("vllm", spec, [wl], ns, time.time() + 60, tmp_path, results)
    assert results["notes"] == []
    rec = results["workloads"][wl.name]["online"]["vllm"]
    assert rec["num_ok"] == 4 and rec["num_failed"] == 0 and rec["complete"]
    assert rec["ttft_ms"]["p50"] > 0 and rec["vllm"]["attention_backend"] == "FLASH_ATTN"
    sent = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert all(b["return_token_ids"] is True and b["ignore_eos"] for b in sent)
    for c in wl.conversations:  # turn 2 = turn 1's prompt + the fake's reply + message 2
        first = c.user_turns[0]
        reply = [first[-1]] * c.reply_lens[0]
        assert {"prompt": first + reply + c.user_turns[1]}.items() <= next(
            b for b in sent if b["prompt"][: len(first)] == first and len(b["prompt"]) > len(first)
        ).items()  # fmt: skip


# --- merge and summary on synthetic results -------------------------------------------------


def _rec(tps: float, peak_gib: float, complete: bool = True) -> dict:
    return {"complete": complete, "output_tokens_per_s": tps, "num_requests": 10,
            "memory": {"device_used_peak": int(peak_gib * 2**30)}}  # fmt: skip


def test_merge_and_summary_synthetic(tmp_path):
    r1, r2, out = tmp_path / "r1", tmp_path / "r2", tmp_path / "out"
    for d in (r1, r2, out):
        d.mkdir()
    (r1 / "vtensor-llama-3-8b.json").write_text(json.dumps({
        "step": "vtensor-llama-3-8b", "kind": "vtensor", "model": "llama-3-8b",
        "role": "default", "notes": [], "config": {"max_num_seqs": 256},
        "workloads": {"sharegpt": _rec(5000, 60), "long_context": _rec(900, 70, False)}}))
    (r2 / "vllm-llama-3-8b.json").write_text(json.dumps({
        "step": "vllm-llama-3-8b", "kind": "vllm", "model": "llama-3-8b", "role": "default",
        "version": "0.26.0", "config": {"max_num_seqs": 1024}, "notes": [],
        "workloads": {"sharegpt": _rec(12500, 129), "long_context": _rec(2700, 129)}}))
    (r2 / "vllm-llama-3-8b-equal.json").write_text(json.dumps({
        "step": "vllm-llama-3-8b-equal", "kind": "vllm", "model": "llama-3-8b",
        "role": "equal_memory", "notes": [], "equal_memory": {"gpu_memory_utilization": 0.43},
        "workloads": {"sharegpt": _rec(12000, 61)}}))
    online = {"num_ok": 4, "complete": True, "num_failed": 0, "goodput_rps": 2.0,
              "ttft_ms": {"p50": 40.0, "p99": 90.0}, "tpot_ms": {"p50": 12.0, "p99": 20.0}}
    (r2 / "online-llama-3-8b.json").write_text(json.dumps({
        "step": "online-llama-3-8b", "kind": "online", "model": "llama-3-8b", "notes": [],
        "workloads": {"multi_turn": {"virtual": online, "vllm": {**online, "goodput_rps": 3.0}}}}))
    (r2 / "vllm-llama-3-8b.job.json").write_text("{}")  # never merged
    assert vs_vllm.main(["--out", str(out), "--merge", str(r1), str(r2)]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = {r["workload"]: r for r in s["offline"]}
    assert rows["sharegpt"]["vtensor_vs_vllm"] == pytest.approx(0.4)
    assert rows["sharegpt"]["vtensor_vs_vllm_equal"] == pytest.approx(5000 / 12000)
    assert rows["sharegpt"]["vllm_equal_util"] == 0.43
    assert rows["sharegpt"]["vtensor_peak_gib"] == pytest.approx(60)
    assert rows["long_context"]["vtensor_tok_s"] is None  # incomplete: never in a ratio
    assert rows["long_context"]["vtensor_vs_vllm"] is None
    assert s["online"][0]["vllm_goodput"] == 3.0 and s["online"][0]["vtensor_ttft_p50"] == 40.0
    md = (out / "summary.md").read_text()
    assert "0.40x (vtensor slower)" in md and "INCOMPLETE" in md and "max_num_seqs=1024" in md
    assert (out / "vs_vllm.png").exists() and not (out / "vllm-llama-3-8b.job.json").exists()


def test_parts_cover_the_plan_once():
    steps = vs_vllm.plan()
    parts = [vs_vllm.select(steps, f"{k}/3", None) for k in range(1, 4)]
    assert sorted(s.name for p in parts for s in p) == sorted(s.name for s in steps)
    budget = vs_vllm.parse_args([]).budget
    assert budget <= 540 and all(sum(s.cap_s for s in p) <= budget for p in parts)
    # the equal-memory run follows the default vLLM run in the same part (same warm machine)
    p2 = [s.name for s in parts[1]]
    assert p2.index("vllm-llama-3-8b") < p2.index("vllm-llama-3-8b-equal")
    with pytest.raises(SystemExit):
        vs_vllm.select(steps, "1/4", None)
