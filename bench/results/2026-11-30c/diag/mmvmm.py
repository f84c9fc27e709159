"""Do VMM maps (mapper thread or inline) slow kernel launches on the main thread?"""
import time, torch
from vtensor.engine import LLMEngine
eng = LLMEngine(model="llama-3-8b", load_format="dummy", dtype="bfloat16", max_model_len=2264)
kv = eng.kv_cache
w = eng.model.model.layers[0].mlp.gate_up_proj.weight
x = torch.randn(16000, 4096, device="cuda", dtype=torch.bfloat16)
slots = []
def maps(n_slots, tokens):
    for _ in range(n_slots):
        a = kv.acquire(f"r{len(slots)}", [len(slots) + 7] * 3)
        slots.append(a.slot)
        assert kv.ensure(a.slot, tokens)
    kv.apply(kv.take_plan())
def loop(label, before=None, each=None, n=24):
    torch.cuda.synchronize()
    for _ in range(10): torch.mm(x, w.t())  # GPU busy ~10 ms
    if before: before()
    host = []
    t0 = time.perf_counter()
    for i in range(n):
        if each: each()
        t = time.perf_counter(); torch.mm(x, w.t()); host.append(time.perf_counter() - t)
    t1 = time.perf_counter()
    kv.wait_ready(); torch.cuda.synchronize(); t2 = time.perf_counter()
    host.sort()
    print(f"{label}: mm host ms median {1e3*host[n//2]:.3f} max {1e3*host[-1]:.2f} sum {1e3*sum(host):.1f}; loop {1e3*(t1-t0):.1f} ms, drain {1e3*(t2-t1):.1f} ms", flush=True)
with torch.inference_mode():
    loop("no maps")
    loop("mapper maps 1000 pages meanwhile", before=lambda: maps(8, 2000))
    loop("no maps again")
    loop("8 pages before each mm (async)", each=lambda: maps(1, 2000))
    for s in slots: kv.free(s)
    kv.apply(kv.take_plan())
    loop("unmaps of all of them meanwhile")
    slots.clear()
    loop("mapper maps 1000 pages again (pages exist now)", before=lambda: maps(8, 2000))
eng.close()
