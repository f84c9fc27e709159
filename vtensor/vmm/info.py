"""`vtensor info`: backend, device, page granularity, page pool state, library versions."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto", choices=["auto", "host", "cuda"])
    parser.add_argument("--page-size", type=int, default=None, help="bytes (host only)")
    parser.add_argument("--pages", type=int, default=4, help="pages to create as a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect(backend: str = "auto", page_size: int | None = None, pages: int = 4) -> dict:
    """Make a backend, map `pages` pages through a VirtualTensor, report what happened."""
    from vtensor.vmm import PagePool, VirtualTensor, make_backend

    b = make_backend(backend, page_size)
    try:
        pool = PagePool(b, grow_batch=max(pages, 1))
        vt = VirtualTensor(pool, max(pages, 1) * b.page_size)
        vt.map(0, pages).wait()
        mapped_ok = True
        if pages:
            v = vt.view(torch.uint8, (pages * b.page_size,))
            v.fill_(7)
            mapped_ok = bool((v == 7).all().item())
        pool_after_map = pool.stats()
        vt.close()
        pool.trim()
        info = {
            "backend": b.name,
            "device": str(b.device),
            "device_name": getattr(b, "device_name", str(b.device)),
            "page_size": b.page_size,
            "granularity": getattr(b, "granularity", b.page_size),
            "smoke_test_pages": pages,
            "smoke_test_ok": mapped_ok,
            "pool_after_map": pool_after_map,
            "pool_after_trim": pool.stats(),
        }
        pool.close()
    finally:
        b.close()
    info["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cuda-bindings": _version("cuda-bindings") or _version("cuda-python"),
        "vtensor": _version("vtensor"),
    }
    info["cuda_available"] = torch.cuda.is_available()
    return info


def run(args: argparse.Namespace) -> int:
    info = collect(args.backend, args.page_size, args.pages)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}")
        else:
            print(f"{k}: {v}")
    return 0
