"""What the server reads off the engine it serves (AsyncLLM, or a test's stand-in): tokenizer,
max_model_len, whether it died, and how many tokens one request's KV can ever hold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _find(obj: Any, paths: Sequence[str]) -> Any:
    """First attribute path (dotted) that resolves on obj, else None."""
    for path in paths:
        cur = obj
        for name in path.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def engine_dead(engine: Any) -> BaseException | None:
    """The error that killed the engine's step thread, if it died (for the log only)."""
    dead = getattr(engine, "dead", None)
    return dead if isinstance(dead, BaseException) else getattr(engine, "_dead", None)


def engine_tokenizer(engine: Any) -> Any:
    tok = _find(engine, ("tokenizer", "engine.tokenizer"))
    if tok is None:
        raise RuntimeError("the engine exposes no tokenizer (AsyncLLM.tokenizer)")
    return tok


def engine_max_model_len(engine: Any) -> int:
    n = _find(
        engine,
        (
            "max_model_len",
            "engine.max_model_len",
            "args.max_model_len",
            "engine.args.max_model_len",
            "model_config.max_model_len",
            "engine.model_config.max_model_len",
        ),
    )
    if n is None:
        raise RuntimeError("the engine exposes no max_model_len")
    return int(n)


def kv_token_capacity(engine: Any) -> int | None:
    """Most tokens one request can hold in the KV cache with the engine to itself (None:
    unbounded or unknown). A request longer than this can never run."""
    kv = _find(engine, ("kv_cache", "engine.kv_cache"))
    if kv is None:
        return None
    snap = kv.snapshot()
    if snap.get("num_blocks") and snap.get("block_size"):  # paged: whole blocks of tokens
        return int(snap["num_blocks"]) * int(snap["block_size"])
    pages, ps, bpt = snap.get("budget_pages"), snap.get("page_size"), snap.get("bytes_per_token")
    if not pages or not ps or not bpt:
        return None
    return int(pages) * int(ps) // int(bpt)


def engine_vocab_size(engine: Any) -> int | None:
    v = _find(engine, ("model_config.vocab_size", "engine.model_config.vocab_size"))
    return None if v is None else int(v)
