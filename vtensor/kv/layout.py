"""KV layout: one reservation, `kv[slot, token, layer, k_or_v, kv_head, head_dim]`, token-major.

    slot 0                          slot 1
    |tok0: L0.K L0.V L1.K L1.V ...|tok1 ...|.....|pad to page| tok0 ...
    |<------------- page 0 ------------->|<-- page 1 ...      |<- slot_bytes ->|

Token-major means one page holds a run of consecutive tokens for *all* layers, so a request
wastes at most one page (a per-layer layout wastes up to 2 x layers pages). Slots start on a page
boundary so that page j of any slot holds the same token bytes: that is what lets two slots
alias one physical page for a shared prefix. `bytes_per_token` need not divide the page: a page
may hold part of a token, and all arithmetic below is in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVConfigError(ValueError):
    """A KV configuration that cannot be laid out (bad sizes, too large for the address space)."""


@dataclass(frozen=True, slots=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise KVConfigError(f"KVSpec.{name}={getattr(self, name)} must be positive")
        if not self.dtype.is_floating_point:
            raise KVConfigError(f"KVSpec.dtype={self.dtype} must be a floating point dtype")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        # K and V of every layer: layers * 2 * kv_heads * head_dim elements.
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class KVLayout:
    def __init__(self, spec: KVSpec, num_slots: int, max_tokens: int, page_size: int) -> None:
        if num_slots <= 0 or max_tokens <= 0:
            raise KVConfigError(f"num_slots={num_slots} and max_tokens={max_tokens} must be > 0")
        if page_size <= 0 or page_size % spec.itemsize:
            raise KVConfigError(f"page_size={page_size} must be a positive multiple of itemsize")
        self.spec = spec
        self.num_slots = num_slots
        self.max_tokens = max_tokens
        self.page_size = page_size
        self.itemsize = spec.itemsize
        self.bytes_per_token = spec.bytes_per_token
        self.pages_per_slot = _ceil_div(max_tokens * self.bytes_per_token, page_size)
        self.slot_bytes = self.pages_per_slot * page_size
        self.total_bytes = self.slot_bytes * num_slots
        self.num_pages = self.pages_per_slot * num_slots
        # Element strides of the 6-d view kv[slot, token, layer, k_or_v, kv_head, head_dim].
        self.slot_stride = self.slot_bytes // self.itemsize
        self.token_stride = self.bytes_per_token // self.itemsize

    # ---- views ----
    def layer_views(self, base: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each [num_slots, max_tokens, kv_heads, head_dim], last dim
        contiguous, all zero-copy views of `base` (a flat tensor of spec.dtype covering
        total_bytes, e.g. VirtualTensor.view(dtype, (total_bytes // itemsize,)))."""
        if base.dtype != self.spec.dtype or base.numel() * self.itemsize < self.total_bytes:
            raise KVConfigError(
                f"base must be {self.spec.dtype} with >= {self.total_bytes} bytes, "
                f"got {base.dtype} x {base.numel()}"
            )
        h, d = self.spec.num_kv_heads, self.spec.head_dim
        shape = (self.num_slots, self.max_tokens, h, d)
        stride = (self.slot_stride, self.token_stride, d, 1)
        off0 = base.storage_offset()
        views = []
        for layer in range(self.spec.num_layers):
            k_off = off0 + layer * 2 * h * d
            k = base.as_strided(shape, stride, k_off)
            v = base.as_strided(shape, stride, k_off + h * d)
            views.append((k, v))
        return views

    # ---- token <-> byte <-> page arithmetic (pages are slot-relative unless named global) ----
    def token_byte(self, token: int) -> int:
        """Slot-relative byte offset where `token` starts."""
        return token * self.bytes_per_token

    def pages_for(self, num_tokens: int) -> int:
        """Pages a slot needs to hold tokens [0, num_tokens)."""
        pages = _ceil_div(num_tokens * self.bytes_per_token, self.page_size)
        return min(pages, self.pages_per_slot)

    def full_pages(self, num_tokens: int) -> int:
        """Pages entirely covered by the bytes of tokens [0, num_tokens)."""
        return (num_tokens * self.bytes_per_token) // self.page_size

    def tokens_in_pages(self, num_pages: int) -> int:
        """Tokens whose bytes lie entirely inside pages [0, num_pages)."""
        return (num_pages * self.page_size) // self.bytes_per_token

    def chunk_end(self, page: int) -> int:
        """Tokens [0, chunk_end(j)) determine the bytes of page j (a page's content depends on
        every token that has a byte in it, and causally on all tokens before)."""
        return min(_ceil_div((page + 1) * self.page_size, self.bytes_per_token), self.max_tokens)

    def page_range(self, slot: int, start_token: int, end_token: int) -> tuple[int, int]:
        """Global page indices [first, last) holding the bytes of tokens [start, end)."""
        if not 0 <= slot < self.num_slots:
            raise KVConfigError(f"slot {slot} out of range [0, {self.num_slots})")
        if not 0 <= start_token <= end_token <= self.max_tokens:
            raise KVConfigError(f"token range [{start_token}, {end_token}) out of range")
        base = slot * self.pages_per_slot
        if start_token == end_token:
            p = base + self.token_byte(start_token) // self.page_size
            return p, p
        first = self.token_byte(start_token) // self.page_size
        last = _ceil_div(self.token_byte(end_token), self.page_size)
        return base + first, base + last

    def slot_page(self, slot: int, page: int) -> int:
        """Global page index of slot-relative page `page`."""
        return slot * self.pages_per_slot + page
