"""HostBackend: CUDA VMM semantics emulated with Linux virtual memory.

    reserve  -> mmap(NULL, n, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE)
    create   -> a page-sized range of one memfd (grown with ftruncate; freed ranges reused)
    map      -> mmap(addr, page, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_FIXED, memfd, offset)
    unmap    -> mmap PROT_NONE anonymous MAP_FIXED over the page (the range stays reserved)
    release  -> fallocate(PUNCH_HOLE|KEEP_SIZE): the memory really goes back to the OS

Two mappings of the same memfd range alias the same memory, exactly like two cuMemMap calls
of one physical handle. Python's mmap module cannot map at a fixed address, so libc is called
through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap as _mmap
import os
import weakref

import torch

from vtensor.vmm.backend import Backend
from vtensor.vmm.errors import DriverError, OutOfRange, VmmError

_PROT_NONE, _PROT_RW = 0x0, 0x1 | 0x2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = (
    0x01,
    0x02,
    0x10,
    0x20,
    0x4000,
)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

# PyDLL: the calls keep the GIL. They take microseconds; released per call (CDLL), a mapper
# thread waits up to a switch interval (5 ms) to get it back whenever the engine's main thread
# runs Python, and a page map went from ~5 us to ms (`python -m vtensor.bench.vmm`, stage 4).
_libc = ctypes.PyDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

DEFAULT_PAGE_SIZE = 2 << 20


def _raise_errno(call: str) -> None:
    err = ctypes.get_errno()
    raise DriverError(call, os.strerror(err), err)


def _mmap_call(addr: int | None, n: int, prot: int, flags: int, fd: int, off: int) -> int:
    p = _libc.mmap(addr, n, prot, flags, fd, off)
    if p is None or p == _MAP_FAILED:
        _raise_errno("mmap")
    return p


def _finalize(fd: int, reservations: dict[int, int]) -> None:
    # Runs at close() or garbage collection: the fd and address ranges must not leak.
    for addr, n in list(reservations.items()):
        _libc.munmap(addr, n)
    reservations.clear()
    if fd >= 0:
        os.close(fd)


class HostBackend(Backend):
    name = "host"

    def __init__(self, page_size: int | None = None) -> None:
        page_size = DEFAULT_PAGE_SIZE if page_size is None else int(page_size)
        if page_size <= 0 or page_size % _mmap.PAGESIZE:
            raise ValueError(f"page_size={page_size} must be a multiple of {_mmap.PAGESIZE}")
        super().__init__(page_size)
        self.device = torch.device("cpu")
        self.device_name = "host (memfd + mmap emulation)"
        self._fd = os.memfd_create("vtensor-pages", os.MFD_CLOEXEC)
        self._file_pages = 0  # memfd size in pages
        self._free_slots: list[int] = []  # released file slots, reused LIFO
        self._fin = weakref.finalize(self, _finalize, self._fd, self._res_size)

    # handle == file slot index: the page lives at offset handle * page_size of the memfd

    def reserve(self, nbytes: int) -> int:
        with self._lock:
            self._check_open()
            self._check_nbytes(nbytes)
            # Over-reserve by one page and trim so the range is page-size aligned, like CUDA.
            flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
            raw = _mmap_call(None, nbytes + self.page_size, _PROT_NONE, flags, -1, 0)
            addr = -(-raw // self.page_size) * self.page_size
            head, tail = addr - raw, raw + nbytes + self.page_size - (addr + nbytes)
            if head:
                _libc.munmap(raw, head)
            if tail:
                _libc.munmap(addr + nbytes, tail)
            self._add_reservation(addr, nbytes)
            return addr

    def free_reservation(self, addr: int, nbytes: int) -> None:
        with self._lock:
            self._check_free_reservation(addr, nbytes)
            if _libc.munmap(addr, nbytes) != 0:
                _raise_errno("munmap")
            self._drop_reservation(addr)

    def create(self) -> int:
        with self._lock:
            self._check_open()
            if self._free_slots:
                handle = self._free_slots.pop()
            else:
                os.ftruncate(self._fd, (self._file_pages + 1) * self.page_size)
                handle = self._file_pages
                self._file_pages += 1
            self._handles[handle] = 0
            return handle

    def release(self, handle: int) -> None:
        with self._lock:
            self._check_open()
            count = self._handles.get(handle)
            if count is None:
                raise VmmError(f"unknown or already released page handle {handle}")
            if count:
                # CUDA would defer the free until unmapped; punching a hole under a live
                # mapping would zero it instead, so refuse: it is always a bookkeeping bug.
                raise VmmError(f"page handle {handle} is still mapped {count} time(s)")
            off = handle * self.page_size
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _libc.fallocate(self._fd, mode, off, self.page_size) != 0:
                _raise_errno("fallocate")
            del self._handles[handle]
            self._free_slots.append(handle)

    def map(self, addr: int, handle: int) -> None:
        with self._lock:
            self._check_map(addr, handle)
            flags = _MAP_SHARED | _MAP_FIXED
            _mmap_call(addr, self.page_size, _PROT_RW, flags, self._fd, handle * self.page_size)
            self._mapped[addr] = handle
            self._handles[handle] += 1

    def unmap(self, addr: int) -> None:
        with self._lock:
            handle = self._check_unmap(addr)
            flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
            _mmap_call(addr, self.page_size, _PROT_NONE, flags, -1, 0)
            del self._mapped[addr]
            self._handles[handle] -= 1

    def as_tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._check_open()
            if nbytes <= 0:
                raise OutOfRange(f"nbytes={nbytes} must be positive")
            self._reservation_of(addr, nbytes)
        # The tensor keeps the ctypes array alive; touching an unmapped page is SIGSEGV, so
        # callers map before they read (VirtualTensor's contract).
        buf = (ctypes.c_uint8 * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def resident_bytes(self) -> int:
        """Bytes of the memfd actually backed by memory (st_blocks), to check release."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        """Release everything still held (mappings, pages, reservations) and the memfd."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mapped.clear()
            self._handles.clear()
            self._res_starts.clear()
        self._fin()  # unmaps the reservations (and any mapping in them), closes the fd
        self._fd = -1
