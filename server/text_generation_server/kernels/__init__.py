"""Native CPU kernels for the decode fast path (``csrc/``: one file per operator family).

``int4.cpp`` (GPTQ 4-bit matmul and unpacking), ``int8.cpp`` (8-bit LM head),
``norm_rotary.cpp`` (RMSNorm, rotary, SiLU-gate), ``attention.cpp`` (paged KV
write and decode attention), ``decoder.cpp`` (a decoder layer's decode step
over typed descriptions, ``torch.classes.tgs_cpu.Linear`` / ``DecoderLayer`` /
``DecoderStack``) and ``bindings.cpp``, which registers them all. Which of
them a model runs is the execution plan's choice (``execution/``); switches
are parsed in ``kernels/config.py``.

They need an x86-64 CPU with AVX2 and FMA, and a C++ compiler the first time:
the library is compiled once per source version and torch version, into the
package's own ``_build`` directory when it is writable (``make install`` and
the container image build it there) or else into the cache directory
(``$TEXT_GENERATION_CACHE/kernels``), and loaded from there afterwards.

:func:`cpu_ops` returns the ``torch.ops.tgs_cpu`` namespace, or ``None``
when the kernels cannot run here; :func:`cpu_ops_status` says which and why,
and is logged once by the shard at start-up. ``CPU_KERNELS=off`` turns them
off (every caller then uses its plain torch formulation), ``CPU_KERNELS=on``
makes a failure to build them an error instead of a fallback.

The 4-bit kernel has an AVX-512 VNNI form, used where the CPU has AVX-512
BW, VL and VNNI (same integer arithmetic, fewer instructions);
``CPU_KERNELS_ISA`` (auto, avx2, avx512-vnni) pins the choice, which the
status reports. The 16-bit dense kernel (``dense16.cpp``) uses AVX-512 where
the CPU has AVX-512 BW and VL, unless ``CPU_KERNELS_ISA=avx2``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from text_generation_server.kernels.config import KernelConfig

ENV = "CPU_KERNELS"
ISA_ENV = "CPU_KERNELS_ISA"
LIBRARY = "tgs_cpu_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
PACKAGE_BUILD_DIR = Path(__file__).resolve().parent / "_build"
# -fopenmp: at::parallel_for is inline OpenMP; the library then needs libgomp.so.1, which
# resolves to the copy torch has already loaded, so both share one thread pool.
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    reason: str  # why not, or where the library was loaded from


_lock = threading.Lock()
_status: KernelStatus | None = None


def build_key() -> str:
    """Identifies one build: the source, the flags and the torch it links against."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _cache_build_dir() -> Path:
    from text_generation_server.model_source import default_cache_dir

    return default_cache_dir() / "kernels"


def _host_reason() -> str | None:
    """Why this host cannot run the kernels, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are written for x86-64, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"they need AVX2, this CPU reports {capability}"
    return None


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ninja package's copy may not be on it."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, path]))


def _compile(directory: Path) -> Path:
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    logger.info(f"Compiling the CPU kernels into {directory} (once per version; about a minute)")
    load(
        name=LIBRARY,
        sources=[str(p) for p in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return directory / f"{LIBRARY}.so"


class UntrustedLibraryError(PermissionError):
    """A built library (or a directory above it) that another user could have written."""


def check_trusted(library: Path) -> None:
    """Refuse to load ``library`` unless it, its build directory and that directory's parent
    belong to this user (or root) and no one else can write them: whoever can replace the file
    runs code in every shard. Raises :class:`UntrustedLibraryError` naming the path, its owner
    and mode, and the fix."""
    import pwd

    me = os.geteuid()
    for path in (library, library.parent, library.parent.parent):
        info = os.stat(path)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in (me, 0) or mode & 0o022:
            try:
                owner = pwd.getpwuid(info.st_uid).pw_name
            except KeyError:
                owner = f"uid {info.st_uid}"
            raise UntrustedLibraryError(
                f"{path} (owner {owner}, mode {mode:04o}) could have been written by another user, so the CPU "
                f"kernel library under it is not loaded; remove {library.parent} to rebuild it, or make "
                f"{path} this user's and not writable by group or others (chmod go-w)"
            )


def _load(library: Path) -> Path:
    check_trusted(library)
    torch.ops.load_library(str(library))
    return library


def build(directory: Path | None = None) -> Path:
    """Compile (if not done yet) and load the library; returns its path. Raises on failure,
    :class:`UntrustedLibraryError` for a library others could have written."""
    from filelock import FileLock

    key = build_key()
    roots = [directory] if directory is not None else [PACKAGE_BUILD_DIR, _cache_build_dir()]
    for root in roots:
        library = root / key / f"{LIBRARY}.so"
        if library.exists() and (root / key / "complete").exists():
            return _load(library)
    root = next((r for r in roots if _writable(r)), None)
    if root is None:
        raise OSError(f"no writable directory to build the CPU kernels in (tried {', '.join(map(str, roots))})")
    target = root / key
    with FileLock(str(root / f"{key}.lock")):
        library = target / f"{LIBRARY}.so"
        if library.exists() and (target / "complete").exists():
            return _load(library)
        library = _compile(target)  # also loads it
        for path in (library, target, root):
            _clear_group_other_write(path)
        (target / "complete").write_text(key + "\n")
    return library


def _clear_group_other_write(path: Path) -> None:
    """What a build leaves must pass :func:`check_trusted` whatever the umask was (e.g. 002)."""
    info = os.stat(path)
    if info.st_uid == os.geteuid() and info.st_mode & 0o022:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)


def cpu_ops_status() -> KernelStatus:
    """Whether the kernels run in this process (built and loaded on the first call)."""
    global _status
    with _lock:
        if _status is not None:
            return _status
        config = KernelConfig.from_env()
        mode, isa = config.cpu_kernels, config.cpu_kernels_isa
        if mode == "off":
            _status = KernelStatus(False, f"{ENV}=off")
            return _status
        why = _host_reason()
        if why is None:
            try:
                path = build()
            except UntrustedLibraryError as err:
                why = f"the built library is not loaded: {err}"
            except Exception as err:  # a compiler or toolchain problem: fall back, say why
                why = f"they failed to build ({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else err})"
            else:
                try:
                    chosen = torch.ops.tgs_cpu.set_int4_isa(isa)
                except RuntimeError as err:
                    raise ValueError(f"{ISA_ENV}={isa}: {str(err).splitlines()[0]}") from None
                # The 16-bit dense kernel follows: AVX-512 wherever the 4-bit kernel may use it.
                dense16 = torch.ops.tgs_cpu.set_dense16_isa("avx2" if isa == "avx2" else "auto")
                _status = KernelStatus(True, f"loaded from {path.parent}; 4-bit kernel {chosen}, "
                                             f"16-bit dense kernel {dense16}")
        if why is not None:
            if mode == "on":
                raise RuntimeError(f"{ENV}=on but the CPU kernels cannot run: {why}")
            _status = KernelStatus(False, why)
        return _status


def cpu_ops() -> Any | None:
    """``torch.ops.tgs_cpu`` when the kernels run here, else ``None`` (cheap: called per layer)."""
    status = _status if _status is not None else cpu_ops_status()
    return torch.ops.tgs_cpu if status.available else None


def reset_for_tests() -> None:
    """Forget the cached status (tests that flip ``CPU_KERNELS``); a loaded library stays loaded."""
    global _status
    with _lock:
        _status = None
