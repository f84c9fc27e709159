"""Helpers shared by the engine tests: HF greedy references and reference-op fallbacks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def engine_env():
    """One intra-op thread: batches of a few tokens gain nothing from more, and on a busy
    2-core CI box OpenMP spin-waiting makes small matmuls 10-30x slower. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_greedy(hf, prompt_ids: list[int], max_new: int) -> list[int]:
    """HF transformers' greedy continuation (argmax of its logits, with its own KV cache),
    EOS not special: what `ignore_eos` asks of the engine. (HF `generate(min_new_tokens=...)`
    would instead forbid EOS, which changes the tokens.)"""
    out: list[int] = []
    with torch.no_grad():
        dev = hf.device
        res = hf(torch.tensor([prompt_ids], device=dev), use_cache=True)
        for _ in range(max_new):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]], device=dev)
            res = hf(ids, past_key_values=res.past_key_values, use_cache=True)
    return out


def greedy(max_tokens: int, **kw):
    from vtensor.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
