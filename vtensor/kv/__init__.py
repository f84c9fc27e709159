"""KV cache: token-major layout over one virtual tensor, radix prefix cache, paged baseline;
both behind the `KVManager` interface."""

from vtensor.kv.budget import KV_MEMORY_FRACTION, resolve_budget
from vtensor.kv.cache import KVCache
from vtensor.kv.layout import KVConfigError, KVLayout, KVSpec
from vtensor.kv.manager import Allocation, KVIntegrityError, KVManager, SlotStateError
from vtensor.kv.paged import PagedKVCache
from vtensor.kv.plan import PagePlan
from vtensor.kv.radix import RadixNode, RadixTree

__all__ = [
    "KV_MEMORY_FRACTION", "Allocation", "KVCache", "KVConfigError", "KVIntegrityError",
    "KVLayout", "KVManager", "KVSpec", "PagePlan", "PagedKVCache", "RadixNode", "RadixTree",
    "SlotStateError", "resolve_budget",
]  # fmt: skip
