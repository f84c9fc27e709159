"""Print one online run's latency split and trace summary (e2e JSON path as argv[1])."""
import json
import sys

d = json.load(open(sys.argv[1]))
for wname, w in d["workloads"].items():
    for system, r in (w.get("online") or {}).items():
        e, tr = r.get("engine") or {}, r.get("trace") or {}
        print(f"{wname}/{system}: tok/s {r['output_tokens_per_s']:.0f}, TTFT p50/p99 "
              f"{r['ttft_ms']['p50']:.1f}/{r['ttft_ms']['p99']:.1f}, TPOT p50/p99 "
              f"{r['tpot_ms']['p50']:.2f}/{r['tpot_ms']['p99']:.2f}, client lag p50/p99 "
              f"{r['client_loop_lag_ms']['p50']:.1f}/{r['client_loop_lag_ms']['p99']:.1f}")
        print("  engine", {k: v for k, v in e.items() if k.endswith(("p50", "p99"))},
              e.get("host_ms_per_step"))
        if tr:
            print("  trace steps", tr["steps"], "step ms", {k: round(v, 1) for k, v in
                  tr["step_ms"].items()}, "gc engine", tr["gc_engine"], "gc server",
                  tr["gc_server"], "server stalls", tr["server_loop_stalls"],
                  tr["server_loop_stall_ms_total"])
            for s in tr["longest_steps"][:3]:
                print("   step", s)
            for s in tr["longest_server_stalls"][:3]:
                print("   stall", s)
