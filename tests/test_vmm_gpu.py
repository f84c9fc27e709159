"""CudaBackend only: torch kernels on virtual tensor views, device memory elasticity, driver
errors, deferred unmap behind a real CUDA event, CUDA graphs surviving remaps.
(The behaviour tests of test_vmm.py also run on CUDA through their `cuda` parameter.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtensor.vmm import DriverError, Mapper, PagePool, VirtualTensor, make_backend

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_backend():
    b = make_backend("cuda")
    yield b
    b.close()


def _randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def test_matmul_reads_and_writes_virtual_views(cuda_backend):
    b = cuda_backend
    pool = PagePool(b)
    ps = b.page_size
    vt = VirtualTensor(pool, 6 * ps)
    other = VirtualTensor(pool, 2 * ps)
    vt.map(1, 5).wait()
    other.map_pages(0, [vt.page(3), vt.page(4)]).wait()  # B lives in aliased pages
    m, k, n = 256, 384, 512
    a = vt.view(torch.float32, (m, k), offset_bytes=ps)
    bm = other.view(torch.float32, (k, n))  # same bytes as vt pages 3..4
    c = vt.view(torch.float32, (m, n), offset_bytes=2 * ps)
    a_ref, b_ref = _randn((m, k), 0), _randn((k, n), 1)
    a.copy_(a_ref.to(a))
    bm.copy_(b_ref.to(bm))
    torch.matmul(a, bm, out=c)
    ref = a_ref.double() @ b_ref.double()
    torch.testing.assert_close(c.cpu().double(), ref, rtol=2e-3, atol=2e-3)
    # the result is visible through the alias too (c's bytes do not overlap pages 3..4)
    b_alias = vt.view(torch.float32, (k, n), offset_bytes=3 * ps)
    torch.testing.assert_close(b_alias.cpu().double(), b_ref.double())
    other.close()
    vt.close()
    pool.close()


def test_sdpa_on_virtual_views(cuda_backend):
    b = cuda_backend
    pool = PagePool(b)
    ps = b.page_size
    bsz, h, lq, lk, d = 2, 4, 64, 192, 64
    nbytes = 2 * bsz * h * (lq + 2 * lk) * d * 2 + 4 * ps
    vt = VirtualTensor(pool, nbytes)
    off, views, refs = 0, [], []
    for i, L in enumerate((lq, lk, lk, lq)):  # q, k, v, out: each on its own page range
        shape = (bsz, h, L, d)
        views.append(vt.view(torch.float16, shape, offset_bytes=off))
        refs.append(_randn(shape, 10 + i, torch.float16))
        off += -(-(bsz * h * L * d * 2) // ps) * ps
    vt.ensure_mapped(0, off).wait()
    q, k, v, out = views
    for view, ref in zip(views[:3], refs[:3], strict=True):
        view.copy_(ref.to(view.device))
    out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=False))
    qd, kd, vd = (r.double() for r in refs[:3])
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / d**0.5, dim=-1) @ vd
    torch.testing.assert_close(out.cpu().double(), ref, rtol=5e-3, atol=5e-3)
    vt.close()
    pool.close()


def test_trim_returns_device_memory(cuda_backend):
    b = cuda_backend
    pool = PagePool(b, grow_batch=64)
    vt = VirtualTensor(pool, 64 * b.page_size)
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    vt.map(0, 64).wait()
    vt.view(torch.uint8, (64 * b.page_size,)).fill_(1)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert free0 - free1 >= 60 * b.page_size
    vt.unmap(0, 64)
    assert pool.trim() == 64
    free2, _ = torch.cuda.mem_get_info()
    assert free2 - free1 >= 60 * b.page_size  # really back with the driver
    vt.close()
    pool.close()


def test_driver_error_carries_the_driver_name(cuda_backend):
    b = cuda_backend
    with pytest.raises(DriverError) as ei:
        b._call("cuMemUnmap", b._cu.cuMemUnmap(0, b.page_size))
    assert ei.value.name.startswith("CUDA_ERROR_"), ei.value.name


def test_deferred_unmap_waits_for_the_kernel(cuda_backend):
    b = cuda_backend
    pool = PagePool(b)
    m = Mapper()
    vt = VirtualTensor(pool, 2 * b.page_size, mapper=m)
    vt.map(0, 1).wait()
    x = vt.view(torch.float32, (b.page_size // 4,))
    x.copy_(_randn((x.numel(),), 3).cuda())
    expected = x.double().sum().item()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the read
    total = x.double().sum()  # queued behind the sleep: reads the page later
    ev = b.record_event()
    t = vt.unmap(0, 1, after=ev)
    t.wait()  # the mapper waited for the event, then unmapped
    assert ev.query()  # the kernel had finished before the unmap
    assert abs(total.item() - expected) < 1e-6 * max(1.0, abs(expected))
    assert b.stats()["mapped_pages"] == 0
    vt.close()
    m.close()
    pool.close()


def test_cuda_graph_survives_remap(cuda_backend):
    b = cuda_backend
    pool = PagePool(b)
    n = b.page_size // 4
    vt = VirtualTensor(pool, b.page_size)
    src = VirtualTensor(pool, 2 * b.page_size)
    src.map(0, 2).wait()
    s0, s1 = (src.view(torch.float32, (n,), offset_bytes=i * b.page_size) for i in range(2))
    s0.fill_(1.5)
    s1.fill_(-2.0)
    vt.map_pages(0, [src.page(0)]).wait()
    x = vt.view(torch.float32, (n,))
    out = torch.empty(n, device=b.device)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(x * 2)  # warm-up on the side stream
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            out.copy_(x * 2)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert bool((out == 3.0).all())
    vt.unmap(0, 1, after=b.record_event()).wait()
    vt.map_pages(0, [src.page(1)]).wait()  # same virtual address, other physical page
    g.replay()
    torch.cuda.synchronize()
    assert bool((out == -4.0).all())
    del g
    vt.close()
    src.close()
    pool.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_backend_on_second_device():
    with torch.cuda.device(1):
        b = make_backend("auto")
    assert b.device == torch.device("cuda", 1)
    pool = PagePool(b)
    m = Mapper()
    vt = VirtualTensor(pool, b.page_size, mapper=m)
    vt.map(0, 1).wait()
    x = vt.view(torch.float32, (16,))
    assert x.device == torch.device("cuda", 1)
    x.copy_(torch.arange(16.0))
    assert torch.equal(x.cpu(), torch.arange(16.0))
    vt.close()
    m.close()
    pool.close()
    b.close()


def test_held_gil_driver_maps_aliases_and_unmaps():
    """CudaBackend(held_gil=True) (libcuda through ctypes.PyDLL): data written through one
    mapping reads back through an alias, unmaps return every page, and a bad map reports a
    DriverError as the cuda-bindings path does."""
    from vtensor.vmm.cuda import CudaBackend

    b = CudaBackend(held_gil=True)
    pool = PagePool(b)
    ps = b.page_size
    vt, alias = VirtualTensor(pool, 4 * ps), VirtualTensor(pool, 2 * ps)
    vt.map(0, 4).wait()
    alias.map_pages(0, [vt.page(2), vt.page(3)]).wait()
    ref = _randn((2 * ps // 4,), 3)
    vt.view(torch.float32, (2 * ps // 4,), offset_bytes=2 * ps).copy_(ref.to("cuda"))
    torch.testing.assert_close(alias.view(torch.float32, (2 * ps // 4,)).cpu(), ref)
    alias.unmap(0, 2).wait()
    vt.unmap(0, 4).wait()
    assert pool.num_in_use() == 0
    page = pool.alloc(1)[0]
    with pytest.raises(DriverError):
        b.map_only(b.granularity // 2 + 1, b._objs[page.handle])  # misaligned address
    pool.decref(page)
    alias.close()
    vt.close()
    pool.close()
    b.close()


def test_min_page_size_rounds_up_to_the_granularity():
    """The engine asks for pages of >= KV_PAGE_TOKENS tokens; the backend rounds that up to
    whole granules, and never below one."""
    from vtensor.vmm.cuda import CudaBackend

    small = CudaBackend()
    g = small.granularity
    small.close()
    for want, pages in ((None, 1), (1, 1), (g, 1), (g + 1, 2), (3 * g + 5, 4)):
        b = CudaBackend(min_page_size=want)
        assert b.page_size == pages * g
        b.close()
    b = CudaBackend(page_size=2 * g, min_page_size=8 * g)  # an explicit size wins
    assert b.page_size == 2 * g
    b.close()
