"""What this machine offers the engine, asked portably: usable CPUs, whether the CPU has AMX, system memory, and
the GPUs llama.cpp's backends see with their free memory. Linux-only calls are tried first, each with a fallback
that works on macOS and Windows (the tests run the fallbacks by hiding the Linux calls)."""

import ctypes
import logging
import os
import sys
from dataclasses import asdict, dataclass

import psutil

logger = logging.getLogger(__name__)

# ggml_backend_dev_type: CPU, GPU (own memory), IGPU (integrated: the system's memory), ACCEL (e.g. BLAS)
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (Linux), else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX (Sapphire Rapids and later): /proc/cpuinfo on Linux; elsewhere no (Apple and
    Windows machines this matters for do not have it, and llama.cpp's AMX code is Linux x86 only)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "amx_int8" in cpuinfo.read()
    except OSError:
        return False


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of system memory, on any OS."""
    memory = psutil.virtual_memory()
    return memory.total, memory.available


@dataclass(frozen=True)
class Device:
    """A device llama.cpp can offload layers to, as its backend reports it."""

    name: str  # CUDA0, Metal, Vulkan0, ...
    description: str
    type: str  # gpu, igpu or accel
    free: int  # bytes
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


def unified_memory() -> bool:
    """Apple Silicon: the GPU (Metal) works in system memory, so a budget must count it once, not twice."""
    return sys.platform == "darwin"


def gpu_devices() -> list[Device]:
    """The GPUs llama.cpp's backends see, with the memory each reports free now (`ggml_backend_dev_memory`);
    [] on a CPU-only build, or where the library does not export the call."""
    try:
        from llama_cpp import llama_cpp as bindings

        # libllama's handle: dlsym searches the libggml it links to, wherever LLAMA_CPP_LIB_PATH put them both.
        lib = bindings._lib
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        size_p = ctypes.POINTER(ctypes.c_size_t)
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    except (ImportError, OSError, AttributeError):  # an older or differently built llama-cpp-python
        logger.info("llama.cpp does not report its devices; counting system memory only")
        return []
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other")
        if kind not in ("gpu", "igpu"):
            continue  # the CPU's memory is the system's; BLAS and the like hold no layers
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                              (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                              kind, free.value, total.value))  # fmt: skip
    return devices


def offloaded_fraction(n_gpu_layers: int, block_count: int | None) -> float:
    """The share of a model llama.cpp puts on GPUs for `n_gpu_layers` (-1: all): its repeating layers plus the
    output layer, each about an equal share of the weights and of the KV cache."""
    if n_gpu_layers == 0:
        return 0.0
    layers = (block_count or 0) + 1
    if n_gpu_layers < 0 or n_gpu_layers >= layers:
        return 1.0
    return n_gpu_layers / layers
