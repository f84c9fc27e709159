"""Batched sampling: penalties -> temperature -> top-k / top-p -> min-p -> sample.

Everything stays on the device; the engine makes one host transfer of the sampled ids per step
(plus one for logprobs when a request asks for them). Sampling uses the exponential trick
(gpt-fast): argmax(p / q) with q ~ Exp(1) draws from p without a host sync; a request with a
seed draws its q from its own torch.Generator, so its tokens do not depend on the batch.
Logprobs are those of the model's distribution (raw logits), as in vLLM v1.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from vtensor.engine.sequence import Sequence
from vtensor.engine.transfer import to_device


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [b] int64
    logprobs: torch.Tensor | None = None  # [b] logprob of the sampled token
    top_ids: torch.Tensor | None = None  # [b, k] top-k token ids (k = max asked in the batch)
    top_logprobs: torch.Tensor | None = None  # [b, k]


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output, HF/CTRL style), presence and frequency (output only,
    OpenAI style) penalties on the rows that ask for them. logits: [b, V] fp32 (modified)."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    outs = [seqs[i].output_token_ids for i in rows]
    alls = [seqs[i].token_ids for i in rows]

    def counts(lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in lists))
        ids = torch.full((len(lists), width), vocab, dtype=torch.long)  # vocab = padding
        for r, x in enumerate(lists):
            if x:
                ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        c = torch.zeros(len(lists), vocab + 1, dtype=logits.dtype, device=dev)
        ids = to_device(ids, torch.long, dev)
        c.scatter_add_(1, ids, torch.ones(ids.shape, dtype=logits.dtype, device=dev))
        return c[:, :vocab]

    idx = to_device(rows, torch.long, dev)
    sub = logits.index_select(0, idx)
    out_counts = counts(outs)

    def col(name: str) -> torch.Tensor:
        vals = [getattr(seqs[i].params, name) for i in rows]
        return to_device(vals, logits.dtype, dev)[:, None]

    rep = col("repetition_penalty")
    seen = counts(alls) > 0
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - col("frequency_penalty") * out_counts
    sub = sub - col("presence_penalty") * (out_counts > 0).to(sub.dtype)
    logits.index_copy_(0, idx, sub)
    return logits


# Bisection steps for top-p: the interval shrinks to max_p / 2**40, below fp32 resolution of
# any probability that matters.
_TOP_P_ITERS = 40


def top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k_max: int | None = None
) -> torch.Tensor:
    """Mask all but the top_k[i] largest and the smallest set reaching mass top_p[i] (of the
    unmasked distribution). logits: [b, V]; top_k: [b] int64 (V = disabled); top_p: [b]
    (1 = disabled); k_max: the largest enabled top_k (0: none), when the caller knows it
    (no host sync).

    No full-vocabulary sort (a 128K vocab makes that the sampler's cost): top-k takes the k-th
    largest value from `topk(k_max)` as a threshold; top-p bisects for the largest probability
    t whose tokens {p >= t} still reach the mass, i.e. the boundary token's probability. Both
    keep every token tied with the boundary (a sort keeps some of the tied ones by index)."""
    b, vocab = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool)
    if k_max is None:
        enabled = top_k[top_k < vocab]
        k_max = int(enabled.max()) if enabled.numel() else 0
    if 0 < k_max < vocab:
        kth = logits.topk(k_max, dim=-1).values.gather(1, (top_k.clamp(1, k_max) - 1)[:, None])
        keep &= (logits >= kth) | (top_k[:, None] >= vocab)
    rows = top_p < 1.0
    probs = logits.softmax(-1)
    lo = torch.zeros(b, 1, dtype=probs.dtype, device=probs.device)  # mass(p >= lo) >= top_p
    hi = probs.amax(-1, keepdim=True) * 1.001 + 1e-30  # mass(p >= hi) = 0 < top_p
    target = top_p.to(probs.dtype)[:, None]
    for _ in range(_TOP_P_ITERS):
        mid = (lo + hi) * 0.5
        ok = torch.where(probs >= mid, probs, 0).sum(-1, keepdim=True) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    keep &= (probs >= lo) | ~rows[:, None]
    return logits.masked_fill(~keep, float("-inf"))


def mask_min_tokens(logits: torch.Tensor, seqs: Seq[Sequence], eos: Seq[int]) -> None:
    """Requests short of min_tokens cannot draw EOS (unless ignore_eos) or a stop token id."""
    for i, s in enumerate(seqs):
        p = s.params
        if p.min_tokens and s.num_output_tokens < p.min_tokens:
            ids = [*([] if p.ignore_eos else eos), *p.stop_token_ids]
            if ids:
                logits[i, ids] = float("-inf")


class Sampler:
    def __init__(self, eos_token_ids: Seq[int] = ()) -> None:
        self.eos_token_ids = list(eos_token_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        """logits: [b, V] fp32, row i for seqs[i]."""
        params = [s.params for s in seqs]
        dev, vocab = logits.device, logits.shape[1]
        want_lp = [p.logprobs for p in params if p.logprobs is not None]
        raw = logits.log_softmax(-1) if want_lp else None
        if any(p.has_penalties or p.min_tokens for p in params):
            # never modify the caller's logits: a failed batch is re-sampled row by row
            logits = apply_penalties(logits.clone(), seqs)
            mask_min_tokens(logits, seqs, self.eos_token_ids)
        greedy = [p.greedy for p in params]
        if all(greedy):
            ids = logits.argmax(-1)
        else:
            ids = self._sample(logits, seqs, greedy, dev, vocab)
        out = SamplerOutput(ids)
        if raw is not None:
            out.logprobs = raw.gather(1, ids[:, None])[:, 0]
            k = max(want_lp)
            if k > 0:
                out.top_logprobs, out.top_ids = raw.topk(min(k, vocab), dim=-1)
        return out

    def _sample(
        self, logits: torch.Tensor, seqs: Seq[Sequence], greedy: list[bool], dev, vocab: int
    ) -> torch.Tensor:
        params = [s.params for s in seqs]
        argmax = logits.argmax(-1) if any(greedy) else None
        temps = to_device([p.temperature or 1.0 for p in params], logits.dtype, dev)
        x = logits / temps[:, None]
        if any(p.top_k_enabled or p.top_p < 1.0 for p in params):
            k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
            p_ = to_device([p.top_p for p in params], x.dtype, dev)
            k_max = max((v for v in k if v < vocab), default=0)
            x = top_k_top_p(x, to_device(k, torch.long, dev), p_, k_max=k_max)
        probs = x.softmax(-1)
        if any(p.min_p > 0 for p in params):
            mp = to_device([p.min_p for p in params], probs.dtype, dev)
            keep = probs >= mp[:, None] * probs.amax(-1, keepdim=True)
            probs = probs * keep
        q = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(seqs) if s.params.seed is not None]
        if len(seeded) < len(seqs):
            q.exponential_()
        for i in seeded:
            s = seqs[i]
            if s.generator is None:
                s.generator = torch.Generator(device=dev).manual_seed(s.params.seed)
            q[i].exponential_(generator=s.generator)
        ids = (probs / q).argmax(-1)
        if argmax is not None:
            mask = to_device(greedy, torch.bool, dev)
            ids = torch.where(mask, argmax, ids)
        return ids
