"""Compiling and loading the C kernels (``csrc/sparse_cpu.c``) on first use.

The shared library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$SPARSEKIT_CACHE/kernels/`` (default ``~/.cache/sparsekit/kernels``), named by a hash of the source,
the flags and the compiler's version, so an edited kernel or another compiler rebuilds and a cached one
loads in milliseconds. It is loaded with ``ctypes`` (calls release the GIL). The AVX2 functions carry
``target`` attributes and are chosen at run time, so one build also runs on CPUs without AVX2 (through
the portable scalar path). Without a compiler, or if the build fails, :func:`load_library` returns
``None`` after one warning and the callers fall back to torch (decompress, then dense ``F.linear``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

__all__ = ["cache_dir", "load_library", "simd_available", "CFLAGS"]

SOURCE = Path(__file__).with_name("csrc") / "sparse_cpu.c"
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-strict-aliasing"]
OPENMP = ["-fopenmp"]


def cache_dir() -> Path:
    """``$SPARSEKIT_CACHE/kernels`` (default ``~/.cache/sparsekit/kernels``), created if missing."""
    root = Path(os.environ.get("SPARSEKIT_CACHE", Path.home() / ".cache" / "sparsekit"))
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, flags: list[str], target: Path) -> bool:
    """Compile into a temporary file, then rename: concurrent builders never see a half-written library."""
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    result = subprocess.run([cc, *flags, "-o", str(tmp_path), str(SOURCE)], capture_output=True, text=True)
    if result.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        _build.last_error = result.stderr[-2000:]
        return False
    os.replace(tmp_path, target)
    return True


_build.last_error = ""


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sk_init.restype = i32
    lib.sk_init.argtypes = []
    lib.sk_bitmask_matmul.restype = i32
    lib.sk_bitmask_matmul.argtypes = [ptr, i64, ptr, i32, ptr, i64, i64, i64, ptr, i64, i64, ptr, i32, i32]
    lib.sk_csr_matmul.restype = i32
    lib.sk_csr_matmul.argtypes = [ptr, ptr, i32, ptr, i32, i64, i64, ptr, i64, i64, ptr, i32, i32]
    lib.sk_bitmask_to_dense.restype = i32
    lib.sk_bitmask_to_dense.argtypes = [ptr, i64, ptr, i32, ptr, i64, i64, i64, i64, ptr, i32, i32]
    lib.sk_read_sum.restype = ctypes.c_double
    lib.sk_read_sum.argtypes = [ptr, i64, i32, i32]
    return lib


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use and cached), or ``None`` with a warning if impossible.

    ``SPARSEKIT_NO_C=1`` skips the compiler (to test the torch fallback).
    """
    if os.environ.get("SPARSEKIT_NO_C") == "1":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("sparsekit: no C compiler found (set $CC); sparse kernels fall back to torch "
                      "(decompress + dense F.linear), which is correct but not faster than dense",
                      RuntimeWarning, stacklevel=2)
        return None
    source = SOURCE.read_bytes()
    for flags in (CFLAGS + OPENMP, CFLAGS):  # without OpenMP the kernels run on one thread
        key = hashlib.sha256(source + " ".join(flags).encode() + _compiler_version(cc).encode()).hexdigest()
        target = cache_dir() / f"sparse_cpu_{key[:16]}.so"
        if target.exists() or _build(cc, flags, target):
            try:
                lib = _declare(ctypes.CDLL(str(target)))
            except OSError as error:
                _build.last_error = str(error)
                continue
            lib.simd = bool(lib.sk_init())
            lib.path = target
            lib.openmp = flags is not CFLAGS
            return lib
    warnings.warn(f"sparsekit: building the C kernels with {cc} failed; sparse kernels fall back to torch. "
                  f"Compiler output:\n{_build.last_error}", RuntimeWarning, stacklevel=2)
    return None


def simd_available() -> bool:
    """True when the AVX2 + FMA + F16C kernels run on this CPU."""
    lib = load_library()
    return bool(lib is not None and lib.simd)
