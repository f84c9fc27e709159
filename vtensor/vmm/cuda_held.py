"""cuMemMap / cuMemUnmap / cuMemSetAccess called with the GIL held (ctypes.PyDLL on libcuda).

Why: a call that releases the GIL (as ctypes.CDLL does, and as cuda-bindings may) makes the
mapper thread wait to take it back, up to a switch interval (5 ms) each time, whenever the
engine's main thread runs Python: on the host backend one page map went from ~5 us to 2.4-7 ms
that way (bench/results/2026-11-30d/host_vmm). These three calls take microseconds, so holding
the GIL through them costs the main thread little. Opt-in (`CudaBackend(held_gil=True)`, or
VTENSOR_VMM_HELD_GIL=1 for a whole engine run): on the H200 it moved the wait rather than
removing it (shared-prefix trace at 2 MiB pages: the step's wait for maps 1.74 -> 0.04 s,
scheduling 0.74 -> 2.16 s, the run 9.75 -> 9.41 s; bench/results/2026-11-30e/held_gil), and
with 8 MiB pages there are 4x fewer of these calls.

The access descriptor is cuda-bindings' own struct (passed by its address), so only scalar
arguments cross ctypes.
"""

from __future__ import annotations

import ctypes
from typing import Any


class HeldGilDriver:
    def __init__(self, access_desc: Any) -> None:
        lib = ctypes.PyDLL("libcuda.so.1")
        u64, size = ctypes.c_uint64, ctypes.c_size_t
        self._map = lib.cuMemMap
        self._map.argtypes = [u64, size, size, u64, ctypes.c_ulonglong]
        self._unmap = lib.cuMemUnmap
        self._unmap.argtypes = [u64, size]
        self._set_access = lib.cuMemSetAccess
        self._set_access.argtypes = [u64, size, ctypes.c_void_p, size]
        for f in (self._map, self._unmap, self._set_access):
            f.restype = ctypes.c_int
        self._desc = access_desc  # kept alive: its address is passed on every call
        self._desc_ptr = access_desc.getPtr()

    def map(self, addr: int, size: int, handle: int) -> int:
        return self._map(addr, size, 0, handle, 0)

    def unmap(self, addr: int, size: int) -> int:
        return self._unmap(addr, size)

    def set_access(self, addr: int, size: int) -> int:
        return self._set_access(addr, size, self._desc_ptr, 1)
