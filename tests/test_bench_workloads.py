"""Workload generators: fixed seeds, documented distributions, sizes, and bad input."""

from __future__ import annotations

import random
import statistics

import pytest

from vtensor.bench import workloads as W


@pytest.mark.parametrize("name", sorted(W.GENERATORS))
@pytest.mark.parametrize("size", ["quick", "full"])
def test_every_generator_is_deterministic_and_in_range(name, size):
    a = W.make(name, size, seed=3, token_range=(10, 500))
    b = W.make(name, size, seed=3, token_range=(10, 500))
    c = W.make(name, size, seed=4, token_range=(10, 500))
    assert a == b  # same seed, same workload
    assert a != c  # another seed, another workload
    toks = [t for r in a.requests for t in r.prompt_token_ids]
    toks += [t for cv in a.conversations for u in cv.user_turns for t in u]
    assert toks and min(toks) >= 10 and max(toks) < 500
    st = a.stats()
    assert st["num_requests"] > 0 and st["prompt_tokens"] > 0 and st["max_output_tokens"] > 0
    assert a.max_context() == st["max_context"]
    assert all(r.max_tokens >= 1 for r in a.requests)
    assert all(n >= 1 for cv in a.conversations for n in cv.reply_lens)


def test_full_sizes_match_the_plan():
    assert W.make("multi_turn").stats()["num_requests"] == 64 * 4
    assert W.make("shared_prefix").stats()["num_requests"] == 256
    assert W.make("long_context").stats()["num_requests"] == 16
    assert W.make("sharegpt").stats()["num_requests"] == 512


def test_sharegpt_lengths_lognormal_median_100_tail_to_2k():
    rng = random.Random(0)
    xs = [W.sharegpt_message_len(rng) for _ in range(20000)]
    assert 85 <= statistics.median(xs) <= 115
    assert min(xs) >= 4 and max(xs) <= 2048
    assert max(xs) > 1500  # a long tail, reaching toward 2K
    assert sum(x > 1000 for x in xs) / len(xs) < 0.02  # ... but a thin one
    ys = [W.sharegpt_reply_len(rng) for _ in range(20000)]
    assert 85 <= statistics.median(ys) <= 115 and max(ys) <= 1024


def test_multi_turn_shape_and_context_cap():
    wl = W.multi_turn(20, 5, seed=1, max_context=600)
    assert len(wl.conversations) == 20 and wl.multi_turn
    for cv in wl.conversations:
        assert len(cv.user_turns) == len(cv.reply_lens) == 5
        total = sum(map(len, cv.user_turns)) + sum(cv.reply_lens)
        assert total <= 600
        assert all(len(u) >= 1 for u in cv.user_turns)
    st = wl.stats()
    # prompts resend the history: turn t's prompt counts every earlier message and reply
    cv = wl.conversations[0]
    first_prompts = sum(
        sum(map(len, cv.user_turns[: t + 1])) + sum(cv.reply_lens[:t]) for t in range(5)
    )
    assert st["prompt_tokens"] >= first_prompts


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_shared_prefix_requests_share_their_system_prompt():
    wl = W.shared_prefix(12, 3, prefix_len=(50, 80), seed=2)
    ids = [r.prompt_token_ids for r in wl.requests]
    for i in range(12):
        for j in range(i + 1, 12):
            n = _common(ids[i], ids[j])
            if i % 3 == j % 3:
                assert 50 <= n <= 80 + 2048  # the whole system prompt in common
            else:
                assert n < 5  # different system prompts


def test_long_context_lengths():
    wl = W.long_context(6, seed=0)
    for r in wl.requests:
        assert 6144 <= len(r.prompt_token_ids) <= 8192
        assert 2048 <= r.max_tokens <= 4096


def test_truncate_and_len_scale():
    wl = W.make("sharegpt", "full")
    small = W.truncate(wl, 10)
    assert small.requests == wl.requests[:10] and small.params["truncated_to"] == 10
    scaled = W.sharegpt(200, len_scale=0.1, seed=0)
    assert statistics.median(len(r.prompt_token_ids) for r in scaled.requests) < 20


@pytest.mark.parametrize(
    "call",
    [
        lambda: W.make("nope"),
        lambda: W.make("sharegpt", "huge"),
        lambda: W.sharegpt(0),
        lambda: W.multi_turn(2, 0),
        lambda: W.multi_turn(2, 4, max_context=3),
        lambda: W.sharegpt(2, token_range=(5, 5)),
        lambda: W.long_context(2, len_scale=-1),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
