"""E2E results -> ratios and the rows of the Markdown summary table.

A ratio is virtual's advantage over a baseline, >1 meaning virtual is better: throughput
virtual/baseline, latency and memory baseline/virtual. Only complete runs of the same work
enter a ratio; a run cut short by its time cap is shown in the JSON and the notes, never here.
"""

from __future__ import annotations


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(wres: dict) -> dict:
    """'x better' for virtual against each baseline: >1 means virtual is better."""
    out: dict = {}
    # same work only: a run cut short by its time cap is shown but never enters a ratio
    off = {k: v for k, v in wres.get("offline", {}).items()
           if "error" not in v and v.get("complete")}  # fmt: skip
    v = off.get("virtual")
    if v:
        for base in ("paged", "hf", "vllm"):
            b = off.get(base)
            if not b:
                continue
            out[f"offline_throughput_vs_{base}"] = _ratio(v["output_tokens_per_s"],
                                                          b["output_tokens_per_s"])  # fmt: skip
            mv, mb = v.get("memory", {}), b.get("memory", {})
            key = "device_used_peak" if mv.get("device_used_peak") else "host_rss_peak"
            out[f"peak_memory_saving_vs_{base}"] = _ratio(mb.get(key), mv.get(key))
        out["kv_memory_saving_vs_paged"] = _ratio(
            (off.get("paged") or {}).get("memory", {}).get("kv_physical_peak"),
            v.get("memory", {}).get("kv_physical_peak"),
        )
        pool = v.get("memory", {}).get("vllm_preallocated")
        peak = v.get("memory", {}).get("device_used_peak")
        if pool and peak:
            out["peak_memory_vs_vllm_pool"] = peak / pool
    on = {k: r for k, r in wres.get("online", {}).items()
          if r.get("num_ok") and r.get("complete") and not r.get("num_failed")}  # fmt: skip
    for base in ("paged", "vllm"):
        if "virtual" not in on or base not in on:
            continue
        v, p = on["virtual"], on[base]
        for m, q in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"),
                     ("tpot_ms", "p99"), ("e2e_ms", "p50"), ("e2e_ms", "p99")):  # fmt: skip
            out[f"online_{m[:-3]}_{q}_vs_{base}"] = _ratio(p[m].get(q), v[m].get(q))
        out[f"online_goodput_vs_{base}"] = _ratio(v.get("goodput_rps"), p.get("goodput_rps"))
    return out


def summary_rows(results: dict) -> list[dict]:
    """Rows for the Markdown summary: one per (workload, metric)."""
    rows = []
    hw = results.get("hardware", {}).get("device", "?")
    model = results.get("model_name", "?")

    def row(wl, metric, vals: dict, ratio_keys: tuple[str, str], fmt="{:.1f}"):
        def f(x):
            return "n/a" if x is None else fmt.format(x)

        rows.append({
            "hardware": hw, "model": model, "workload": wl, "metric": metric,
            "virtual": f(vals.get("virtual")), "paged": f(vals.get("paged")),
            "hf": f(vals.get("hf")), "vllm": f(vals.get("vllm")),
            "virtual_vs_paged": ratio_keys[0], "virtual_vs_hf": ratio_keys[1],
            "virtual_vs_vllm": ratio_keys[2] if len(ratio_keys) > 2 else "n/a",
        })  # fmt: skip

    for key, w in results.get("workloads", {}).items():
        rt = w.get("ratios", {})

        def rs(k, rt=rt):
            return "n/a" if rt.get(k) is None else f"{rt[k]:.2f}x"

        off = {s: r for s, r in w.get("offline", {}).items() if "error" not in r}
        if off:
            row(
                key,
                "offline output tok/s (higher better)",
                {s: r.get("output_tokens_per_s") for s, r in off.items()},
                (rs("offline_throughput_vs_paged"), rs("offline_throughput_vs_hf"),
                 rs("offline_throughput_vs_vllm")),
            )
            mkey = (
                "device_used_peak"
                if any((r.get("memory") or {}).get("device_used_peak") for r in off.values())
                else "host_rss_peak"
            )
            row(
                key,
                f"peak memory GiB ({'GPU' if mkey == 'device_used_peak' else 'RSS'}, lower better)",
                {
                    s: ((r.get("memory") or {}).get(mkey) or 0) / 2**30 or None
                    for s, r in off.items()
                },
                (rs("peak_memory_saving_vs_paged"), rs("peak_memory_saving_vs_hf"),
                 rs("peak_memory_saving_vs_vllm")),
                "{:.2f}",
            )
            pool = {s: _ratio((r.get("memory") or {}).get("device_used_peak"),
                              (r.get("memory") or {}).get("vllm_preallocated"))
                    for s, r in off.items()}  # fmt: skip
            if any(v is not None for v in pool.values()):
                row(
                    key,
                    "peak GPU memory, % of a vLLM-style 90% pool",
                    {s: None if v is None else 100 * v for s, v in pool.items()},
                    ("", ""),
                )
            kv = {s: (r.get("memory") or {}).get("kv_physical_peak") for s, r in off.items()}
            if any(kv.values()):
                row(key, "KV physical peak GiB (lower better)",
                    {s: v / 2**30 if v else None for s, v in kv.items()},
                    (rs("kv_memory_saving_vs_paged"), "n/a"), "{:.3f}")  # fmt: skip
        on = {s: r for s, r in w.get("online", {}).items() if r.get("num_ok")}
        if on:
            for m, q, label in (
                ("ttft_ms", "p50", "TTFT p50 ms"),
                ("tpot_ms", "p50", "TPOT p50 ms"),
                ("e2e_ms", "p99", "E2E p99 ms"),
            ):
                row(
                    key,
                    f"online {label} (lower better)",
                    {s: r[m].get(q) for s, r in on.items()},
                    (rs(f"online_{m[:-3]}_{q}_vs_paged"), "n/a",
                     rs(f"online_{m[:-3]}_{q}_vs_vllm")),
                )
            row(key, "online goodput req/s (higher better)",
                {s: r.get("goodput_rps") for s, r in on.items()},
                (rs("online_goodput_vs_paged"), "n/a", rs("online_goodput_vs_vllm")),
                "{:.2f}")  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = ["hardware", "model", "workload", "metric", "virtual", "paged", "hf", "vllm",
            "virtual_vs_paged", "virtual_vs_hf", "virtual_vs_vllm"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
