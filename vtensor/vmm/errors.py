"""Typed errors of the VMM layer. Every misuse is detected before any driver call."""

from __future__ import annotations


class VmmError(RuntimeError):
    """Base class of every error raised by vtensor.vmm."""


class OutOfPages(VmmError):
    """The page pool's byte budget does not allow the requested pages."""


class NotMapped(VmmError):
    """A page index or address that should be mapped is not."""


class AlreadyMapped(VmmError):
    """A page index or address that should be free is already mapped."""


class OutOfRange(VmmError):
    """An index, address or byte range lies outside the reservation (or is misaligned)."""


class DriverError(VmmError):
    """A CUDA driver (or libc) call failed; `name` is the driver's own error name."""

    def __init__(self, call: str, name: str, code: int | None = None) -> None:
        super().__init__(f"{call} failed: {name}" + (f" ({code})" if code is not None else ""))
        self.call = call
        self.name = name
        self.code = code
