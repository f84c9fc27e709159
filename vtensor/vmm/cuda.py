"""CudaBackend: CUDA virtual memory management through cuda-bindings' driver API.

Shares PyTorch's primary context of the chosen device. Every call makes that context current in
the calling thread first (the mapper thread starts with none; a caller thread working on
another device gets it pushed and popped), so the backend works from any thread and with any
current device index.

as_tensor: torch.as_tensor(__cuda_array_interface__) asks the driver about the base pointer and
refuses an unmapped one. So when the base page is not mapped, a scratch page (one per backend)
is mapped there for the instant the tensor is built, then unmapped. The tensor only holds the
pointer; later mappings under it are seen as usual. VirtualTensor builds its base tensor at
construction, before any real map can be queued, so the scratch never races a real mapping.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any

import torch

from vtensor.vmm.backend import Backend
from vtensor.vmm.errors import DriverError, OutOfRange, VmmError


class _CudaArray:
    """Minimal __cuda_array_interface__ (v3) exporter: uint8 [nbytes] at ptr."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,  # no synchronization: nothing was written by another stream
        }


class CudaBackend(Backend):
    name = "cuda"

    def __init__(
        self,
        device: torch.device | str | int | None = None,
        page_size: int | None = None,
        held_gil: bool | None = None,
        min_page_size: int | None = None,
    ):
        """page_size: a multiple of the allocation granularity (2 MiB on NVIDIA GPUs); None:
        the granularity, or min_page_size rounded up to it. held_gil: map / unmap / set access
        with the GIL held (`cuda_held.py`); default from VTENSOR_VMM_HELD_GIL=1 (off), so an
        engine run can A/B it unchanged."""
        from cuda.bindings import driver as cu

        self._cu = cu
        torch.cuda.init()
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        if dev.type != "cuda":
            raise ValueError(f"CudaBackend needs a cuda device, got {dev}")
        self.ordinal = torch.cuda.current_device() if dev.index is None else dev.index
        self.device = torch.device("cuda", self.ordinal)
        with torch.cuda.device(self.ordinal):
            torch.empty(1, device=self.device)  # make PyTorch create its primary context
        self._tls = threading.local()
        self._call("cuInit", cu.cuInit(0))  # no-op after torch's init; loads the entry points
        self._cudev = self._call("cuDeviceGet", cu.cuDeviceGet(self.ordinal))
        self._ctx = self._call("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._cudev))
        name = self._call("cuDeviceGetName", cu.cuDeviceGetName(256, self._cudev))
        self.device_name = name.split(b"\0", 1)[0].decode()

        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.ordinal
        self._prop = prop
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.ordinal
        desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [desc]
        self._held = None
        if held_gil is None:
            held_gil = os.environ.get("VTENSOR_VMM_HELD_GIL") == "1"
        if held_gil:
            from vtensor.vmm.cuda_held import HeldGilDriver

            self._held = HeldGilDriver(desc)
        with self._current():
            gran = self._call(
                "cuMemGetAllocationGranularity",
                cu.cuMemGetAllocationGranularity(
                    prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
            )
        self.granularity = int(gran)
        if page_size is None:
            want = max(int(min_page_size or 0), self.granularity)
            page_size = -(-want // self.granularity) * self.granularity
        page_size = int(page_size)
        if page_size <= 0 or page_size % self.granularity:
            raise ValueError(f"page_size={page_size} must be a multiple of {self.granularity}")
        super().__init__(page_size)
        self._objs: dict[int, Any] = {}  # handle int -> CUmemGenericAllocationHandle
        self._scratch: int | None = None
        self._fin = weakref.finalize(self, CudaBackend._cleanup, cu, self._cudev)

    @staticmethod
    def _cleanup(cu: Any, cudev: Any) -> None:
        # At interpreter shutdown the driver may be gone: nothing left to report to.
        with contextlib.suppress(Exception):
            cu.cuDevicePrimaryCtxRelease(cudev)

    # ---- driver plumbing ----
    def _call(self, call: str, res: tuple) -> Any:
        err = res[0]
        if err != self._cu.CUresult.CUDA_SUCCESS:
            r = self._cu.cuGetErrorName(err)
            name = r[1].decode() if r[0] == self._cu.CUresult.CUDA_SUCCESS else str(err)
            raise DriverError(call, name, int(err))
        if len(res) == 1:
            return None
        return res[1] if len(res) == 2 else res[1:]

    class _Ctx:
        __slots__ = ("b", "pushed")

        def __init__(self, b: CudaBackend) -> None:
            self.b = b
            self.pushed = False

        def __enter__(self) -> None:
            b, cu = self.b, self.b._cu
            if getattr(b._tls, "bound", False):
                return
            cur = b._call("cuCtxGetCurrent", cu.cuCtxGetCurrent())
            cur = 0 if cur is None else int(cur)
            if cur == int(b._ctx):
                return  # checked on every call: the caller may switch devices later
            if cur == 0:
                # A thread with no context (the mapper): ours becomes its context for good.
                b._call("cuCtxSetCurrent", cu.cuCtxSetCurrent(b._ctx))
                b._tls.bound = True
            else:
                b._call("cuCtxPushCurrent", cu.cuCtxPushCurrent(b._ctx))
                self.pushed = True

        def __exit__(self, *exc: object) -> None:
            if self.pushed:
                self.b._call("cuCtxPopCurrent", self.b._cu.cuCtxPopCurrent())

    def _current(self) -> CudaBackend._Ctx:
        return CudaBackend._Ctx(self)

    # ---- contract ----
    def reserve(self, nbytes: int) -> int:
        cu = self._cu
        with self._lock:
            self._check_open()
            self._check_nbytes(nbytes)
        with self._current():
            ptr = self._call(
                "cuMemAddressReserve", cu.cuMemAddressReserve(nbytes, self.page_size, 0, 0)
            )
        addr = int(ptr)
        with self._lock:
            self._add_reservation(addr, nbytes)
        return addr

    def free_reservation(self, addr: int, nbytes: int) -> None:
        with self._lock:
            self._check_free_reservation(addr, nbytes)
            self._drop_reservation(addr)
        with self._current():
            self._call("cuMemAddressFree", self._cu.cuMemAddressFree(addr, nbytes))

    def create(self) -> int:
        with self._lock:
            self._check_open()
        with self._current():
            h = self._call("cuMemCreate", self._cu.cuMemCreate(self.page_size, self._prop, 0))
        with self._lock:
            self._objs[int(h)] = h
            self._handles[int(h)] = 0
        return int(h)

    def release(self, handle: int) -> None:
        with self._lock:
            self._check_open()
            if handle not in self._handles:
                raise VmmError(f"unknown or already released page handle {handle}")
            # Releasing a still-mapped handle is legal on CUDA (freed at its last unmap).
            del self._handles[handle]
            obj = self._objs.pop(handle)
        with self._current():
            self._call("cuMemRelease", self._cu.cuMemRelease(obj))

    def map(self, addr: int, handle: int) -> None:
        self.map_range(addr, [handle])

    def map_range(self, addr: int, handles: list[int]) -> None:
        """cuMemMap each page, then one cuMemSetAccess over the whole run (~40 us a call)."""
        if not handles:
            return
        with self._lock:
            addrs = [addr + i * self.page_size for i in range(len(handles))]
            for a, h in zip(addrs, handles, strict=True):
                self._check_map(a, h)
            if len(set(addrs)) != len(addrs):
                raise OutOfRange("duplicate addresses in map_range")
            objs = [self._objs[h] for h in handles]
        done = 0
        try:
            with self._current():
                for a, obj in zip(addrs, objs, strict=True):
                    self.map_only(a, obj)
                    done += 1
                self.set_access(addr, len(handles) * self.page_size)
        except BaseException:
            with self._current():  # undo the partial batch: no half-mapped state
                for a in addrs[:done]:
                    self._cu.cuMemUnmap(a, self.page_size)
            raise
        with self._lock:
            for a, h in zip(addrs, handles, strict=True):
                self._mapped[a] = h
                self._handles[h] += 1

    # The two halves of map, separately callable for the benchmark's per-op latencies.
    def map_only(self, addr: int, obj: Any) -> None:
        if self._held is not None:
            self._check_held("cuMemMap", self._held.map(addr, self.page_size, int(obj)))
            return
        self._call("cuMemMap", self._cu.cuMemMap(addr, self.page_size, 0, obj, 0))

    def set_access(self, addr: int, nbytes: int) -> None:
        if self._held is not None:
            self._check_held("cuMemSetAccess", self._held.set_access(addr, nbytes))
            return
        self._call("cuMemSetAccess", self._cu.cuMemSetAccess(addr, nbytes, self._access, 1))

    def _check_held(self, call: str, err: int) -> None:
        if err:
            self._call(call, (self._cu.CUresult(err),))

    def unmap(self, addr: int) -> None:
        with self._lock:
            handle = self._check_unmap(addr)
        with self._current():
            if self._held is not None:
                self._check_held("cuMemUnmap", self._held.unmap(addr, self.page_size))
            else:
                self._call("cuMemUnmap", self._cu.cuMemUnmap(addr, self.page_size))
        with self._lock:
            del self._mapped[addr]
            if handle in self._handles:
                self._handles[handle] -= 1

    def as_tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._check_open()
            if nbytes <= 0:
                raise OutOfRange(f"nbytes={nbytes} must be positive")
            self._reservation_of(addr, nbytes)
            base_mapped = addr in self._mapped
        if base_mapped:
            return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)
        if self._scratch is None:
            self._scratch = self.create()
        self.map(addr, self._scratch)
        try:
            return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)
        finally:
            self.unmap(addr)

    def wait_event(self, event: object | None) -> None:
        # The mapper thread may not have touched the driver yet: give it our context first.
        if event is not None:
            with self._current():
                event.synchronize()  # type: ignore[attr-defined]  # releases the GIL

    def event_done(self, event: object | None) -> bool:
        if event is None:
            return True
        with self._current():
            return bool(event.query())  # type: ignore[attr-defined]

    def record_event(self) -> object | None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def close(self) -> None:
        """Unmap, release and free whatever is still held, then drop the context reference."""
        with self._lock:
            if self._closed:
                return
            mapped = list(self._mapped)
            handles = list(self._handles)
            res = list(self._res_size.items())
        for a in mapped:
            self.unmap(a)
        for h in handles:
            self.release(h)
        for a, n in res:
            self.free_reservation(a, n)
        self._scratch = None
        with self._lock:
            self._closed = True
        self._fin()
