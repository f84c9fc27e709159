"""Memory sampler, its summary/thinning, and the PNG plots (from synthetic records)."""

from __future__ import annotations

import threading
import time

import pytest

from vtensor.bench import memory as M
from vtensor.bench.plots import plot_results, replot


def test_sampler_reads_probe_and_survives_a_raising_probe():
    calls = {"n": 0}
    lock = threading.Lock()

    def probe():
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n % 3 == 0:
            raise RuntimeError("dictionary changed size during iteration")
        return {"kv_mapped_bytes": 1000 * n, "kv_live_bytes": 600 * n, "kv_pages_in_use": n,
                "other": 5}  # fmt: skip

    with M.MemorySampler(0.005, probe) as m:
        buf = bytearray(8 << 20)  # the process RSS must register it
        time.sleep(0.08)
    del buf
    s = m.samples
    assert len(s) >= 5 and s[0].t == 0.0
    assert all(a.t <= b.t for a, b in zip(s, s[1:], strict=False))
    assert all(x.host_rss and x.host_rss > 0 for x in s)
    got = [x for x in s if x.kv_mapped_bytes is not None]
    skipped = [x for x in s if x.kv_mapped_bytes is None]
    assert got and skipped  # raising probe calls skip the KV part, not the sample
    summ = m.summary()
    assert summ["kv_mapped_peak"] == max(x.kv_mapped_bytes for x in got)
    assert summ["kv_live_peak"] == max(x.kv_live_bytes for x in got)
    assert summ["kv_unused_fraction_at_peak"] == pytest.approx(0.4)
    assert summ["kv_pages_in_use_peak"] == max(x.kv_pages_in_use for x in got)
    assert summ["num_samples"] == len(s)


def test_sampler_rejects_bad_interval_and_double_start():
    with pytest.raises(ValueError):
        M.MemorySampler(0)
    m = M.MemorySampler(0.01).start()
    with pytest.raises(RuntimeError):
        m.start()
    m.stop()


def test_thinning_keeps_the_peak_and_the_ends():
    samples = [M.MemSample(i * 0.01, None, None, 100 + (i % 7)) for i in range(1000)]
    samples[517].host_rss = 10**9
    cols = M.samples_to_json(samples, max_points=50)
    assert len(cols["t"]) <= 52
    assert 10**9 in cols["host_rss"]
    assert cols["t"][0] == 0.0 and cols["t"][-1] == pytest.approx(9.99)
    assert set(cols) >= {"t", "device_used", "kv_mapped_bytes", "kv_live_bytes"}


def _fake_results(tmp_path):
    def series(scale):
        ss = [M.MemSample(i * 0.1, None, None, int(scale * (1 + i) * 2**20), None,
                          i * 2**20, i * 2**19) for i in range(20)]  # fmt: skip
        return M.samples_to_json(ss), M.summarize(ss)

    off = {}
    for name, scale in (("virtual", 1.0), ("paged", 2.0), ("hf", 3.0)):
        cols, summ = series(scale)
        off[name] = {"output_tokens_per_s": 10 * scale, "memory": summ, "memory_series": cols}
    on = {
        n: {"num_ok": 3, "ttft_ms": {"p50": 5.0 * s, "p99": 9.0 * s},
            "tpot_ms": {"p50": 1.0 * s, "p99": 2.0 * s}, "memory_series": off[n]["memory_series"],
            "memory": off[n]["memory"],
            "timeline": {"sent_s": [0.0, 0.1, 0.2], "ttft_ms": [5.0 * s, 9.0 * s, None]}}
        for n, s in (("virtual", 1.0), ("paged", 1.5))
    }  # fmt: skip
    return {
        "model_name": "toy",
        "workloads": {
            "sharegpt": {"offline": off, "online": on},
            "multi_turn": {"offline": {"virtual": off["virtual"], "paged": {"error": "x"}}},
        },
    }


def test_plots_write_pngs(tmp_path):
    res = _fake_results(tmp_path)
    paths = plot_results(res, tmp_path)
    assert sorted(p.split("/")[-1] for p in paths) == ["toy_multi_turn.png", "toy_sharegpt.png"]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
    import json

    jp = tmp_path / "r.json"
    jp.write_text(json.dumps(res))
    again = replot(jp, tmp_path / "again")
    assert len(again) == 2
