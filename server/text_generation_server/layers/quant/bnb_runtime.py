"""The bitsandbytes library: importing it, which backend it runs on, what it can do.

bitsandbytes picks its native library (CUDA, or the CPU build) when it is
imported. On CPU its LLM.int8 matmul is ``torch._int_mm`` when the CPU has
AVX-512 (a float matmul of the int8 values otherwise); its 4-bit matmul is its
own AVX-512 BF16 kernel for bfloat16 on CPUs with those instructions and its
dequantize followed by a torch matmul otherwise; on CUDA both are its own
kernels. Everything that depends on the backend is decided here, once.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from loguru import logger

# bitsandbytes warns on import, on AVX-512 bf16 CPUs, that an optional fused 4-bit
# kernel package is not installed; that kernel is never used here, so the warning
# would only mislead. The backend actually used is logged by :func:`log_backend`.
_OPTIONAL_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


class BitsAndBytesUnavailable(ValueError):
    """bitsandbytes is missing or cannot run on the requested device."""


@functools.cache
def bnb() -> ModuleType:
    """The imported ``bitsandbytes`` package; raises with install advice when it is missing."""
    quiet = logging.getLogger(_OPTIONAL_KERNEL_LOGGER)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (registers the kernels)
    except ImportError as e:
        raise BitsAndBytesUnavailable(
            f"--quantize bitsandbytes* needs the bitsandbytes package, which cannot be imported "
            f"({e}); install it (pip install bitsandbytes) or serve without --quantize"
        ) from e
    finally:
        quiet.setLevel(level)
    return bitsandbytes


@dataclass(frozen=True)
class Backend:
    """Which bitsandbytes code runs on one device type."""

    device_type: str  # "cpu" or "cuda"
    library: str  # the native library bitsandbytes loaded, or "none (pure torch)"
    int8_matmul: str  # how the int8 part of LLM.int8 is multiplied
    fourbit_matmul: str  # how a 4-bit weight is multiplied

    def describe(self) -> str:
        return (
            f"bitsandbytes {bnb().__version__} backend {self.device_type.upper()} "
            f"(native library {self.library}; int8 matmul {self.int8_matmul}; "
            f"4-bit matmul {self.fourbit_matmul})"
        )


def _native_library() -> tuple[str, bool]:
    """File name of bitsandbytes' native library and whether it is a CUDA build."""
    from bitsandbytes.cextension import lib

    handle = getattr(lib, "_lib", None)
    name = getattr(handle, "_name", None)
    if not name:
        return "none (pure torch)", False
    return str(name).rsplit("/", 1)[-1], bool(getattr(lib, "compiled_with_cuda", False))


def _cpu_int8_uses_int_mm() -> bool:
    # bitsandbytes' own rule: torch._int_mm on CPU only with AVX-512 and torch >= 2.6.
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.torch_version.TorchVersion(
        torch.__version__
    ) >= (2, 6)


@functools.cache
def backend(device_type: str) -> Backend:
    """The backend for ``device_type`` (``cpu`` or ``cuda``)."""
    bnb()
    library, is_cuda = _native_library()
    if device_type == "cuda":
        return Backend(
            "cuda", library, "bitsandbytes CUDA int8 GEMM", "bitsandbytes CUDA 4-bit GEMM"
        )
    int8 = "torch._int_mm (AVX-512)" if _cpu_int8_uses_int_mm() else "float matmul of int8 values"
    fourbit = "bitsandbytes dequantize + torch matmul"
    if cpu_4bit_kernel_available():
        fourbit = f"bitsandbytes AVX-512 BF16 kernel for bfloat16, else {fourbit}"
    return Backend("cpu", library, int8, fourbit)


@functools.cache
def cpu_4bit_kernel_available() -> bool:
    """bitsandbytes registered its native CPU 4-bit kernel (AVX-512 BF16 CPUs only)."""
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    functional = bnb().functional
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or not hasattr(
        functional, "has_avx512bf16"
    ):
        return False
    return bool(functional.has_avx512bf16())


def check_device(name: str, dtype: torch.dtype, device: torch.device, *, int8: bool) -> None:
    """Raise :class:`BitsAndBytesUnavailable` when ``--quantize name`` cannot run ``dtype`` on ``device``."""
    allowed = "float32, bfloat16, float16"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise BitsAndBytesUnavailable(
            f"--quantize {name} cannot compute in {str(dtype).removeprefix('torch.')}; "
            f"use --dtype one of {allowed}"
        )
    if device.type not in ("cpu", "cuda"):
        raise BitsAndBytesUnavailable(
            f"--quantize {name} runs on cpu or cuda devices here, not {device.type}"
        )
    bnb()
    if device.type == "cpu":
        return
    library, is_cuda = _native_library()
    if not is_cuda:
        raise BitsAndBytesUnavailable(
            f"--quantize {name} on {device}: bitsandbytes loaded {library}, not its CUDA "
            f"library; install a bitsandbytes build for this CUDA version or run on CPU"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and major < 8:
        raise BitsAndBytesUnavailable(
            f"--quantize {name} with --dtype bfloat16 needs a GPU of compute capability 8.0 or "
            f"newer ({device} is {major}.{minor}); use --dtype float16"
        )
    if int8 and (major, minor) < (7, 5):
        raise BitsAndBytesUnavailable(
            f"--quantize {name} (LLM.int8) needs int8 tensor cores, compute capability 7.5 or "
            f"newer ({device} is {major}.{minor}); use --quantize bitsandbytes-nf4 instead"
        )


_logged: set[str] = set()


def log_backend(device: torch.device) -> None:
    """Log, once per process and device type, which bitsandbytes backend runs."""
    if device.type in _logged:
        return
    _logged.add(device.type)
    logger.info(backend(device.type).describe())
