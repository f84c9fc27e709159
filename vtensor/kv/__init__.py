"""KV cache: token-major layout over one virtual tensor, radix prefix cache, paged baseline."""

from vtensor.kv.cache import Allocation, KVCache, KVIntegrityError, SlotStateError, resolve_budget
from vtensor.kv.layout import KVConfigError, KVLayout, KVSpec
from vtensor.kv.paged import PagedKVCache
from vtensor.kv.radix import RadixNode, RadixTree

__all__ = [
    "Allocation", "KVCache", "KVConfigError", "KVIntegrityError", "KVLayout", "KVSpec",
    "PagedKVCache", "RadixNode", "RadixTree", "SlotStateError", "resolve_budget",
]  # fmt: skip
