"""Sampler, SamplingParams, detokenizer and memory parsing, without a model (fast)."""

from __future__ import annotations

import math

import pytest
import torch

from vtensor.engine import SamplingParams, parse_memory
from vtensor.engine.detokenizer import Detokenizer
from vtensor.engine.sampler import Sampler, apply_penalties, top_k_top_p
from vtensor.engine.sequence import Sequence


def seq(prompt, out=(), **params) -> Sequence:
    s = Sequence("r", None, list(prompt), SamplingParams(**params), Detokenizer(None, []), 0)
    s.token_ids += list(out)
    return s


def test_params_validation_names_the_field():
    for kw, field in [
        (dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"),
        (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence"),
        (dict(frequency_penalty=-3), "frequency"), (dict(logprobs=-1), "logprobs"),
        (dict(stop=[""]), "stop"), (dict(n=0), "n"), (dict(temperature=float("nan")), "temp"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(stop_token_ids=[-1]), "stop_token"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    p = SamplingParams(stop="x", presence_penalty=None, top_k=None)
    assert p.stop == ["x"] and p.presence_penalty == 0.0 and p.top_k == 0


def test_params_bounds_hostile_values():
    # Values that once reached the sampler and overflowed there (issue 15): each must be a
    # ValueError naming the field at construction, before the engine sees it.
    inf, nan = float("inf"), float("nan")
    for kw, field in [
        (dict(top_k=10**20), "top_k"), (dict(top_k=2**31), "top_k"), (dict(top_k=True), "top_k"),
        (dict(top_k=1.5), "top_k"), (dict(repetition_penalty=1e308), "repetition_penalty"),
        (dict(repetition_penalty=inf), "repetition_penalty"),
        (dict(repetition_penalty=2.5), "repetition_penalty"), (dict(temperature=inf), "temp"),
        (dict(top_p=nan), "top_p"), (dict(min_p=nan), "min_p"),
        (dict(presence_penalty=nan), "presence"), (dict(frequency_penalty=-inf), "frequency"),
        (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=1.0), "seed"),
        (dict(logprobs=2**40), "logprobs"), (dict(temperature="1"), "temperature"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    # the edges themselves are fine
    SamplingParams(top_k=2**31 - 1, repetition_penalty=2.0, seed=2**63 - 1, temperature=0)
    SamplingParams(top_k=-1, repetition_penalty=1e-3, seed=-(2**63), temperature=100.0)


def test_penalties_on_crafted_logits():
    V = 8
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]] * 4)
    seqs = [
        seq([0], [1], repetition_penalty=2.0),  # token 0 in prompt, 1 in output
        seq([5], [2, 2, 3], frequency_penalty=0.5),  # output counts 2:2, 3:1
        seq([5], [2, 2, 3], presence_penalty=0.5),
        seq([0], [0]),  # no penalty: untouched
    ]
    out = apply_penalties(logits.clone(), seqs)
    exp = logits.clone()
    exp[0, 0], exp[0, 1] = 1.0, -4.0  # positive / penalty, negative * penalty
    exp[1, 2], exp[1, 3] = 1.0 - 1.0, 0.5 - 0.5
    exp[2, 2], exp[2, 3] = 1.0 - 0.5, 0.5 - 0.5
    torch.testing.assert_close(out, exp)
    assert out.shape == (4, V)
    # the penalty moves greedy off a repeated token
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    ids = Sampler()(logits.clone(), [seq([7 % 3], [0], temperature=0.0, presence_penalty=0.5)])
    assert ids.token_ids.tolist() == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    seqs = [seq([3], [3], min_tokens=2, stop_token_ids=[1], temperature=0.0),
            seq([3], [3, 3], min_tokens=2, temperature=0.0),  # reached: EOS allowed
            seq([3], [], min_tokens=1, ignore_eos=True, temperature=0.0)]  # fmt: skip
    out = Sampler(eos_token_ids=[0])(logits.clone(), seqs)
    assert out.token_ids.tolist() == [2, 0, 0]


def test_top_k_top_p_masks_against_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=g, dtype=torch.float64)
    ks = torch.tensor([1, 5, 50, 50, 3])
    ps = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.3], dtype=torch.float64)
    out = top_k_top_p(logits, ks, ps)
    for i in range(5):  # reference: keep the sorted prefix until both limits are met
        vals, idx = logits[i].sort(descending=True)
        probs = vals.softmax(-1)
        keep = set()
        mass = 0.0
        for r in range(50):
            if r >= ks[i] or mass >= ps[i]:
                break
            keep.add(int(idx[r]))
            mass += float(probs[r])
        kept = {int(j) for j in torch.nonzero(torch.isfinite(out[i]))}
        assert kept == keep
        assert torch.equal(out[i][list(keep)], logits[i][list(keep)])


def test_sampling_distribution_seed_and_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler()
    counts = torch.zeros(4)
    s = seq([0], temperature=1.0, seed=123)
    draws = []
    for _ in range(2000):
        t = int(sampler(logits.clone(), [s]).token_ids[0])
        counts[t] += 1
        draws.append(t)
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    s2 = seq([0], temperature=1.0, seed=123)
    assert [int(sampler(logits.clone(), [s2]).token_ids[0]) for _ in range(50)] == draws[:50]
    # min_p 0.4 keeps tokens with p >= 0.2 (0 and 1 only); top_k=1 is greedy
    s3 = seq([0], temperature=1.0, min_p=0.4, seed=1)
    assert {int(sampler(logits.clone(), [s3]).token_ids[0]) for _ in range(200)} == {0, 1}
    s4 = seq([0], temperature=1.5, top_k=1)
    assert {int(sampler(logits.clone(), [s4]).token_ids[0]) for _ in range(50)} == {0}


def test_logprobs_normalized_and_sorted():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 100, generator=g)
    seqs = [seq([0], temperature=0.0, logprobs=5), seq([0], temperature=0.0),
            seq([0], temperature=0.0, logprobs=0)]  # fmt: skip
    out = Sampler()(logits.clone(), seqs)
    ref = torch.log_softmax(logits.double(), -1)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(out.logprobs.double(), ref.max(-1).values, atol=1e-5, rtol=0)
    assert out.top_logprobs.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert math.isclose(float(ref[0].exp().sum()), 1.0, rel_tol=1e-9)
    assert float(torch.logsumexp(out.top_logprobs[0].double(), 0)) <= 1e-6


def test_parse_memory():
    assert parse_memory("4GiB") == 4 * 2**30 and parse_memory("512MB") == 512_000_000
    assert parse_memory("0.8") == 0.8 and parse_memory(123) == 123 and parse_memory(None) is None
    for bad in ("lots", "4XB", 0, 1.5, "-1GiB"):
        with pytest.raises(ValueError, match="kv_memory"):
            parse_memory(bad)


class CharTokenizer:
    """One character per token id; id 0 is a special token, 1 is half of a two-id char."""

    def decode(self, ids, skip_special_tokens=True):
        text = ""
        for i in ids:
            if i == 0:
                text += "" if skip_special_tokens else "<s>"
            elif i == 1:
                text += "\ufffd"
            else:
                text += chr(i)
        return text.replace("\ufffd" + chr(2), "é")


def test_detokenizer_incremental_and_stop_strings():
    d = Detokenizer(CharTokenizer(), [ord("a")], stop=["lo w"])
    for c in "hel":
        assert d.add(ord(c)) is None
    # while running, the last len("lo w") - 1 chars could start a stop string: held back
    assert d.visible(False) == "" and d.visible(True) == "hel"
    assert d.add(0) is None and d.add(1) is None and d.text == "hel"  # special, partial char
    assert d.add(2) is None and d.text == "helé"
    assert d.add(ord("!")) is None and d.visible(False) == "he"
    d2 = Detokenizer(CharTokenizer(), [], stop=["lo w", "xyz"])
    stops = [d2.add(ord(c)) for c in "hello w"]
    assert stops == [None] * 6 + ["lo w"] and d2.text == "hel"
    d3 = Detokenizer(CharTokenizer(), [], stop=["lo"], include_stop_str_in_output=True)
    assert [d3.add(ord(c)) for c in "halo"][-1] == "lo" and d3.text == "halo"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_top_p_without_sort_matches_the_sorted_rule(dtype):
    """Many rows, a larger vocabulary, peaked and flat rows: the bisection and top-k threshold
    keep exactly the sorted rule's set (random logits: no ties)."""
    g = torch.Generator().manual_seed(1)
    b, vocab = 48, 3000
    scale = torch.logspace(-1, 1.5, b, dtype=torch.float64)[:, None]
    logits = (torch.randn(b, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    ks = torch.randint(1, vocab + 1, (b,), generator=g)
    ks[::3] = vocab  # top-k off
    ps = torch.rand(b, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ps[1::4] = 1.0  # top-p off
    out = top_k_top_p(logits, ks, ps.to(dtype))
    vals, idx = logits.double().sort(dim=-1, descending=True)
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    rank = torch.arange(vocab)[None, :]
    keep_sorted = (rank < ks[:, None]) & ((before < ps[:, None]) | (ps[:, None] >= 1))
    want = torch.zeros(b, vocab, dtype=torch.bool).scatter_(1, idx, keep_sorted)
    assert torch.equal(torch.isfinite(out), want)
