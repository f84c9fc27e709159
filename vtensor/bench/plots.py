"""PNG plots of e2e results: one figure per (model, workload).

Panels: memory over time (device memory per system, KV bytes mapped vs bytes live tokens need,
the vLLM-style 90% preallocation line), offline throughput bars, and online latency bars
(TTFT / TPOT / end-to-end, p50 and p99) when an online run exists. Inputs are the JSON records
e2e.py writes, so plots can be redrawn from a results folder alone (`replot`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the H200 and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

GIB = 1024**3
COLORS = {"virtual": "tab:blue", "paged": "tab:orange", "hf": "tab:gray"}


def _gib(vals: list) -> list:
    return [None if v is None else v / GIB for v in vals]


def _mem_axis(ax, runs: dict, title: str) -> None:
    """Whole-device (or process) memory over time per system, and the vLLM-style pool line."""
    drawn = False
    pool = None
    for system, res in runs.items():
        cols = res.get("memory_series") or {}
        t = cols.get("t") or []
        if not t:
            continue
        used = cols.get("device_used") or []
        if any(v is not None for v in used):
            ax.plot(t, _gib(used), label=f"{system}: GPU used", color=COLORS.get(system))
        else:  # CPU run: the process RSS stands in for device memory
            ax.plot(t, _gib(cols.get("host_rss") or []), label=f"{system}: RSS",
                    color=COLORS.get(system))  # fmt: skip
        drawn = True
        pool = pool or (res.get("memory") or {}).get("vllm_preallocated")
    if pool:
        ax.axhline(pool / GIB, color="red", lw=1, label="vLLM-style pool (90% of GPU)")
    ax.set_title(title)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GiB")
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no memory samples", ha="center", transform=ax.transAxes)


def _kv_axis(ax, runs: dict, title: str) -> None:
    """KV memory: physical (paged: the whole preallocated pool) or mapped, vs what the live
    tokens need; pages in use where only page counts exist (server /metrics)."""
    lines = []  # (t, values, style, label, color)
    for system, res in runs.items():
        cols = res.get("memory_series") or {}
        t = cols.get("t") or []
        for key, style, label in (("kv_physical_bytes", "-", "KV physical"),
                                  ("kv_mapped_bytes", "--", "KV mapped"),
                                  ("kv_live_bytes", ":", "KV live tokens")):  # fmt: skip
            vals = cols.get(key) or []
            if any(v is not None for v in vals):
                lines.append((t, vals, style, f"{system}: {label}", COLORS.get(system)))
    unit, scale = "GiB", GIB
    if lines:
        peak = max(v for _, vals, *_ in lines for v in vals if v is not None)
        if peak < GIB:
            unit, scale = "MiB", 2**20
    else:  # page counts only
        for system, res in runs.items():
            cols = res.get("memory_series") or {}
            pages = cols.get("kv_pages_in_use") or []
            if any(v is not None for v in pages):
                lines.append((cols["t"], pages, "-", f"{system}: KV pages in use",
                              COLORS.get(system)))  # fmt: skip
        unit, scale = "pages", 1
    for t, vals, style, label, color in lines:
        ax.plot(t, [None if v is None else v / scale for v in vals], style, label=label,
                color=color)  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("time (s)")
    if lines:
        ax.set_ylabel(unit)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no KV telemetry", ha="center", transform=ax.transAxes)


def _bars(ax, names: list[str], values: list, title: str, ylabel: str) -> None:
    xs = range(len(names))
    vals = [0.0 if v is None else v for v in values]
    bars = ax.bar(xs, vals, color=[COLORS.get(n, "tab:green") for n in names])
    for b, v in zip(bars, values, strict=True):
        label = "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
        ax.annotate(
            label,
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(list(xs), names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def _latency_axis(ax, online: dict) -> None:
    systems = list(online)
    metrics = [("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p99")]
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        res = online[system]
        vals = [((res.get(m) or {}).get(p) or 0.0) for m, p in metrics]
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, vals, width, label=system, color=COLORS.get(system))
    ax.set_xticks(
        [j + width * (len(systems) - 1) / 2 for j in range(len(metrics))],
        [f"{m.split('_')[0].upper()} {p}" for m, p in metrics],
    )
    ax.set_ylabel("ms (lower is better)")
    ax.set_title("online latency")
    ax.set_yscale("log")
    ax.legend(fontsize=7)


def _timeline_axes(ax_time, ax_cdf, online: dict) -> None:
    """TTFT of each request against when it was sent, and TTFT's distribution: is a tail
    one burst (a stall) or spread over the run (a policy)?"""
    for system, res in online.items():
        tl = res.get("timeline") or {}
        sent, ttft = tl.get("sent_s", []), tl.get("ttft_ms", [])
        pts = [(t, v) for t, v in zip(sent, ttft, strict=True) if v]
        if not pts:
            continue
        ax_time.scatter([t for t, _ in pts], [v for _, v in pts], s=4, label=system,
                        color=COLORS.get(system))  # fmt: skip
        vs = sorted(v for _, v in pts)
        ax_cdf.plot(vs, [(i + 1) / len(vs) for i in range(len(vs))], label=system,
                    color=COLORS.get(system))  # fmt: skip
    ax_time.set_xlabel("sent at, s")
    ax_time.set_ylabel("TTFT ms")
    ax_time.set_title("TTFT by sending time")
    ax_time.legend(fontsize=7)
    ax_cdf.set_xlabel("TTFT ms")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("TTFT distribution")
    ax_cdf.legend(fontsize=7)


def plot_workload(model: str, workload: str, wres: dict, path: str | os.PathLike) -> str:
    """One PNG for one workload's results (`wres` = results["workloads"][workload])."""
    offline = {k: v for k, v in (wres.get("offline") or {}).items() if "error" not in v}
    online = {k: v for k, v in (wres.get("online") or {}).items() if "error" not in v}
    timelines = any(r.get("timeline") for r in online.values())
    # a row per part there is: offline (or nothing at all), online, its TTFT timeline
    rows = [r for r, on in (("offline", offline or not online), ("online", online),
                            ("timeline", timelines)) if on]  # fmt: skip
    fig, grid = plt.subplots(len(rows), 3, figsize=(16, 4.2 * len(rows)), squeeze=False)
    axes = dict(zip(rows, grid, strict=True))
    if "offline" in axes:
        ax = axes["offline"]
        _mem_axis(ax[0], offline, f"{model} / {workload}: memory (offline)")
        _kv_axis(ax[1], offline, "KV cache (offline)")
        names = list(offline)
        _bars(ax[2], names, [offline[n].get("output_tokens_per_s") for n in names],
              "offline throughput", "output tokens/s (higher is better)")  # fmt: skip
    if online:
        ax = axes["online"]
        title = "memory (online, server process)"
        _mem_axis(ax[0], online, title if "offline" in axes else f"{model} / {workload}: {title}")
        _kv_axis(ax[1], online, "KV cache (online)")
        _latency_axis(ax[2], online)
    if timelines:
        ax = axes["timeline"]
        _timeline_axes(ax[0], ax[1], online)
        ax[2].axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def plot_results(results: dict, out_dir: str | os.PathLike) -> list[str]:
    """Every workload of one e2e results dict -> `<out_dir>/<model>_<workload>.png`."""
    model = results.get("model_name") or results.get("model") or "model"
    paths = []
    for wname, wres in (results.get("workloads") or {}).items():
        safe = f"{model}_{wname}".replace("/", "_").replace(" ", "_")
        paths.append(plot_workload(model, wname, wres, Path(out_dir) / f"{safe}.png"))
    return paths


def replot(json_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[str]:
    with open(json_path) as f:
        results = json.load(f)
    return plot_results(results, out_dir or Path(json_path).parent)
