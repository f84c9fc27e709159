"""VMM behaviour tests: HostBackend (64 KiB pages) on CPU, CudaBackend under `-m gpu`."""

from __future__ import annotations

import os

import pytest
import torch

from vtensor.vmm import (
    AlreadyMapped,
    Mapper,
    NotMapped,
    OutOfPages,
    OutOfRange,
    PagePool,
    VirtualTensor,
    VmmError,
    make_backend,
)

HOST_PAGE = 64 << 10


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    b = make_backend("host", HOST_PAGE) if request.param == "host" else make_backend("cuda")
    yield b
    b.close()


def _pool(b, pages=None, grow=4):
    return PagePool(b, None if pages is None else pages * b.page_size, grow_batch=grow)


def _rand(n: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(device)


def _floats(b) -> int:
    return b.page_size // 4


def test_map_on_demand_real_data(backend):
    pool = _pool(backend)
    vt = VirtualTensor(pool, 8 * backend.page_size)
    assert vt.num_pages == 8 and vt.addr % backend.page_size == 0
    f = _floats(backend)
    vt.map(2, 5).wait()
    assert [vt.is_mapped(i) for i in range(8)] == [False, False, True, True, True] + [False] * 3
    x = vt.view(torch.float32, (3, f), offset_bytes=2 * backend.page_size)
    assert x.device.type == backend.device.type
    ref = _rand(3 * f, backend.device, 0).view(3, f)
    x.copy_(ref)
    assert torch.equal(x, ref)
    vt.map(5, 6).wait()  # mapping more pages later leaves the earlier data alone
    vt.view(torch.float32, (f,), offset_bytes=5 * backend.page_size).fill_(3.0)
    assert torch.equal(x, ref)
    # whole-range view (base never moves) sees the same bytes
    whole = vt.view(torch.float32, (8, f))
    assert whole.data_ptr() == vt.addr
    assert torch.equal(whole[2:5], ref)
    assert bool((whole[5] == 3.0).all())
    assert pool.stats()["in_use"] == 4
    vt.close()
    assert pool.stats()["in_use"] == 0
    pool.close()


def test_strided_view_matches_reference(backend):
    pool = _pool(backend)
    vt = VirtualTensor(pool, 2 * backend.page_size)
    vt.map(0, 2).wait()
    n = 2 * _floats(backend)
    flat = vt.view(torch.float32, (n,))
    flat.copy_(_rand(n, backend.device, 1))
    shape, strides = (4, 3, 8), (n // 4, 8, 1)
    v = vt.view(torch.float32, shape, strides)
    assert torch.equal(v, flat.as_strided(shape, strides))
    with pytest.raises(OutOfRange):
        vt.view(torch.float32, (n + 1,))
    with pytest.raises(OutOfRange):
        vt.view(torch.float32, (4,), offset_bytes=2)
    vt.close()
    pool.close()


def test_alias_both_ways(backend):
    pool = _pool(backend)
    f = _floats(backend)
    a = VirtualTensor(pool, 4 * backend.page_size)
    b = VirtualTensor(pool, 6 * backend.page_size)
    a.map(0, 3).wait()
    shared = [a.page(1), a.page(2)]
    b.map_pages(3, shared).wait()
    assert all(p.refcount == 2 for p in shared)
    av = a.view(torch.float32, (2, f), offset_bytes=backend.page_size)
    bv = b.view(torch.float32, (2, f), offset_bytes=3 * backend.page_size)
    r1 = _rand(2 * f, backend.device, 2).view(2, f)
    av.copy_(r1)  # write through a, read through b
    assert torch.equal(bv, r1)
    r2 = _rand(2 * f, backend.device, 3).view(2, f)
    bv.copy_(r2)  # and the other way
    assert torch.equal(av, r2)
    a.unmap(0, 3)  # b still holds the shared pages: data survives
    assert [p.refcount for p in shared] == [1, 1]
    assert pool.stats()["in_use"] == 2
    assert torch.equal(bv, r2)
    b.unmap(3, 5)
    assert pool.stats()["in_use"] == 0 and pool.stats()["free"] == pool.stats()["live"]
    pool.check_integrity()
    a.close()
    b.close()
    pool.close()


def test_unmap_returns_pages_and_reuses_them(backend):
    pool = _pool(backend, grow=4)
    vt = VirtualTensor(pool, 8 * backend.page_size)
    vt.map(0, 3).wait()
    s = pool.stats()
    assert (s["created"], s["in_use"], s["free"]) == (4, 3, 1)
    pages = [vt.page(i) for i in range(3)]
    vt.unmap(0, 3).wait()
    assert all(p.refcount == 0 for p in pages)
    s = pool.stats()
    assert (s["in_use"], s["free"], s["created"]) == (0, 4, 4)
    vt.map(4, 8).wait()  # reuses the 4 free pages: nothing new created
    assert pool.stats()["created"] == 4 and pool.stats()["peak_in_use"] == 4
    assert {id(vt.page(i)) for i in range(4, 8)} >= {id(p) for p in pages}
    vt.map(0, 1).wait()  # grows by another batch
    assert pool.stats()["created"] == 8
    pool.check_integrity()
    vt.close()
    pool.close()


def test_misuse_raises_typed_errors_before_any_change(backend):
    pool = _pool(backend)
    vt = VirtualTensor(pool, 4 * backend.page_size)
    vt.map(1, 3).wait()
    before = pool.stats()
    with pytest.raises(AlreadyMapped):
        vt.map(1, 2)
    with pytest.raises(AlreadyMapped):
        vt.map(0, 2)  # partial overlap: page 0 must stay unmapped
    assert not vt.is_mapped(0) and pool.stats() == before
    with pytest.raises(NotMapped):
        vt.unmap(2, 4)  # page 3 unmapped: page 2 must stay mapped
    assert vt.is_mapped(2) and pool.stats() == before
    for first, last in [(-1, 1), (3, 5), (3, 2)]:
        with pytest.raises(OutOfRange):
            vt.map(first, last)
    with pytest.raises(OutOfRange):
        vt.page(4)
    with pytest.raises(OutOfRange):
        vt.is_mapped(-1)
    ps, b = backend.page_size, backend
    with pytest.raises(OutOfRange):
        b.map(vt.addr + ps // 2, vt.page(1).handle)  # misaligned
    with pytest.raises(OutOfRange):
        b.map(vt.addr + 4 * ps, vt.page(1).handle)  # past the reservation
    with pytest.raises(AlreadyMapped):
        b.map(vt.addr + ps, vt.page(1).handle)
    with pytest.raises(NotMapped):
        b.unmap(vt.addr)
    with pytest.raises(VmmError):
        b.map(vt.addr, 123456789)  # unknown handle
    other = VirtualTensor(pool, ps)
    page = vt.page(1)
    vt.unmap(1, 2)
    with pytest.raises(VmmError):
        other.map_pages(0, [page])  # page is free now: aliasing it is a bug
    assert pool.stats()["in_use"] == 1
    vt.close()
    other.close()
    with pytest.raises(VmmError):
        vt.map(0, 1)  # use after close
    pool.close()
    with pytest.raises(VmmError):
        pool.alloc(1)


def test_budget_exhaustion_leaves_state_unchanged(backend):
    pool = _pool(backend, pages=4, grow=16)  # grow batch is capped by the budget
    vt = VirtualTensor(pool, 8 * backend.page_size)
    vt.map(0, 3).wait()
    assert pool.stats()["created"] == 4
    before = pool.stats()
    with pytest.raises(OutOfPages):
        vt.map(3, 5)
    assert pool.stats() == before and not vt.is_mapped(3) and not vt.is_mapped(4)
    vt.map(3, 4).wait()
    with pytest.raises(OutOfPages):
        vt.map(4, 5)
    pool.trim()  # nothing idle: trimming cannot create room
    with pytest.raises(OutOfPages):
        vt.map(4, 5)
    vt.unmap(0, 2)
    vt.map(4, 6).wait()  # freed pages come back
    assert pool.stats()["in_use"] == 4 and pool.stats()["created"] == 4
    pool.check_integrity()
    vt.close()
    pool.close()


def test_trim_keep_free_and_reuse(backend):
    pool = _pool(backend, grow=8)
    vt = VirtualTensor(pool, 8 * backend.page_size)
    vt.map(0, 8).wait()
    vt.unmap(0, 8).wait()
    assert pool.trim(keep_free=3) == 5
    s = pool.stats()
    assert (s["free"], s["released"], s["live"]) == (3, 5, 3)
    vt.map(0, 5).wait()  # 3 reused + a new batch
    assert pool.stats()["created"] == 16
    pool.check_integrity()
    vt.close()
    assert pool.trim() == pool.stats()["released"] - 5
    assert pool.stats()["live"] == 0
    pool.close()


def test_trim_returns_memory_to_os():
    b = make_backend("host", HOST_PAGE)
    pool = PagePool(b, grow_batch=16)
    vt = VirtualTensor(pool, 16 * HOST_PAGE)
    vt.map(0, 16).wait()
    vt.view(torch.uint8, (16 * HOST_PAGE,)).fill_(0xAB)  # touch: memory now resident
    assert b.resident_bytes() >= 16 * HOST_PAGE
    vt.unmap(0, 16)
    assert b.resident_bytes() >= 16 * HOST_PAGE  # free pages stay (reused, not released)
    assert pool.trim(keep_free=4) == 12
    assert b.resident_bytes() <= 4 * HOST_PAGE  # punched holes: blocks really given back
    vt.map(0, 4).wait()  # the kept pages still hold their data
    assert bool((vt.view(torch.uint8, (4 * HOST_PAGE,)) == 0xAB).all())
    vt.close()
    pool.close()
    assert b.resident_bytes() == 0
    b.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_close_leaks_nothing():
    fds = _fds()
    b = make_backend("host", HOST_PAGE)
    pool = PagePool(b, budget_bytes=32 * HOST_PAGE, grow_batch=4)
    m = Mapper()
    a = VirtualTensor(pool, 8 * HOST_PAGE, mapper=m)
    c = VirtualTensor(pool, 8 * HOST_PAGE)
    a.map(0, 6).wait()
    c.map_pages(2, [a.page(i) for i in range(3)])
    c.map(5, 8)  # 6 created for a, then a batch of 4: 10 pages
    assert _fds() == fds + 1  # the memfd
    c.close()
    a.close()
    m.close()
    assert b.stats() == {"reservations": 0, "reserved_bytes": 0, "handles": 10, "mapped_pages": 0}
    pool.close()
    assert pool.stats()["live"] == 0 and pool.stats()["in_use"] == 0
    assert b.stats()["handles"] == 0 and b.resident_bytes() == 0
    b.close()
    assert _fds() == fds
    # a backend that is only garbage collected gives its fd back too
    b2 = make_backend("host", HOST_PAGE)
    b2.reserve(HOST_PAGE)
    del b2
    assert _fds() == fds


def test_pool_close_with_pages_in_use_is_an_error():
    b = make_backend("host", HOST_PAGE)
    pool = PagePool(b)
    vt = VirtualTensor(pool, HOST_PAGE)
    vt.map(0, 1)
    with pytest.raises(VmmError, match="still in use"):
        pool.close()
    b.close()


def test_host_backend_rejects_bad_page_size():
    with pytest.raises(ValueError):
        make_backend("host", 1000)
    with pytest.raises(ValueError):
        make_backend("tpu")


def test_ensure_mapped_byte_range(backend):
    pool = _pool(backend)
    ps = backend.page_size
    vt = VirtualTensor(pool, 6 * ps)
    vt.map(2, 3).wait()
    vt.ensure_mapped(ps + 10, 4 * ps + 1).wait()  # pages 1..4; page 2 already there
    assert [vt.is_mapped(i) for i in range(6)] == [False, True, True, True, True, False]
    assert pool.stats()["in_use"] == 4
    with pytest.raises(OutOfRange):
        vt.ensure_mapped(0, 6 * ps + 1)
    vt.close()
    pool.close()
