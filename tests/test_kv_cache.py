"""KVCache on virtual tensors: layout, radix tree, sharing with data, affinity, eviction, swap,
randomized workloads. CPU: HostBackend with 64 KiB pages and a spec whose tokens straddle pages
(384 B/token: 170.67 tokens per page). GPU (-m gpu): CudaBackend, 2 MiB pages (3 KiB/token)."""

from __future__ import annotations

import random

import pytest
import torch

try:  # the GPU host may lack hypothesis: the seeded workloads below still run there
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

from vtensor.kv import (
    KVCache,
    KVConfigError,
    KVIntegrityError,
    KVLayout,
    KVSpec,
    RadixTree,
    SlotStateError,
    resolve_budget,
)
from vtensor.kv.cache import SlotState
from vtensor.vmm import HostBackend, make_backend

HOST_PAGE = 64 << 10
HOST_SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)  # 384 B/token
GPU_SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=64, dtype=torch.float32)  # 3 KiB/token


def _host_backend():
    return HostBackend(page_size=HOST_PAGE), HOST_SPEC


def _cuda_backend():
    return make_backend("cuda"), GPU_SPEC


BACKENDS = [
    pytest.param(_host_backend, id="host"),
    pytest.param(_cuda_backend, id="cuda", marks=pytest.mark.gpu),
]


def make_cache(factory, *, pages: int | None = 48, num_slots: int = 4, **kw) -> KVCache:
    backend, spec = factory()
    tpp = backend.page_size // spec.bytes_per_token
    max_tokens = kw.pop("max_tokens", 10 * tpp)
    budget = None if pages is None else pages * backend.page_size
    return KVCache(
        spec, backend=backend, max_tokens=max_tokens, num_slots=num_slots, budget_bytes=budget, **kw
    )


def tpp_of(cache: KVCache) -> float:
    return cache.page_size / cache.layout.bytes_per_token


# ---- deterministic "model": a token's K/V depends on its whole prefix (causality) ----
def _prefix_keys(tokens: list[int]) -> list[float]:
    out, h = [], 7
    for t in tokens:
        h = (h * 1000003 + t + 1) % 2147483647
        out.append(float(h % 100003))
    return out


def expected_kv(cache: KVCache, tokens: list[int], start: int, end: int):
    """Per layer (k, v) of tokens [start, end), [n, kv_heads, head_dim] each, on the device."""
    spec = cache.spec
    hd = spec.num_kv_heads * spec.head_dim
    keys = torch.tensor(_prefix_keys(tokens[:end])[start:end], dtype=torch.float64)
    dev = cache.kv_views[0][0].device
    out = []
    for layer in range(spec.num_layers):
        kv = []
        for c in (0, 1):
            grid = torch.arange(hd, dtype=torch.float64) * 0.37 + layer * 1.3 + c * 0.7
            val = torch.sin(keys[:, None] * 1e-3 + grid[None, :])  # [n, heads*dim], in (-1, 1)
            kv.append(val.view(-1, spec.num_kv_heads, spec.head_dim).to(spec.dtype).to(dev))
        out.append(tuple(kv))
    return out


def write_kv(cache: KVCache, slot: int, tokens: list[int], start: int, end: int) -> None:
    if end <= start:
        return
    for (k, v), (ek, ev) in zip(
        cache.kv_views, expected_kv(cache, tokens, start, end), strict=True
    ):
        k[slot, start:end] = ek
        v[slot, start:end] = ev


def assert_kv(cache: KVCache, slot: int, tokens: list[int], end: int) -> None:
    for layer, ((k, v), (ek, ev)) in enumerate(
        zip(cache.kv_views, expected_kv(cache, tokens, 0, end), strict=True)
    ):
        assert torch.equal(k[slot, :end], ek), layer
        assert torch.equal(v[slot, :end], ev), layer


def run_prefill(cache: KVCache, rid: str, tokens: list[int]):
    """What the engine does for a new request: acquire, ensure, compute the uncached part."""
    alloc = cache.acquire(rid, tokens)
    assert alloc is not None
    assert 0 <= alloc.num_cached_tokens <= len(tokens) - 1
    assert cache.ensure(alloc.slot, len(tokens))
    ready(cache)
    write_kv(cache, alloc.slot, tokens, alloc.num_cached_tokens, len(tokens))
    cache.cache_prefix(alloc.slot, tokens)
    cache.check_integrity()
    assert_kv(cache, alloc.slot, tokens, len(tokens))
    return alloc


def ready(cache: KVCache) -> None:
    """What the engine does after scheduling: apply the step's plan, wait for it."""
    cache.apply(cache.take_plan())
    cache.wait_ready()


def slot_page(cache: KVCache, slot: int, j: int):
    return cache.table.page(cache.layout.slot_page(slot, j))


def close_and_check(cache: KVCache) -> None:
    cache.check_integrity()
    pool = cache.pool
    cache.close()
    st_ = pool.stats()
    assert st_["in_use"] == 0 and st_["live"] == 0, st_


# ---- layout ----
def test_layout_views_are_token_major_and_page_aligned():
    spec = HOST_SPEC
    lay = KVLayout(spec, num_slots=3, max_tokens=300, page_size=HOST_PAGE)
    assert lay.bytes_per_token == 3 * 2 * 2 * 8 * 4
    assert lay.slot_bytes % HOST_PAGE == 0 and lay.slot_bytes >= 300 * lay.bytes_per_token
    base = torch.zeros(lay.total_bytes // 4, dtype=torch.float32)
    views = lay.layer_views(base)
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(3, lay.slot_stride)  # independent reference: explicit flat offsets
    for layer, (k, v) in enumerate(views):
        assert k.shape == (3, 300, 2, 8) and k.stride(-1) == 1
        for c, t in ((0, k), (1, v)):
            x = torch.randn(3, 300, 2, 8, generator=g)
            t.copy_(x)
            for tok in (0, 1, 170, 299):
                off = tok * lay.token_stride + (layer * 2 + c) * 16
                ref[:, off : off + 16] = x[:, tok].reshape(3, 16)
    flat = base.view(3, lay.slot_stride)
    for tok in (0, 1, 170, 299):
        s = tok * lay.token_stride
        assert torch.equal(flat[:, s : s + lay.token_stride], ref[:, s : s + lay.token_stride])
    # page arithmetic: token 170 straddles pages 0 and 1 (170.67 tokens per page)
    assert lay.page_range(0, 0, 170) == (0, 1)
    assert lay.page_range(0, 0, 171) == (0, 2)
    assert lay.page_range(1, 170, 171) == (lay.pages_per_slot, lay.pages_per_slot + 2)
    assert lay.full_pages(171) == 1 and lay.tokens_in_pages(1) == 170 and lay.chunk_end(0) == 171
    with pytest.raises(KVConfigError):
        lay.page_range(3, 0, 1)
    with pytest.raises(KVConfigError):
        KVLayout(spec, num_slots=0, max_tokens=1, page_size=HOST_PAGE)
    with pytest.raises(KVConfigError):
        KVSpec(0, 1, 1, torch.float16)


def test_token_capacity_is_the_budgets_whole_tokens_up_to_max_tokens():
    # 384 B/token over 64 KiB pages: 2 pages = 131072 B hold 341 whole tokens (341.33).
    cache = make_cache(_host_backend, pages=2, num_slots=2, max_tokens=1000)
    assert cache.token_capacity() == 131072 // 384 == 341
    # A request of exactly that many tokens fits with the cache to itself, one more never does.
    slot = cache.acquire("r", list(range(300))).slot
    assert cache.ensure(slot, 341) and not cache.ensure(slot, 342)
    close_and_check(cache)
    # Budget above one slot (48 pages = 8192 tokens): the slot's max_tokens is the limit.
    cache = make_cache(_host_backend, pages=48, max_tokens=1000)
    assert cache.token_capacity() == 1000
    close_and_check(cache)
    cache = make_cache(_host_backend, pages=None, max_tokens=1000)  # no budget on the host
    assert cache.token_capacity() == 1000
    close_and_check(cache)


# ---- radix tree ----
def test_radix_lru_evicts_leaves_first():
    class P:  # stand-in page
        pass

    tree = RadixTree(lambda j: 2 * (j + 1))  # 2 tokens per page
    a = tree.insert(tree.root, (1, 2), P())
    b = tree.insert(a, (3, 4), P())
    c = tree.insert(tree.root, (9, 9), P())
    assert tree.match([1, 2, 3, 4, 5]) == [a, b] and tree.match([1, 2, 7, 7]) == [a]
    tree.unlock([c])
    tree.unlock([a, b])  # deepest first: b before a; c is older still
    assert list(tree.evictable) == [c, b, a]
    tree.lock(tree.match([9, 9]))
    assert tree.evict_one() is not None and tree.num_nodes == 2  # b (c is locked again)
    assert tree.match([1, 2, 3, 4]) == [a]
    assert tree.evict_one() is not None and tree.evict_one() is None


# ---- sharing with data ----
@pytest.mark.parametrize("factory", BACKENDS)
def test_prefix_sharing_aliases_pages_and_copies_partial(factory):
    cache = make_cache(factory)
    tpp = tpp_of(cache)
    rng = random.Random(1)
    a_tok = [rng.randrange(1000) for _ in range(int(2.6 * tpp))]
    a = run_prefill(cache, "a", a_tok)
    # b shares 2.3 pages worth of tokens: 2 pages aliased, the rest copied into a fresh page
    shared = int(2.3 * tpp)
    b_tok = a_tok[:shared] + [rng.randrange(1000, 2000) for _ in range(40)]
    maps_before = cache.stats["map_ops"]
    b = run_prefill(cache, "b", b_tok)
    assert b.num_cached_tokens == shared
    for j in range(2):
        assert slot_page(cache, b.slot, j) is slot_page(cache, a.slot, j)  # aliased
        assert slot_page(cache, b.slot, j).refcount == 3  # two slots + the tree
    assert slot_page(cache, b.slot, 2) is not slot_page(cache, a.slot, 2)  # private copy
    assert cache.stats["copies"] == 1
    assert cache.stats["copy_bytes"] == shared * cache.layout.bytes_per_token - 2 * cache.page_size
    assert cache.stats["map_ops"] > maps_before
    assert cache.stats["prefix_hit_pages"] == 2
    assert_kv(cache, a.slot, a_tok, len(a_tok))  # b's writes did not touch a's pages
    # c shares less than a page: pure partial copy from a live slot (no full page)
    c_tok = a_tok[:50] + [7] * 10
    c = run_prefill(cache, "c", c_tok)
    assert c.num_cached_tokens == 50 and slot_page(cache, c.slot, 0) is not slot_page(
        cache, a.slot, 0
    )
    snap = cache.snapshot()
    assert snap["prefix_hit_tokens"] == shared + 50 and snap["pages_shared"] >= 2
    for alloc, tok in ((a, a_tok), (b, b_tok), (c, c_tok)):
        cache.release(alloc.slot, tok, park=False)
        cache.check_integrity()
    assert cache.snapshot()["pages_cached"] == cache.tree.num_nodes > 0
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_partial_copies_wait_for_wait_ready_and_survive_a_small_ring(factory, monkeypatch):
    """Admissions queue their partial-page copies (no wait per request); wait_ready runs them.
    A ring of 2 scratch entries wraps within the step (flushes early); a slot freed before
    wait_ready drops its copy; a source evicted before wait_ready still copies right (the
    cache holds its page until the copy ran)."""
    import vtensor.kv.applier as applier_mod

    monkeypatch.setattr(applier_mod, "SCRATCH_PAGES", 2)
    cache = make_cache(factory, num_slots=6)
    tpp = tpp_of(cache)
    rng = random.Random(5)
    a_tok = [rng.randrange(1000) for _ in range(int(2.5 * tpp))]
    a = run_prefill(cache, "a", a_tok)
    cache.release(a.slot, a_tok, park=False)  # cached only: copies read the tree's pages
    shared = int(1.5 * tpp)  # one aliased page + a partial one
    toks = {r: a_tok[:shared] + [rng.randrange(1000, 2000) for _ in range(9)] for r in "bcde"}
    allocs = {r: cache.acquire(r, t) for r, t in toks.items()}
    assert all(al.num_cached_tokens == shared for al in allocs.values())
    cache.apply(cache.take_plan())
    queued = cache.applier._queued
    assert len(queued) == 2 and cache.stats["copies"] == 4  # 4 copies through 2 entries
    cache.free(allocs["e"].slot)  # its copy is still queued
    nodes = cache.tree.num_nodes
    cache.reset_prefix_cache()  # evicts the copy sources: their pages must live on
    assert cache.tree.num_nodes < nodes
    for r in "bcd":
        assert cache.ensure(allocs[r].slot, len(toks[r]))
    cache.apply(cache.take_plan())
    assert len(cache.applier._queued) == 1  # e's copy was dropped
    cache.wait_ready()
    assert not cache.applier._queued and cache.applier.num_scratch_mapped() == 0
    for r in "bcd":
        write_kv(cache, allocs[r].slot, toks[r], shared, len(toks[r]))
        assert_kv(cache, allocs[r].slot, toks[r], len(toks[r]))
    cache.check_integrity()
    for r in "bcd":
        cache.release(allocs[r].slot, toks[r], park=False)
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_identical_prompt_recomputes_last_token_without_touching_shared_pages(factory):
    cache = make_cache(factory)
    tpp = tpp_of(cache)
    tok = [random.Random(2).randrange(500) for _ in range(int(3 * tpp) + 1)]  # ends on page 3
    a = run_prefill(cache, "a", tok)
    cache.release(a.slot, tok, park=False)  # cached only: b reads through the scratch page
    b = run_prefill(cache, "b", tok)
    assert b.num_cached_tokens == len(tok) - 1
    n_shared = cache.layout.full_pages(len(tok) - 1)
    assert cache.slots[b.slot].tree_mapped == n_shared
    # the first written byte lies beyond every aliased page
    assert cache.layout.token_byte(len(tok) - 1) >= n_shared * cache.page_size
    # a page-aligned full hit (no partial bytes) copies nothing
    lay = cache.layout
    aligned = next(
        n for n in range(2, 4 * int(tpp)) if lay.token_byte(n - 1) % cache.page_size == 0
    )
    if aligned <= len(tok):
        copies = cache.stats["copies"]
        c = run_prefill(cache, "c", tok[:aligned])
        assert c.num_cached_tokens == aligned - 1 and cache.stats["copies"] == copies
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_parked_slot_takeover_zero_maps_zero_copies(factory):
    cache = make_cache(factory)
    tpp = tpp_of(cache)
    rng = random.Random(3)
    turn1 = [rng.randrange(1000) for _ in range(int(1.5 * tpp))]
    a = run_prefill(cache, "t1", turn1)
    # decode 20 tokens one by one, as the engine would
    for _ in range(20):
        turn1.append(rng.randrange(1000))
        assert cache.ensure(a.slot, len(turn1))
        ready(cache)
        write_kv(cache, a.slot, turn1, len(turn1) - 1, len(turn1))
    cache.release(a.slot, turn1, park=True)
    cache.check_integrity()
    assert cache.snapshot()["slots_parked"] == 1
    turn2 = turn1 + [rng.randrange(1000) for _ in range(30)]
    maps, copies = cache.stats["map_ops"], cache.stats["copies"]
    alloc = cache.acquire("t2", turn2)
    assert alloc.slot == a.slot and alloc.num_cached_tokens == len(turn1)
    assert cache.stats["map_ops"] == maps and cache.stats["copies"] == copies
    assert cache.stats["affinity_hits"] == 1
    assert_kv(cache, alloc.slot, turn1, len(turn1))
    assert cache.ensure(alloc.slot, len(turn2))
    ready(cache)
    write_kv(cache, alloc.slot, turn2, len(turn1), len(turn2))
    cache.release(alloc.slot, turn2)
    # a diverging conversation (regenerate) cannot take the slot over; it shares pages instead
    other = turn2[:100] + [5, 6, 7]
    b = run_prefill(cache, "regen", other)
    assert b.slot != alloc.slot and b.num_cached_tokens == 100
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_parked_slot_gives_back_its_lookahead_page(factory):
    """A finished request keeps the pages of its tokens for the next turn, not the page mapped
    ahead for the decode that never came (a page per parked request otherwise)."""
    cache = make_cache(factory)
    tpp = tpp_of(cache)
    tokens = list(range(int(2.5 * tpp)))
    a = run_prefill(cache, "r", tokens)
    lay = cache.layout
    assert cache.slots[a.slot].mapped == lay.pages_for(len(tokens) + cache.lookahead_tokens)
    in_use = cache.pool.num_in_use()
    cache.release(a.slot, tokens, park=True)
    ready(cache)
    assert cache.slots[a.slot].mapped == lay.pages_for(len(tokens))
    assert cache.pool.num_in_use() == in_use - 1
    cache.check_integrity()
    # the next turn takes the slot over and maps what it needs again
    turn2 = tokens + list(range(5000, 5000 + int(tpp)))
    alloc = cache.acquire("r2", turn2)
    assert alloc.slot == a.slot and alloc.num_cached_tokens == len(tokens)
    assert cache.ensure(alloc.slot, len(turn2))
    ready(cache)
    write_kv(cache, alloc.slot, turn2, len(tokens), len(turn2))
    assert_kv(cache, alloc.slot, turn2, len(turn2))
    cache.release(alloc.slot, turn2)
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_eviction_under_pressure_and_ensure_failure(factory):
    cache = make_cache(factory, pages=8, num_slots=3, lookahead_tokens=0)
    tpp = tpp_of(cache)
    rng = random.Random(4)
    seqs = []
    for i in range(3):  # 3 x 2.5 pages, released: cached/parked
        tok = [rng.randrange(1000) for _ in range(int(2.5 * tpp))]
        a = run_prefill(cache, f"r{i}", tok)
        cache.release(a.slot, tok, park=i % 2 == 0)
        seqs.append(tok)
    assert cache.num_free_pages() == 8
    # a big request forces evictions of older cached pages and parked slots
    big = [rng.randrange(1000) for _ in range(int(6.5 * tpp))]
    a = run_prefill(cache, "big", big)
    assert cache.stats["evicted_pages"] + cache.stats["evicted_slots"] > 0
    # nothing left to evict beyond 8 pages: the next ensure fails without partial change
    b = cache.acquire("b", [1, 2, 3])
    mapped = cache.slots[b.slot].mapped
    assert not cache.ensure(b.slot, int(2 * tpp))
    assert cache.slots[b.slot].mapped == mapped
    cache.check_integrity()
    cache.free(a.slot)  # preempt the big one: now it fits
    assert cache.ensure(b.slot, int(2 * tpp))
    cache.check_integrity()
    close_and_check(cache)


@pytest.mark.parametrize("factory", BACKENDS)
def test_swap_roundtrip_same_addresses_exact_data(factory):
    cache = make_cache(factory, pages=10)
    tpp = tpp_of(cache)
    rng = random.Random(5)
    base_tok = [rng.randrange(1000) for _ in range(int(2.2 * tpp))]
    a = run_prefill(cache, "a", base_tok)
    b_tok = base_tok[: int(2.1 * tpp)] + [rng.randrange(1000) for _ in range(int(1.4 * tpp))]
    b = run_prefill(cache, "b", b_tok)
    shared = [slot_page(cache, b.slot, j) for j in range(2)]
    ptr = cache.kv_views[0][0][b.slot].data_ptr()
    in_use = cache.pool.num_in_use()
    cache.swap_out(b.slot)
    cache.check_integrity()
    assert cache.pool.num_in_use() < in_use  # private pages went back to the pool
    assert [slot_page(cache, b.slot, j) for j in range(2)] == shared  # shared stay mapped
    # someone else reuses the freed pages meanwhile
    c_tok = [rng.randrange(2000, 3000) for _ in range(int(2 * tpp))]
    c = run_prefill(cache, "c", c_tok)
    cache.free(c.slot)
    assert cache.swap_in(b.slot)
    ready(cache)
    cache.check_integrity()
    assert cache.kv_views[0][0][b.slot].data_ptr() == ptr
    assert_kv(cache, b.slot, b_tok, len(b_tok))
    assert_kv(cache, a.slot, base_tok, len(base_tok))
    assert cache.stats["swap_outs"] == cache.stats["swap_ins"] == 1
    with pytest.raises(SlotStateError):
        cache.swap_in(b.slot)
    close_and_check(cache)


def test_errors_budget_and_idle_trim():
    cache = make_cache(_host_backend, pages=None, idle_trim_seconds=0.0)
    with pytest.raises(ValueError):
        cache.acquire("x", [])
    with pytest.raises(ValueError):
        cache.acquire("x", [1] * (cache.max_tokens + 1))
    with pytest.raises(SlotStateError):
        cache.ensure(0, 5)
    tok = list(range(300))
    a = run_prefill(cache, "a", tok)
    with pytest.raises(ValueError):
        cache.cache_prefix(a.slot, [9] + tok[1:])
    cache.free(a.slot)
    ready(cache)  # idle for >= 0 s: free pages go back to the OS
    st_ = cache.pool.stats()
    assert st_["free"] == 0 and st_["live"] == st_["in_use"] and cache.stats["trimmed_pages"] > 0
    dev = cache.applier.pool.stats()  # the device gave the released pages' memory back
    assert dev["free"] == 0 and dev["live"] == dev["in_use"] == st_["in_use"]
    cache.record(t=1.0)
    assert cache.series[-1]["t"] == 1.0 and "bytes_mapped" in cache.series[-1]
    # corrupt a refcount: check_integrity must notice
    node = cache.tree.nodes()[0]
    node.page.refcount += 1
    with pytest.raises(KVIntegrityError):
        cache.check_integrity()
    node.page.refcount -= 1
    close_and_check(cache)
    be = HostBackend(page_size=HOST_PAGE)
    with pytest.raises(KVConfigError, match="virtual space"):  # ~400 PiB: cannot be reserved
        KVCache(HOST_SPEC, backend=be, max_tokens=1 << 40, num_slots=1024, budget_bytes=None)
    assert resolve_budget(0.5, be.device, host_bytes=1000) == 500
    assert resolve_budget(123, be.device) == 123 and resolve_budget(None, be.device) is None
    with pytest.raises(KVConfigError):
        resolve_budget(1.5, be.device)


# ---- randomized workloads ----
OPS = ("open", "share", "grow", "park", "release", "resume", "swap", "swapin", "free")


class Driver:
    """An engine stand-in: random requests through the cache, data checked as it goes."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.tpp = tpp_of(cache)
        self.active: dict[str, tuple[int, list[int]]] = {}  # rid -> (slot, tokens computed)
        self.swapped: dict[str, tuple[int, list[int]]] = {}
        self.history: list[list[int]] = []
        self.n = 0

    def _new(self, tokens: list[int]) -> None:
        cache = self.cache
        tokens = tokens[: cache.max_tokens]
        rid = f"r{self.n}"
        self.n += 1
        alloc = cache.acquire(rid, tokens)
        if alloc is None:
            return
        assert alloc.num_cached_tokens <= len(tokens) - 1
        if not cache.ensure(alloc.slot, len(tokens)):
            cache.free(alloc.slot)  # preempted before it started
            return
        ready(cache)
        assert_kv(cache, alloc.slot, tokens, alloc.num_cached_tokens)
        write_kv(cache, alloc.slot, tokens, alloc.num_cached_tokens, len(tokens))
        cache.cache_prefix(alloc.slot, tokens)
        self.active[rid] = (alloc.slot, tokens)

    def step(self, op: str, seed: int) -> None:
        rng = random.Random(seed)
        cache, tpp = self.cache, self.tpp

        def fresh(lo: float, hi: float) -> list[int]:
            return [rng.randrange(50) for _ in range(max(1, int(rng.uniform(lo, hi) * tpp)))]

        if op == "open":
            self._new(fresh(0.05, 2.5))
        elif op == "share" and self.history:
            h = rng.choice(self.history)
            self._new(h[: rng.randrange(1, len(h) + 1)] + fresh(0.0, 0.5))
        elif op == "resume" and self.history:
            self._new(rng.choice(self.history) + fresh(0.0, 0.6))
        elif op == "grow" and self.active:
            rid = rng.choice(sorted(self.active))
            slot, tok = self.active[rid]
            new = tok + fresh(0.0, 1.2)
            new = new[: cache.max_tokens]
            if not cache.ensure(slot, len(new)):
                cache.free(slot)  # the engine preempts
                del self.active[rid]
                return
            ready(cache)
            write_kv(cache, slot, new, len(tok), len(new))
            if rng.random() < 0.5:
                cache.cache_prefix(slot, new)
            self.active[rid] = (slot, new)
        elif op in ("park", "release") and self.active:
            rid = rng.choice(sorted(self.active))
            slot, tok = self.active.pop(rid)
            cache.release(slot, tok, park=op == "park")
            self.history.append(tok)
        elif op == "swap" and self.active:
            rid = rng.choice(sorted(self.active))
            cache.swap_out(self.active[rid][0])
            self.swapped[rid] = self.active.pop(rid)
        elif op == "swapin" and self.swapped:
            rid = rng.choice(sorted(self.swapped))
            slot, tok = self.swapped[rid]
            if cache.swap_in(slot):
                del self.swapped[rid]
                self.active[rid] = (slot, tok)
                ready(cache)
                assert_kv(cache, slot, tok, len(tok))
        elif op == "free" and (self.active or self.swapped):
            pool = (
                self.active if self.active and rng.random() < 0.7 else self.swapped or self.active
            )
            rid = rng.choice(sorted(pool))
            cache.free(pool.pop(rid)[0])

    def verify_all(self) -> None:
        ready(self.cache)
        for slot, tok in self.active.values():
            assert_kv(self.cache, slot, tok, len(tok))


def run_workload(cache: KVCache, ops: list[tuple[str, int]]) -> None:
    d = Driver(cache)
    for i, (op, seed) in enumerate(ops):
        d.step(op, seed)
        cache.check_integrity()
        for s in cache.slots:  # live-request waste <= 1 page + lookahead
            if s.state == SlotState.ACTIVE:
                need = cache.layout.pages_for(max(s.num_tokens, len(s.tokens)))
                assert s.mapped <= need + cache.layout.pages_for(cache.lookahead_tokens) + 1
        if i % 8 == 7:
            d.verify_all()
    d.verify_all()
    close_and_check(cache)


if given is not None:
    op_lists = st.lists(
        st.tuples(st.sampled_from(OPS), st.integers(0, 2**31)), min_size=5, max_size=60
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=op_lists, pages=st.sampled_from([8, 14, 40]), async_map=st.booleans())
    def test_randomized_workload_host(ops, pages, async_map):
        cache = make_cache(_host_backend, pages=pages, num_slots=4, async_map=async_map)
        run_workload(cache, ops)


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_randomized_workload_seeded(factory, seed):
    rng = random.Random(seed)
    ops = [(rng.choice(OPS), rng.randrange(2**31)) for _ in range(80)]
    cache = make_cache(factory, pages=rng.choice([8, 14, 40]), num_slots=4)
    run_workload(cache, ops)


@pytest.mark.parametrize("factory", BACKENDS)
@pytest.mark.parametrize("lookahead", [None, 0])
def test_decode_never_waits_on_the_mapper_with_lookahead(factory, lookahead):
    cache = make_cache(factory, pages=20, lookahead_tokens=lookahead)
    tok = list(range(100))
    a = run_prefill(cache, "a", tok)
    fresh_required = done_required = 0
    maps0 = cache.stats["map_ops"]
    for i in range(int(3 * tpp_of(cache))):  # decode across several page boundaries
        tok.append(i % 97)
        cache.applier.mapper.flush()  # the mapper had time to run everything queued so far
        assert cache.ensure(a.slot, len(tok))
        cache.apply(cache.take_plan())
        # map work the next step would block on: none while the lookahead runs ahead
        fresh_required += sum(not t.done() for t in cache.applier._required)
        done_required += sum(t.done() for t in cache.applier._required)
        cache.wait_ready()
        write_kv(cache, a.slot, tok, len(tok) - 1, len(tok))
    if lookahead is None:  # default: one page ahead
        assert fresh_required == 0
    else:  # no lookahead: each page boundary needs fresh map work (the contrast)
        assert cache.stats["map_ops"] - maps0 >= 2 and fresh_required + done_required >= 2
    assert cache.stats["map_ops"] >= cache.layout.pages_for(len(tok))
    assert_kv(cache, a.slot, tok, len(tok))
    close_and_check(cache)


def test_same_prefix_computed_twice_keeps_a_private_duplicate():
    cache = make_cache(_host_backend, pages=40)
    tpp = tpp_of(cache)
    tok = [random.Random(6).randrange(300) for _ in range(int(2.5 * tpp))]
    allocs = []
    for rid in ("a", "b"):  # both miss the cache: neither has published yet
        alloc = cache.acquire(rid, tok)
        assert alloc.num_cached_tokens == 0
        assert cache.ensure(alloc.slot, len(tok))
        allocs.append(alloc)
    ready(cache)
    for alloc in allocs:
        write_kv(cache, alloc.slot, tok, 0, len(tok))
        cache.cache_prefix(alloc.slot, tok)
        cache.check_integrity()
    a, b = (cache.slots[x.slot] for x in allocs)
    assert a.tree_mapped == 2 and b.tree_mapped == 0 and b.path == a.path  # b: duplicates
    assert slot_page(cache, b.index, 0) is not slot_page(cache, a.index, 0)
    tree_pages = [node.page for node in a.path]
    assert tree_pages == [slot_page(cache, a.index, j) for j in range(2)]
    cache.release(a.index, tok, park=False)
    c = run_prefill(cache, "c", tok[: int(2.2 * tpp)] + [1, 2, 3])
    assert slot_page(cache, c.slot, 1) is tree_pages[1]  # aliases the tree's (a's) copy
    # b continues (a longer conversation) and parks; its duplicate path still allows takeover
    longer = tok + [9] * int(tpp)
    assert cache.ensure(b.index, len(longer))
    ready(cache)
    write_kv(cache, b.index, longer, len(tok), len(longer))
    cache.release(b.index, longer)
    cache.check_integrity()
    d = cache.acquire("d", longer + [4])
    assert d.slot == b.index and d.num_cached_tokens == len(longer)
    assert_kv(cache, d.slot, longer, len(longer))
    close_and_check(cache)


def test_ensure_fast_path_matches_the_general_path():
    """ensure()'s fast path (pages through n + lookahead mapped) must leave exactly the state
    the general path leaves: random growth, lookahead, budget pressure and releases, run on two
    caches, one with the fast path switched off."""
    import random

    rng = random.Random(7)
    caches = [make_cache(_host_backend, pages=24, async_map=False) for _ in range(2)]
    caches[1]._fast_limit = lambda pages: -1  # never fast
    general = [0, 0]  # ensure() calls that took the general path, per cache
    for i, c in enumerate(caches):
        slow = c._slot

        def counted(*a, i=i, slow=slow):
            general[i] += 1
            return slow(*a)

        c._slot = counted
    tpp = HOST_PAGE // HOST_SPEC.bytes_per_token
    live: dict[int, int] = {}
    for step in range(400):
        op = rng.random()
        if op < 0.1 and len(live) < 4:
            n = rng.randrange(1, 3 * tpp)
            ids = [rng.randrange(50) for _ in range(n)]
            allocs = [c.acquire(f"r{step}", ids) for c in caches]
            assert (allocs[0] is None) == (allocs[1] is None)
            if allocs[0] is not None:
                assert allocs[0].slot == allocs[1].slot
                live[allocs[0].slot] = n
        elif op < 0.2 and live:
            slot = rng.choice(sorted(live))
            for c in caches:
                c.free(slot)
            del live[slot]
        elif live:
            slot = rng.choice(sorted(live))
            n = min(live[slot] + rng.choice([1, 1, 1, 2, tpp // 2, tpp]), 10 * tpp)
            oks = [c.ensure(slot, n) for c in caches]
            assert oks[0] == oks[1]
            if oks[0]:
                live[slot] = n
        for c in caches:
            ready(c)
        # the same state; timings (keys ending in _s) differ run to run
        a, b = ({k: v for k, v in c.snapshot().items() if not k.endswith("_s")} for c in caches)
        assert a == b, step
        assert [(s.mapped, s.num_tokens, s.pending_first) for s in caches[0].slots] == [
            (s.mapped, s.num_tokens, s.pending_first) for s in caches[1].slots
        ]
    for c in caches:
        c.check_integrity()
        c.close()
    assert general[0] < general[1]  # the fast path did run
