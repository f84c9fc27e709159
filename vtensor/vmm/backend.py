"""The backend interface: a thin wrapper of the driver calls of one device.

A backend validates its arguments (alignment, reservation bounds, mapped state) before any
driver call and raises the typed errors of `errors.py`, so misuse never reaches the driver as
an illegal address. Page bookkeeping (refcounts, who maps what) lives above, in PagePool and
VirtualTensor; the backend only keeps the small tables it needs for those checks.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod

import torch

from vtensor.vmm.errors import AlreadyMapped, NotMapped, OutOfRange, VmmError


class Backend(ABC):
    name: str  # "cuda" | "host"
    device: torch.device
    page_size: int  # mapping granularity in bytes

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        # Guards the tables below: the mapper thread maps while the caller thread creates.
        self._lock = threading.Lock()
        self._res_starts: list[int] = []  # sorted reservation starts, for bisect lookups
        self._res_size: dict[int, int] = {}  # reservation start -> nbytes
        self._mapped: dict[int, int] = {}  # page address -> handle
        self._handles: dict[int, int] = {}  # live handle -> number of addresses mapping it
        self._closed = False

    # ---- the driver calls (public contract) ----
    @abstractmethod
    def reserve(self, nbytes: int) -> int: ...
    @abstractmethod
    def free_reservation(self, addr: int, nbytes: int) -> None: ...
    @abstractmethod
    def create(self) -> int: ...
    @abstractmethod
    def release(self, handle: int) -> None: ...
    @abstractmethod
    def map(self, addr: int, handle: int) -> None: ...
    @abstractmethod
    def unmap(self, addr: int) -> None: ...
    @abstractmethod
    def as_tensor(self, addr: int, nbytes: int) -> torch.Tensor: ...
    @abstractmethod
    def close(self) -> None: ...

    def map_range(self, addr: int, handles: list[int]) -> None:
        """Map consecutive pages from `addr`. CUDA overrides it to set access once per batch."""
        for i, h in enumerate(handles):
            self.map(addr + i * self.page_size, h)

    def record_event(self) -> object | None:
        return None

    def wait_event(self, event: object | None) -> None:
        # Duck-typed so host tests can pass a fake event with the CUDA event's method.
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]

    def event_done(self, event: object | None) -> bool:
        """Has the device reached `event`? Never blocks (the mapper polls it)."""
        return event is None or bool(event.query())  # type: ignore[attr-defined]

    def stats(self) -> dict:
        with self._lock:
            return {
                "reservations": len(self._res_starts),
                "reserved_bytes": sum(self._res_size.values()),
                "handles": len(self._handles),
                "mapped_pages": len(self._mapped),
            }

    # ---- validation helpers shared by the implementations (call with self._lock held) ----
    def _check_open(self) -> None:
        if self._closed:
            raise VmmError(f"{self.name} backend is closed")

    def _check_nbytes(self, nbytes: int) -> None:
        if nbytes <= 0 or nbytes % self.page_size:
            raise OutOfRange(f"nbytes={nbytes} must be a positive multiple of {self.page_size}")

    def _reservation_of(self, addr: int, nbytes: int) -> int:
        """Start of the reservation holding [addr, addr + nbytes); OutOfRange otherwise."""
        i = bisect.bisect_right(self._res_starts, addr) - 1
        if i >= 0:
            start = self._res_starts[i]
            if addr + nbytes <= start + self._res_size[start]:
                return start
        raise OutOfRange(f"[{addr:#x}, {addr + nbytes:#x}) is not inside a reservation")

    def _check_page_addr(self, addr: int) -> None:
        if addr % self.page_size:
            raise OutOfRange(f"address {addr:#x} is not aligned to the page size {self.page_size}")
        self._reservation_of(addr, self.page_size)

    def _check_map(self, addr: int, handle: int) -> None:
        self._check_open()
        self._check_page_addr(addr)
        if addr in self._mapped:
            raise AlreadyMapped(f"address {addr:#x} is already mapped")
        if handle not in self._handles:
            raise VmmError(f"unknown or released page handle {handle}")

    def _check_unmap(self, addr: int) -> int:
        self._check_open()
        self._check_page_addr(addr)
        handle = self._mapped.get(addr)
        if handle is None:
            raise NotMapped(f"address {addr:#x} is not mapped")
        return handle

    def _add_reservation(self, addr: int, nbytes: int) -> None:
        bisect.insort(self._res_starts, addr)
        self._res_size[addr] = nbytes

    def _check_free_reservation(self, addr: int, nbytes: int) -> None:
        self._check_open()
        if self._res_size.get(addr) != nbytes:
            raise OutOfRange(f"no reservation of {nbytes} bytes starts at {addr:#x}")
        end = addr + nbytes
        # O(mapped pages), but freeing a reservation is rare (close).
        if any(addr <= a < end for a in self._mapped):
            raise AlreadyMapped(f"reservation at {addr:#x} still has mapped pages")

    def _drop_reservation(self, addr: int) -> None:
        self._res_starts.remove(addr)
        del self._res_size[addr]


def make_backend(
    device: str | torch.device = "auto",
    page_size: int | None = None,
    min_page_size: int | None = None,
) -> Backend:
    """ "auto": CudaBackend on the current CUDA device if CUDA is available, else HostBackend.
    min_page_size (CUDA, with page_size None): pages of at least this many bytes, rounded up to
    the driver's granularity."""
    if isinstance(device, str) and device in ("auto", "host", "cpu"):
        if device == "auto" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            from vtensor.vmm.host import HostBackend

            return HostBackend(page_size=page_size)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"unsupported device {device!r}: expected auto, host, cpu or cuda[:N]"
        ) from e
    if dev.type == "cpu":
        from vtensor.vmm.host import HostBackend

        return HostBackend(page_size=page_size)
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}: expected auto, host, cpu or cuda[:N]")
    from vtensor.vmm.cuda import CudaBackend

    return CudaBackend(dev, page_size=page_size, min_page_size=min_page_size)
