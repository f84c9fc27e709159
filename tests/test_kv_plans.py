"""Page plans (vtensor/kv/plan.py): scheduling calls record integers and touch no driver;
`apply` does the device work; the same plans applied to a second cache (a stand-in for a
tensor-parallel rank with its own pool and reservation) give the same pages and bytes."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from test_kv_cache import HOST_PAGE, HOST_SPEC, assert_kv, tpp_of, write_kv

from vtensor.kv import KVCache, PagePlan
from vtensor.kv.plan import Copy, Map, Release, SwapIn, SwapOut, Unmap
from vtensor.vmm import HostBackend


class CountingBackend(HostBackend):
    """A host backend that counts driver calls (from any thread)."""

    def __init__(self) -> None:
        super().__init__(page_size=HOST_PAGE)
        self.calls = {"create": 0, "map": 0, "unmap": 0, "release": 0}

    def create(self) -> int:
        self.calls["create"] += 1
        return super().create()

    def map(self, addr: int, handle: int) -> None:
        self.calls["map"] += 1
        super().map(addr, handle)

    def unmap(self, addr: int) -> None:
        self.calls["unmap"] += 1
        super().unmap(addr)

    def release(self, handle: int) -> None:
        self.calls["release"] += 1
        super().release(handle)


def make(backend: HostBackend | None = None, **kw) -> KVCache:
    backend = backend or HostBackend(page_size=HOST_PAGE)
    tpp = HOST_PAGE // HOST_SPEC.bytes_per_token
    kw.setdefault("budget_bytes", 24 * HOST_PAGE)
    return KVCache(HOST_SPEC, backend=backend, max_tokens=10 * tpp, num_slots=4, **kw)


def assert_ints(plan: PagePlan) -> None:
    """Every field of every op is an int (or a tuple of ints): nothing device-specific."""
    for op in plan.ops:
        for f in dataclasses.fields(op):
            v = getattr(op, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            assert all(type(x) in (int, bool) for x in vals), (op, f.name)


def test_scheduling_records_ints_and_no_driver_call_until_apply():
    be = CountingBackend()
    cache = make(be, async_map=False, idle_trim_seconds=0.0)
    tpp = int(tpp_of(cache))
    calls = dict(be.calls)

    def scheduled(plan_types: set[type]) -> PagePlan:
        assert be.calls == calls, "a scheduling call did driver work"
        plan = cache.take_plan()
        assert_ints(plan)
        assert plan_types <= {type(op) for op in plan.ops}, plan
        cache.apply(plan)
        cache.wait_ready()
        calls.update(be.calls)
        return plan

    a_tok = list(range(int(2.5 * tpp)))
    a = cache.acquire("a", a_tok)
    assert cache.ensure(a.slot, len(a_tok))
    plan = scheduled({Map})
    assert be.calls["map"] >= plan.num_maps() >= 3 and be.calls["create"] >= 3
    write_kv(cache, a.slot, a_tok, 0, len(a_tok))
    cache.cache_prefix(a.slot, a_tok)
    b_tok = a_tok[: int(1.5 * tpp)] + [7] * 9  # one aliased page + a partial copy
    b = cache.acquire("b", b_tok)
    assert cache.ensure(b.slot, len(b_tok))
    scheduled({Map, Copy})
    assert_kv(cache, b.slot, b_tok, int(1.5 * tpp))  # the copy ran at wait_ready
    cache.swap_out(b.slot)
    cache.release(a.slot, a_tok, park=False)
    scheduled({SwapOut, Unmap})
    assert be.calls["unmap"] > 0
    assert cache.swap_in(b.slot)
    scheduled({Map, SwapIn})
    assert_kv(cache, b.slot, b_tok, int(1.5 * tpp))
    cache.free(b.slot)
    cache.reset_prefix_cache()
    assert be.calls == calls
    assert cache.trim() > 0  # device side: records Release and applies the pending plan
    assert be.calls["release"] > 0 and be.calls["unmap"] > calls["unmap"]
    assert not cache.take_plan()
    cache.check_integrity()
    cache.close()


def test_unapplied_plan_leaves_the_device_untouched():
    """Accounting alone moves pages; the device follows only when the plan is applied."""
    cache = make(async_map=False)
    alloc = cache.acquire("a", [1, 2, 3])
    assert cache.ensure(alloc.slot, 200)
    assert cache.table.ids() and not cache.applier.ids()
    cache.apply(cache.take_plan())
    assert cache.applier.ids() == cache.table.ids()
    cache.free(alloc.slot)
    assert not cache.table.ids() and cache.applier.ids()
    cache.apply(cache.take_plan())
    assert not cache.applier.ids()
    cache.close()


def mirrored(primary: KVCache, rank1: KVCache) -> None:
    """Every plan `primary` applies (the scheduler's and its own trims) is applied on rank1
    too, and rank1 waits for its work at the same points: what a TP broadcast would do."""
    apply, wait = primary.apply, primary.wait_ready

    def apply_both(plan: PagePlan) -> None:
        apply(plan)
        rank1.apply(plan)

    def wait_both() -> None:
        rank1.wait_ready()  # before primary's trim in wait_ready sends a Release
        wait()

    primary.apply, primary.wait_ready = apply_both, wait_both  # type: ignore[method-assign]


@pytest.mark.parametrize("seed", range(4))
def test_plans_replay_on_a_second_cache(seed):
    """A random workload (prefix sharing with partial copies, parking, evictions, swaps,
    frees, trims) scheduled on one cache; every plan applied to it and to a second cache with
    its own backend. Both hold the same ids at the same pages and, after the same writes,
    the same bytes in every mapped page."""
    rng = random.Random(seed)
    a, b = make(idle_trim_seconds=0.0), make(idle_trim_seconds=0.0)
    mirrored(a, b)
    tpp = int(tpp_of(a))
    active: dict[int, list[int]] = {}  # slot -> tokens
    swapped: dict[int, list[int]] = {}
    history: list[list[int]] = []
    kinds: set[type] = set()
    real_apply = a.apply

    def record(plan: PagePlan) -> None:
        kinds.update(type(op) for op in plan.ops)
        real_apply(plan)

    a.apply = record  # type: ignore[method-assign]
    for step in range(120):
        op = rng.random()
        new: dict[int, tuple[list[int], int]] = {}  # slot -> (tokens, first token to write)
        if op < 0.35 and len(active) < 3:
            base = rng.choice(history)[: rng.randrange(1, 3 * tpp)] if history else []
            tok = (base + [rng.randrange(50) for _ in range(rng.randrange(1, 2 * tpp))])[:600]
            alloc = a.acquire(f"r{step}", tok)
            if alloc is not None:
                if a.ensure(alloc.slot, len(tok)):
                    new[alloc.slot] = (tok, alloc.num_cached_tokens)
                else:
                    a.free(alloc.slot)
        elif op < 0.55 and active:
            slot = rng.choice(sorted(active))
            tok = active[slot] + [rng.randrange(50) for _ in range(rng.randrange(1, tpp))]
            if a.ensure(slot, len(tok[:600])):
                new[slot] = (tok[:600], len(active[slot]))
            else:
                a.free(slot)
                del active[slot]
        elif op < 0.7 and active:
            slot = rng.choice(sorted(active))
            history.append(active[slot])
            a.release(slot, active.pop(slot), park=rng.random() < 0.5)
        elif op < 0.8 and active:
            slot = rng.choice(sorted(active))
            a.swap_out(slot)
            swapped[slot] = active.pop(slot)
        elif op < 0.9 and swapped:
            slot = rng.choice(sorted(swapped))
            if a.swap_in(slot):
                active[slot] = swapped.pop(slot)
        elif swapped or active:
            pool = swapped if swapped and rng.random() < 0.5 else active or swapped
            slot = rng.choice(sorted(pool))
            del pool[slot]
            a.free(slot)
        plan = a.take_plan()
        assert_ints(plan)
        a.apply(plan)  # the engine's apply, mirrored on b
        a.wait_ready()
        for slot, (tok, start) in new.items():  # the same kernels on both ranks
            for c in (a, b):
                write_kv(c, slot, tok, start, len(tok))
            a.cache_prefix(slot, tok)
            active[slot] = tok
        a.check_integrity()
        assert a.applier.ids() == b.applier.ids() == a.table.ids(), step
        for slot, tok in active.items():
            assert_kv(a, slot, tok, len(tok))
            assert_kv(b, slot, tok, len(tok))
        ps = a.page_size
        for c in (a, b):  # lookahead maps may still be queued: let them land before reading
            c.applier.mapper.flush()
        for page in a.applier.ids():
            sl = slice(page * ps, (page + 1) * ps)
            assert torch.equal(a.applier.bytes[sl], b.applier.bytes[sl]), (step, page)
        assert a.applier.pool.stats()["live"] == b.applier.pool.stats()["live"]
    assert {Map, Unmap, Copy, SwapOut, SwapIn, Release} <= kinds, kinds
    for slot in list(active) + list(swapped):
        a.free(slot)
    a.close()
    b.close()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_schedules_without_device_work_and_its_plans_replay(mode):
    """The engine under preemption: scheduling submits nothing to the mapper and creates no
    page; every plan it applies, mirrored on a second cache, keeps that cache's pages equal."""
    from vtensor.engine import LLMEngine, SamplingParams

    eng = LLMEngine(
        model="smollm2-135m", load_format="dummy", device="cpu", dtype="float32",
        max_model_len=64, config_overrides={"num_layers": 2}, debug=True,
        page_size=2**16, kv_memory=4 * 2**16, max_num_batched_tokens=32, preemption_mode=mode,
    )  # fmt: skip
    kv = eng.kv_cache
    rank1 = KVCache(
        kv.spec, backend=HostBackend(page_size=kv.page_size), max_tokens=kv.max_tokens,
        num_slots=kv.num_slots, budget_bytes=kv.budget_bytes,
    )  # fmt: skip
    assert not kv.table.plan  # CPU: no graph pad slot, nothing recorded before the mirror
    mirrored(kv, rank1)
    schedule, mapper, dev_pool = eng.scheduler.schedule, kv.applier.mapper, kv.applier.pool
    plans = []

    def checked_schedule():
        before = (mapper.submitted, dev_pool.stats()["created"])
        batch = schedule()
        assert (mapper.submitted, dev_pool.stats()["created"]) == before
        assert_ints(batch.plan)
        plans.append(batch.plan)
        return batch

    eng.scheduler.schedule = checked_schedule
    rng = random.Random(0)
    for i in range(6):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(8, 30))]
        eng.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=30))
    while eng.has_unfinished_requests():
        eng.step()
        assert kv.applier.ids() == rank1.applier.ids()
    assert eng.scheduler.num_preemptions > 0 and sum(p.num_maps() for p in plans) > 0
    kv.check_integrity()
    eng.close()
    rank1.close()
