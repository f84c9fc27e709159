"""Host time of torch.mm per call: distinct M every call vs a repeated M (cuBLASLt heuristics)."""
import time, torch
w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16)
x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
torch.mm(x, w.t()); torch.cuda.synchronize()
for label, ms in (("same M", [16000] * 20), ("distinct M", list(range(15000, 15020))),
                  ("distinct M again", list(range(15000, 15020))), ("new distinct", list(range(14000, 14040, 2)))):
    torch.cuda.synchronize()
    host = []
    for m in ms:
        t = time.perf_counter(); torch.mm(x[:m], w.t()); host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    host.sort()
    print(f"{label}: host ms per mm median {1e3*host[len(host)//2]:.3f} max {1e3*host[-1]:.3f}", flush=True)
