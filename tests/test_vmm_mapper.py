"""The asynchronous mapper: tickets, errors, wait accounting, deferred (event-gated) unmap."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from vtensor.vmm import Mapper, PagePool, Ticket, VirtualTensor, VmmError, make_backend

PAGE = 64 << 10


class FakeEvent:
    """Stands in for a CUDA event on host: synchronize() blocks until `fire()`."""

    def __init__(self) -> None:
        self._gate = threading.Event()
        self.synced = False

    def fire(self) -> None:
        self._gate.set()

    def synchronize(self) -> None:
        assert self._gate.wait(10), "event never fired"
        self.synced = True

    def query(self) -> bool:
        return self._gate.is_set()


@pytest.fixture
def env():
    b = make_backend("host", PAGE)
    pool = PagePool(b, grow_batch=4)
    m = Mapper()
    yield b, pool, m
    m.close()
    b.close()


def test_async_map_tickets_and_data(env):
    b, pool, m = env
    vt = VirtualTensor(pool, 8 * PAGE, mapper=m)
    tickets = [vt.map(i, i + 1) for i in range(8)]
    assert vt.num_mapped() == 8  # bookkeeping is synchronous
    tickets[-1].wait()
    assert all(t.done() for t in tickets)  # FIFO: the last done means all done
    x = vt.view(torch.float32, (8 * PAGE // 4,))
    ref = torch.randn(x.numel(), generator=torch.Generator().manual_seed(0))
    x.copy_(ref)
    assert torch.equal(x, ref)
    assert m.executed == m.submitted == 8
    vt.close()
    assert b.stats()["mapped_pages"] == 0
    pool.close()


def test_ticket_wait_accumulates_wait_seconds(env):
    _, _, m = env
    assert Ticket.completed().done()
    t = m.submit(lambda: time.sleep(0.05))
    t.wait()
    assert 0.03 < m.wait_seconds < 2.0
    w = m.wait_seconds
    t.wait()  # already done: no more waiting counted
    assert m.wait_seconds == w


def test_error_surfaces_at_wait_and_next_submit(env):
    _, _, m = env

    def boom() -> None:
        raise RuntimeError("driver exploded")

    t = m.submit(boom)
    with pytest.raises(RuntimeError, match="driver exploded"):
        t.wait()
    with pytest.raises(VmmError, match="earlier mapper work failed"):
        m.submit(lambda: None)
    m.submit(lambda: None).wait()  # reported once; the mapper keeps working


def test_backend_error_in_thread_reaches_the_ticket(env):
    b, pool, m = env
    vt = VirtualTensor(pool, 2 * PAGE, mapper=m)
    t = m.submit(lambda: b.unmap(vt.addr))  # nothing mapped there
    with pytest.raises(VmmError, match="not mapped"):
        t.wait()
    with pytest.raises(VmmError):
        m.submit(lambda: None)
    vt.close()
    pool.close()


def test_close_drains_queue():
    m = Mapper()
    done = []
    for i in range(5):
        m.submit(lambda i=i: (time.sleep(0.005), done.append(i)))
    m.close()
    assert done == list(range(5))
    with pytest.raises(VmmError):
        m.submit(lambda: None)


def _done_within(t: Ticket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not t.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    return t.done()


# pause: the mapper, idle, has already come to the unmap whose event is not reached yet; it
# must not block in it, or a map submitted meanwhile (the next step's) waits for the GPU too
@pytest.mark.parametrize("pause", [0.0, 0.05])
def test_deferred_unmap_waits_for_event_but_not_maps_elsewhere(env, pause):
    b, pool, m = env
    a = VirtualTensor(pool, 2 * PAGE, mapper=m)
    c = VirtualTensor(pool, 2 * PAGE, mapper=m)
    a.map(0, 1).wait()
    av = a.view(torch.int64, (PAGE // 8,))
    av.copy_(torch.arange(PAGE // 8))
    page = a.page(0)
    ev = FakeEvent()
    t_unmap = a.unmap(0, 1, after=ev)  # a "kernel" still reads page 0 until ev fires
    assert not a.is_mapped(0) and page.refcount == 0  # bookkeeping: already returned
    time.sleep(pause)
    t_map = c.map(0, 1)  # LIFO: gets the very same physical page, at another address
    assert c.page(0) is page
    assert _done_within(t_map, 5)  # the new owner's map does not wait for the old's event
    assert not t_unmap.done() and not ev.synced
    assert b.stats()["mapped_pages"] == 2  # aliased at both addresses for now
    assert torch.equal(av, torch.arange(PAGE // 8))  # the in-flight reader still sees its data
    cv = c.view(torch.int64, (PAGE // 8,))
    assert torch.equal(cv, torch.arange(PAGE // 8))  # same physical page, same bytes
    ev.fire()
    t_unmap.wait()
    assert ev.synced and b.stats()["mapped_pages"] == 1
    a.close()
    c.close()
    pool.close()


def test_map_at_an_address_waits_for_its_pending_unmap(env):
    b, pool, m = env
    a = VirtualTensor(pool, 2 * PAGE, mapper=m)
    a.map(0, 2).wait()
    ev = FakeEvent()
    t_unmap = a.unmap(0, 1, after=ev)
    t_map = a.map(0, 1)  # same address: must come after the unmap, hence after the event
    time.sleep(0.05)
    assert not t_unmap.done() and not t_map.done()
    ev.fire()
    t_map.wait()
    assert t_unmap.done() and a.is_mapped(0) and b.stats()["mapped_pages"] == 2
    v = a.view(torch.int64, (2 * PAGE // 8,))
    v.fill_(7)  # both pages really mapped (a late unmap would make this fault)
    m.flush()
    assert int(v.sum()) == 7 * (2 * PAGE // 8)
    a.close()
    pool.close()


def test_close_runs_pending_lazy_unmaps_first(env):
    b, pool, m = env
    a = VirtualTensor(pool, 4 * PAGE, mapper=m)
    a.map(0, 4).wait()
    ev = FakeEvent()
    a.unmap(1, 3, after=ev)
    threading.Timer(0.05, ev.fire).start()
    a.close()
    assert ev.synced and b.stats()["mapped_pages"] == 0
    pool.close()


def test_trim_drains_deferred_unmaps(env):
    b, pool, m = env
    vt = VirtualTensor(pool, 4 * PAGE, mapper=m)
    vt.map(0, 4).wait()
    ev = FakeEvent()
    vt.unmap(0, 4, after=ev)
    threading.Timer(0.05, ev.fire).start()
    # trim must not release pages the driver still maps: it waits for the queue first
    assert pool.trim() == 4
    assert ev.synced and b.stats()["mapped_pages"] == 0 and b.stats()["handles"] == 0
    vt.close()
    pool.close()


def test_sync_unmap_with_event_waits_inline():
    b = make_backend("host", PAGE)
    pool = PagePool(b)
    vt = VirtualTensor(pool, PAGE)  # no mapper: driver work runs in the caller
    vt.map(0, 1)
    ev = FakeEvent()
    threading.Timer(0.02, ev.fire).start()
    t = vt.unmap(0, 1, after=ev)
    assert t.done() and ev.synced and b.stats()["mapped_pages"] == 0
    vt.close()
    pool.close()
    b.close()


def test_host_maps_keep_pace_while_another_thread_runs_python():
    """The host backend's libc calls keep the GIL (ctypes.PyDLL): released per call, a mapping
    thread waited up to a switch interval (5 ms) for it after every mmap while the main
    thread ran Python, 2.4-7 ms a page (bench/results/2026-11-30d/host_vmm); held, ~10-30 us."""
    b = make_backend("host", 64 << 10)
    pool = PagePool(b, grow_batch=32)
    pages = pool.alloc(32)
    handles = [p.handle for p in pages]
    addrs = [b.reserve(32 * b.page_size) for _ in range(4)]
    elapsed: list[float] = []

    def work(part: list[int]) -> None:
        t0 = time.perf_counter()
        for a in part:
            b.map_range(a, handles)
        elapsed.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=work, args=(addrs[i::2],)) for i in range(2)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):  # the main thread busy in Python meanwhile
        sum(i * i for i in range(2000))
    for w in workers:
        w.join()
    us_per_page = 1e6 * max(elapsed) / (2 * 32)
    assert us_per_page < 1000, f"{us_per_page:.0f} us per page map under a Python-busy thread"
    for a in addrs:
        for i in range(32):
            b.unmap(a + i * b.page_size)
        b.free_reservation(a, 32 * b.page_size)
    for p in pages:
        pool.decref(p)
    pool.close()
    b.close()
