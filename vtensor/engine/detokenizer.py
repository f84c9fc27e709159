"""Incremental detokenization and stop strings.

Fast tokenizers go through `tokenizers`' own DecodeStream (one Rust call per token, ~2 us
against ~17 us for two Python-level decodes: at batch 256 that is 4 ms of every decode step).
Otherwise (slow tokenizers, an old `tokenizers`, a token it rejects) we decode ourselves:
decoding the whole output every step is O(n^2) over a request; instead we decode a small window
(vLLM's prefix_offset / read_offset scheme): the text of tokens[prefix:read] is already emitted,
tokens[prefix:] decoded now gives the new suffix. A trailing U+FFFD means a multi-byte character
is still incomplete, so we wait for the next token. A few prompt tokens seed the window so that
the first output token gets its leading space right (SentencePiece-style tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT = 5  # prompt tokens kept in the window for the first output tokens


def _decode_stream(tokenizer: Any, context: list[int], skip_special: bool) -> Any:
    """A tokenizers.decoders.DecodeStream seeded with `context`, or None if unavailable."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=skip_special)
    except (ImportError, TypeError):  # tokenizers < 0.22: no seeded stream
        return None


class Detokenizer:
    __slots__ = ("tokenizer", "skip_special", "ids", "prefix", "read", "text", "stop", "max_stop",
                 "include_stop", "stream", "backend")  # fmt: skip

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # output text so far (stop string trimmed once found)
        self.stop = list(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.include_stop = include_stop_str_in_output
        self.stream = (
            _decode_stream(tokenizer, self.ids, skip_special_tokens) if tokenizer else None
        )
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if self.stream else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Append one output token; returns the stop string it completed, or None."""
        if self.tokenizer is None:
            return None
        self.ids.append(token_id)
        if self.stream is not None:
            try:
                delta = self.stream.step(self.backend, token_id)
            except Exception:  # noqa: BLE001 - e.g. an id past the tokenizer's vocab
                self.stream = None  # decode ourselves from here on
                self.prefix = self.read = len(self.ids) - 1
                return self.add(self.ids.pop())
            if not delta:
                return None  # nothing printable yet (special token skipped, partial character)
        else:
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            if len(after) <= len(before) or after.endswith("\ufffd"):
                return None  # nothing printable yet (special token skipped, partial character)
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._append_text(delta)

    def _append_text(self, delta: str) -> str | None:
        start = max(0, len(self.text) - self.max_stop + 1)  # a stop may straddle the boundary
        self.text += delta
        if not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def visible(self, finished: bool) -> str:
        """Text that is safe to stream: while running, hold back a tail that could still turn
        out to be the start of a stop string (it would be trimmed later)."""
        if finished or not self.max_stop:
            return self.text
        return self.text[: max(0, len(self.text) - self.max_stop + 1)]
