"""Device memory and GPU facts over the CUDA runtime, through Polygraphy's ctypes wrapper (no torch, no pycuda).

`DeviceTensor` is a typed, contiguous region of GPU memory with a shape: what TrtRunner binds by pointer
(and checks against the graph spec like an array).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .deps import TENSORRT_INSTALL, BackendUnavailable

DEVICE = 0  # select GPUs with CUDA_VISIBLE_DEVICES
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor
_PROPS_BYTES = 4096  # larger than any cudaDeviceProp; its first field is char name[256]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


@lru_cache(maxsize=1)  # a failure raises and is not cached
def cudart():
    """Polygraphy's CUDA runtime wrapper, after checking (once) that a GPU is visible."""
    from polygraphy import cuda

    try:
        wrapper = cuda.wrapper()
    except Exception as e:  # noqa: BLE001 — OSError from ctypes or PolygraphyException
        raise BackendUnavailable(f"the CUDA runtime (libcudart) could not be loaded ({e}); TensorRT needs an NVIDIA "
                                 f"GPU, its driver and the CUDA runtime. Install: {TENSORRT_INSTALL}") from None
    count = ctypes.c_int(0)
    status = wrapper.handle.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        raise BackendUnavailable(f"no CUDA GPU is visible (cudaGetDeviceCount returned error {status}, "
                                 f"{count.value} devices); check the driver and CUDA_VISIBLE_DEVICES")
    return wrapper


def gpu_info(device: int = DEVICE) -> GpuInfo:
    handle = cudart().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    handle.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device)
    handle.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device)
    props = ctypes.create_string_buffer(_PROPS_BYTES)
    get_props = getattr(handle, "cudaGetDeviceProperties_v2", None) or handle.cudaGetDeviceProperties
    get_props(props, device)
    return GpuInfo(props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"), f"{major.value}.{minor.value}")


class Stream:
    """A CUDA stream; all copies and engine runs of one runner go through one."""

    def __init__(self):
        from polygraphy import cuda

        cudart()
        self._stream = cuda.Stream()
        self.ptr = self._stream.ptr

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free(self) -> None:
        self._stream.free()


class DeviceBuffer:
    """One cudaMalloc, made once; tensors are views into it."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)  # a zero-size tensor still needs a valid address
        self.ptr = cudart().malloc(self.nbytes)

    def tensor(self, shape, dtype, offset: int = 0) -> "DeviceTensor":
        t = DeviceTensor(self.ptr + offset, tuple(shape), np.dtype(dtype))
        if offset + t.nbytes > self.nbytes:
            raise ValueError(f"view {list(shape)} {t.dtype} at byte {offset} exceeds the {self.nbytes}-byte buffer")
        return t

    def free(self) -> None:
        if self.ptr:
            cudart().free(self.ptr)
            self.ptr = 0


@dataclass(frozen=True)
class DeviceTensor:
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def copy_from(self, host: np.ndarray, stream: Stream) -> None:
        """Host -> device, asynchronous on `stream` (keep `host` alive until the stream is synchronized)."""
        from polygraphy import cuda

        host = np.ascontiguousarray(host, dtype=self.dtype)
        if host.shape != self.shape:
            raise ValueError(f"copy of {list(host.shape)} into a device tensor of shape {list(self.shape)}")
        if host.nbytes:
            cudart().memcpy(self.ptr, host.ctypes.data, host.nbytes, cuda.MemcpyKind.HostToDevice, stream.ptr)

    def copy_to(self, host: np.ndarray, stream: Stream) -> np.ndarray:
        """Device -> host into a contiguous array of the same shape, asynchronous on `stream`."""
        from polygraphy import cuda

        if host.shape != self.shape or host.dtype != self.dtype or not host.flags.c_contiguous:
            raise ValueError(f"copy of a device tensor {list(self.shape)} {self.dtype} into {list(host.shape)} {host.dtype}")
        if self.nbytes:
            cudart().memcpy(host.ctypes.data, self.ptr, self.nbytes, cuda.MemcpyKind.DeviceToHost, stream.ptr)
        return host

    def numpy(self, stream: Stream) -> np.ndarray:
        """A new host array with this tensor's contents (synchronizes the stream)."""
        host = self.copy_to(np.empty(self.shape, self.dtype), stream)
        stream.synchronize()
        return host
