"""Physical pages and virtual tensors: CUDA VMM (CudaBackend) or its host emulation."""

from vtensor.vmm.backend import Backend, make_backend
from vtensor.vmm.errors import (
    AlreadyMapped,
    DriverError,
    NotMapped,
    OutOfPages,
    OutOfRange,
    VmmError,
)
from vtensor.vmm.host import HostBackend
from vtensor.vmm.mapper import Mapper, Ticket
from vtensor.vmm.pool import PagePool, PhysPage
from vtensor.vmm.virtual_tensor import VirtualTensor


def __getattr__(name: str):
    # CudaBackend imports cuda-bindings lazily: `import vtensor.vmm` must work without it.
    if name == "CudaBackend":
        from vtensor.vmm.cuda import CudaBackend

        return CudaBackend
    raise AttributeError(name)


__all__ = [
    "AlreadyMapped", "Backend", "CudaBackend", "DriverError", "HostBackend", "Mapper",
    "NotMapped", "OutOfPages", "OutOfRange", "PagePool", "PhysPage", "Ticket", "VirtualTensor",
    "VmmError", "make_backend",
]  # fmt: skip
