"""PagedKVCache (kv="paged" baseline): block tables, hashed prefix caching with token
verification, LRU free queue, swap; data written through the block tables and read back."""

from __future__ import annotations

import random

import pytest
import torch

try:  # the GPU host may lack hypothesis: the seeded workloads below still run there
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

from vtensor.kv import KVConfigError, KVIntegrityError, KVSpec, PagedKVCache

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make(device="cpu", num_blocks=24, num_slots=4, **kw) -> PagedKVCache:
    return PagedKVCache(
        SPEC, max_tokens=kw.pop("max_tokens", 256), num_slots=num_slots, num_blocks=num_blocks,
        device=device, **kw,
    )  # fmt: skip


def expected(tokens: list[int], start: int, end: int, layer: int, c: int, device) -> torch.Tensor:
    h, keys = 11, []
    for t in tokens[:end]:
        h = (h * 1000003 + t + 1) % 2147483647
        keys.append(float(h % 100003))
    k = torch.tensor(keys[start:end], dtype=torch.float64)
    grid = torch.arange(16, dtype=torch.float64) * 0.29 + layer * 1.7 + c * 0.5
    return torch.cos(k[:, None] * 1e-3 + grid).view(-1, 2, 8).float().to(device)


def _flat_index(cache: PagedKVCache, slot: int, start: int, end: int) -> torch.Tensor:
    blocks = torch.tensor(cache.blocks(slot), dtype=torch.long)
    pos = torch.arange(start, end)
    return (blocks[pos // cache.block_size] * cache.block_size + pos % cache.block_size).to(
        cache.device
    )


def write(cache: PagedKVCache, slot: int, tokens: list[int], start: int, end: int) -> None:
    if end <= start:
        return
    idx = _flat_index(cache, slot, start, end)
    for layer, (k, v) in enumerate(cache.kv_views):
        k.view(-1, 2, 8)[idx] = expected(tokens, start, end, layer, 0, cache.device)
        v.view(-1, 2, 8)[idx] = expected(tokens, start, end, layer, 1, cache.device)


def check(cache: PagedKVCache, slot: int, tokens: list[int], end: int) -> None:
    idx = _flat_index(cache, slot, 0, end)
    for layer, (k, v) in enumerate(cache.kv_views):
        assert torch.equal(k.view(-1, 2, 8)[idx], expected(tokens, 0, end, layer, 0, cache.device))
        assert torch.equal(v.view(-1, 2, 8)[idx], expected(tokens, 0, end, layer, 1, cache.device))


def applied(cache: PagedKVCache) -> None:
    """As the engine after scheduling: the plan's swap copies run before the step writes."""
    cache.apply(cache.take_plan())
    cache.wait_ready()


def prefill(cache: PagedKVCache, rid: str, tokens: list[int]):
    a = cache.acquire(rid, tokens)
    assert a is not None and a.num_cached_tokens <= len(tokens) - 1
    assert a.num_cached_tokens % cache.block_size == 0
    assert cache.ensure(a.slot, len(tokens))
    applied(cache)
    check(cache, a.slot, tokens, a.num_cached_tokens)
    write(cache, a.slot, tokens, a.num_cached_tokens, len(tokens))
    cache.cache_prefix(a.slot, tokens)
    cache.check_integrity()
    return a


@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefix_hits_share_blocks_and_data(device):
    cache = make(device)
    rng = random.Random(0)
    a_tok = [rng.randrange(100) for _ in range(70)]
    a = prefill(cache, "a", a_tok)
    b_tok = a_tok[:40] + [rng.randrange(100, 200) for _ in range(9)]
    b = prefill(cache, "b", b_tok)
    assert b.num_cached_tokens == 32  # two full blocks; the rest recomputed
    assert cache.blocks(b.slot)[:2] == cache.blocks(a.slot)[:2]
    assert cache.blocks(b.slot)[2] != cache.blocks(a.slot)[2]
    check(cache, a.slot, a_tok, 70)
    table = cache.kv_index([a.slot, b.slot])
    assert table.dtype == torch.int32 and table.shape == (2, 16)
    assert table[1, :5].tolist() == cache.blocks(b.slot) + [0]
    # full hit of a 64-token prompt: the last block is recomputed (last token needs logits)
    c = prefill(cache, "c", a_tok[:64])
    assert c.num_cached_tokens == 48
    for s, tok in ((a, a_tok), (b, b_tok), (c, a_tok[:64])):
        cache.release(s.slot, tok)
    cache.check_integrity()
    snap = cache.snapshot()
    assert snap["pages_in_use"] == 0 and snap["pages_cached"] > 0
    assert snap["prefix_hit_tokens"] == 32 + 48
    d = prefill(cache, "d", a_tok + [1])  # after release: still cached in the free queue
    assert d.num_cached_tokens == 64
    cache.close()


def test_paged_hash_collision_is_verified_by_tokens(monkeypatch):
    cache = make()
    monkeypatch.setattr(PagedKVCache, "_hash", staticmethod(lambda parent, tokens: 42))
    a = prefill(cache, "a", list(range(40)))
    b = prefill(cache, "b", list(range(100, 140)))  # same (fake) hash, other tokens
    assert b.num_cached_tokens == 0
    check(cache, a.slot, list(range(40)), 40)
    cache.close()


def test_paged_lru_eviction_tail_first_and_ensure_failure():
    cache = make(num_blocks=8, num_slots=3)
    old = list(range(64))  # 4 blocks
    a = prefill(cache, "a", old)
    cache.release(a.slot, old)
    assert cache.num_free_pages() == 8
    # free queue: 4 never-used blocks, then old's blocks tail first (3, 2, 1, 0)
    b = prefill(cache, "b", list(range(500, 570)))  # 5 blocks: evicts old's last block only
    assert cache.stats["evicted_pages"] == 1
    c = cache.acquire("c", old[:49])
    assert c.num_cached_tokens == 48  # the head of the old prompt survived
    assert not cache.ensure(c.slot, 200)
    cache.check_integrity()
    cache.free(b.slot)
    cache.free(c.slot)
    cache.check_integrity()
    cache.close()


@pytest.mark.parametrize("device", DEVICES)
def test_paged_swap_roundtrip(device):
    cache = make(device, num_blocks=10)
    tok = list(range(60))
    a = prefill(cache, "a", tok)
    b_tok = tok[:32] + [7] * 20
    b = prefill(cache, "b", b_tok)
    cache.swap_out(b.slot)
    cache.check_integrity()
    assert cache.num_free_pages() == 10 - 4  # only a's 4 blocks (2 shared with b) remain
    c = prefill(cache, "c", list(range(900, 960)))
    cache.free(c.slot)
    assert cache.swap_in(b.slot)
    applied(cache)
    cache.check_integrity()
    check(cache, b.slot, b_tok, len(b_tok))
    check(cache, a.slot, tok, len(tok))
    cache.close()


def test_paged_token_capacity_is_whole_blocks_up_to_max_tokens():
    cache = make(num_blocks=5, max_tokens=256)  # 5 blocks x 16 tokens
    assert cache.token_capacity() == 5 * 16 == 80
    slot = cache.acquire("r", list(range(70))).slot
    assert cache.ensure(slot, 80) and not cache.ensure(slot, 81)
    cache.close()
    assert make(num_blocks=24, max_tokens=256).token_capacity() == 256  # 384 > max_tokens
    # 256 B/token x 16 = 4 KiB blocks: a 14 KiB budget gives 3 whole blocks, 48 tokens.
    cache = PagedKVCache(SPEC, max_tokens=256, num_slots=2, budget_bytes=14 * 1024, device="cpu")
    assert cache.bytes_per_block == 4096 and cache.token_capacity() == 3 * 16
    cache.close()


def test_paged_config_errors():
    with pytest.raises(KVConfigError):
        PagedKVCache(SPEC, max_tokens=16, num_slots=1, budget_bytes=None, device="cpu")
    with pytest.raises(KVConfigError):
        PagedKVCache(SPEC, max_tokens=16, num_slots=1, budget_bytes=10, device="cpu")
    cache = make()
    with pytest.raises(ValueError):
        cache.acquire("x", [])
    a = prefill(cache, "a", [1, 2, 3])
    cache._blocks[cache.blocks(a.slot)[0]].ref_cnt += 1
    with pytest.raises(KVIntegrityError):
        cache.check_integrity()


OPS = ("open", "share", "grow", "release", "swap", "swapin", "free")


def run_paged_workload(ops: list[tuple[str, int]], num_blocks: int, device="cpu") -> None:
    cache = make(device, num_blocks=num_blocks)
    active: dict[str, tuple[int, list[int]]] = {}
    swapped: dict[str, tuple[int, list[int]]] = {}
    history: list[list[int]] = []
    for i, (op, seed) in enumerate(ops):
        rng = random.Random(seed)
        rid = f"r{i}"
        if op in ("open", "share"):
            base = rng.choice(history)[: rng.randrange(1, 80)] if op == "share" and history else []
            tok = (base + [rng.randrange(30) for _ in range(rng.randrange(1, 60))])[:256]
            a = cache.acquire(rid, tok)
            if a is not None:
                if cache.ensure(a.slot, len(tok)):
                    applied(cache)
                    check(cache, a.slot, tok, a.num_cached_tokens)
                    write(cache, a.slot, tok, a.num_cached_tokens, len(tok))
                    cache.cache_prefix(a.slot, tok)
                    active[rid] = (a.slot, tok)
                else:
                    cache.free(a.slot)
        elif op == "grow" and active:
            r = rng.choice(sorted(active))
            slot, tok = active[r]
            new = (tok + [rng.randrange(30) for _ in range(rng.randrange(1, 40))])[:256]
            if cache.ensure(slot, len(new)):
                applied(cache)
                write(cache, slot, new, len(tok), len(new))
                active[r] = (slot, new)
            else:
                cache.free(active.pop(r)[0])
        elif op == "release" and active:
            slot, tok = active.pop(rng.choice(sorted(active)))
            cache.release(slot, tok)
            history.append(tok)
        elif op == "swap" and active:
            r = rng.choice(sorted(active))
            cache.swap_out(active[r][0])
            swapped[r] = active.pop(r)
        elif op == "swapin" and swapped:
            r = rng.choice(sorted(swapped))
            if cache.swap_in(swapped[r][0]):
                active[r] = swapped.pop(r)
        elif op == "free" and (active or swapped):
            pool = active if active else swapped
            cache.free(pool.pop(rng.choice(sorted(pool)))[0])
        cache.check_integrity()
        applied(cache)
        for slot, tok in active.values():
            check(cache, slot, tok, len(tok))
    for slot, _ in list(active.values()) + list(swapped.values()):
        cache.free(slot)
    cache.check_integrity()
    assert cache.num_free_pages() == num_blocks
    cache.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_paged_randomized_workload_seeded(device, seed):
    rng = random.Random(seed)
    ops = [(rng.choice(OPS), rng.randrange(2**31)) for _ in range(80)]
    run_paged_workload(ops, rng.choice([6, 12, 30]), device)


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        ops=st.lists(
            st.tuples(st.sampled_from(OPS), st.integers(0, 2**31)), min_size=5, max_size=60
        ),
        num_blocks=st.sampled_from([6, 12, 30]),
    )
    def test_paged_randomized_workload(ops, num_blocks):
        run_paged_workload(ops, num_blocks)
