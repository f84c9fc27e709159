"""Incremental detokenization on the embedded model's real tokenizer: the fast path (tokenizers'
DecodeStream) and our own windowed decoding both stream exactly the text of a one-shot decode,
multi-byte characters split over tokens and special tokens included."""

from __future__ import annotations

import random

import pytest

from vtensor.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(default_gguf_path):
    from vtensor.model import load_tokenizer

    return load_tokenizer(default_gguf_path)


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Émojis 🎉🚀 and 中文字符 and Ünïcödé split over several byte tokens.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
]


def _stream(tok, prompt, out, fast: bool, **kw) -> tuple[str, list[str]]:
    d = Detokenizer(tok, prompt, **kw)
    if not fast:
        d.stream = None
    assert (d.stream is not None) == fast
    seen = []
    for t in out:
        d.add(t)
        seen.append(d.visible(False))
    return d.text, seen


@pytest.mark.parametrize("fast", [True, False], ids=["decode_stream", "windowed"])
def test_streamed_text_equals_one_shot_decode(tok, fast):
    rng = random.Random(0)
    special = tok.all_special_ids
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        prompt = tok.encode("Say something:", add_special_tokens=False)
        out = list(ids)
        out.insert(rng.randrange(len(out)), special[0])  # a special token mid-stream
        got, seen = _stream(tok, prompt, out, fast)
        assert got == tok.decode(out, skip_special_tokens=True)
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # append-only
        assert "\ufffd" not in got


def test_fast_path_matches_windowed_on_random_ids_with_stops(tok):
    rng = random.Random(1)
    vocab = tok.vocab_size
    for _ in range(20):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
        out = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        kw = dict(stop=["the", "\n"], include_stop_str_in_output=rng.random() < 0.5)
        results = []
        for fast in (True, False):
            d = Detokenizer(tok, prompt, **kw)
            if not fast:
                d.stream = None
            stop = None
            for t in out:
                stop = d.add(t)
                if stop:
                    break
            results.append((d.text, stop))
        assert results[0] == results[1]


def test_ids_outside_the_vocab_fall_back_without_error(tok):
    d = Detokenizer(tok, [])
    for t in tok.encode("ok then", add_special_tokens=False):
        d.add(t)
    d.add(tok.vocab_size + 1000)  # a padded-vocab id: nothing to print, no exception
    d.add(tok.encode(" done", add_special_tokens=False)[0])
    assert d.text.startswith("ok then")
