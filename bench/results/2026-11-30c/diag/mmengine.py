"""Host time per linear call inside a built engine (KV reserved, graphs captured)."""
import time, torch
from vtensor.engine import LLMEngine
eng = LLMEngine(model="llama-3-8b", load_format="dummy", dtype="bfloat16", max_model_len=2264)
layer = eng.model.model.layers[0]
x = torch.randn(16000, 4096, device="cuda", dtype=torch.bfloat16)
def run(label, fn, n=24, busy=False):
    torch.cuda.synchronize()
    if busy:
        for _ in range(30): torch.mm(x, layer.mlp.gate_up_proj.weight.t())
    host = []
    for i in range(n):
        t = time.perf_counter(); fn(i); host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    host.sort()
    print(f"{label}: host ms median {1e3*host[n//2]:.3f} max {1e3*host[-1]:.3f} sum {1e3*sum(host):.1f}", flush=True)
with torch.inference_mode():
    run("linear same M", lambda i: layer.mlp.gate_up_proj(x))
    run("linear same M, GPU busy", lambda i: layer.mlp.gate_up_proj(x), busy=True)
    run("linear M varies", lambda i: layer.mlp.gate_up_proj(x[: 15000 + i]))
    run("linear M varies, GPU busy", lambda i: layer.mlp.gate_up_proj(x[: 14000 + i]), busy=True)
    run("qkv+o+gate_up+down same M, GPU busy", lambda i: (layer.self_attn.qkv_proj(x), layer.self_attn.o_proj(x), layer.mlp.down_proj(torch.empty(16000, 14336, device="cuda", dtype=torch.bfloat16))), busy=True)
print("mem", torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30, torch.cuda.mem_get_info())
eng.close()
