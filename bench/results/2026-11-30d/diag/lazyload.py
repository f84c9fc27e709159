"""Does a GEMM whose M the process has not seen block the host until the GPU drains?
(CUDA lazy module loading: the first launch of a kernel loads it, which can wait for queued
work.) Queue ~GPU-busy GEMMs, then time on the host one lm_head-shaped and one gate_up-shaped
mm per M; repeated Ms are the control. Run with CUDA_MODULE_LOADING=LAZY (default) and EAGER."""

import os
import time

import torch

t0 = time.perf_counter()
torch.cuda.init()
free0, total = torch.cuda.mem_get_info()
dev = "cuda"
big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
torch.mm(big, big)
torch.cuda.synchronize()
print(f"mode {os.environ.get('CUDA_MODULE_LOADING', 'default')}: init+first mm "
      f"{time.perf_counter() - t0:.2f} s, device memory used {(total - free0) / 2**30:.2f} GiB "
      f"(after init) {(total - torch.cuda.mem_get_info()[0]) / 2**30:.2f} GiB (after first mm)")
shapes = {"lm_head": torch.randn(128256, 4096, device=dev, dtype=torch.bfloat16) * 0.01,
          "gate_up": torch.randn(28672, 4096, device=dev, dtype=torch.bfloat16) * 0.01}


def busy(n: int = 30) -> None:
    for _ in range(n):
        torch.mm(big, big)


torch.cuda.synchronize()
s = time.perf_counter()
busy()
torch.cuda.synchronize()
print(f"busy queue: {1e3 * (time.perf_counter() - s):.1f} ms of GPU work")
ms = [1, 7, 64, 88, 180, 295, 399, 485, 596, 674, 770, 864, 931, 1000, 88, 180, 931,
      333, 3000, 9000, 13486, 14417, 16384, 16296, 3000, 16384]
for name, w in shapes.items():
    for m in ms:
        h = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        busy()
        a = time.perf_counter()
        torch.mm(h, w.t())
        b = time.perf_counter()
        torch.cuda.synchronize()
        print(f"{name:8s} M={m:6d}: host {1e3 * (b - a):8.3f} ms")
