"""Building and loading the C++ kernels (``csrc/``) as a torch extension, on first use.

``torch.utils.cpp_extension.load`` compiles ``csrc/*.cpp`` with the system C++ compiler and ninja into
``$SPARSEKIT_CACHE/kernels/<key>/`` (default ``~/.cache/sparsekit``), the key hashing the sources, the flags
and the torch version, so an edited kernel rebuilds and a cached one loads in milliseconds; concurrent
builders wait on ninja's lock. Loading registers the ops ``torch.ops.sparsekit.*`` (``TORCH_LIBRARY``).
The kernels are compiled without ``-march``: each vector path carries its own ``target`` attribute and
is chosen per call from the CPU's features, so one build runs on every x86-64 CPU. OpenMP comes from
torch's own ``libgomp`` (the extension links the same soname, which the loader resolves to the copy torch
has already loaded): one thread pool, sized by ``torch.set_num_threads``.

Without a compiler or ninja, or if the build fails, :func:`load_extension` warns once and returns
``None``; :mod:`sparsekit.kernels.ops` then registers the same ops with torch reference implementations
(decompress + ``F.linear``), which are correct but not faster than dense.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["cache_dir", "load_extension", "SOURCES", "CFLAGS"]

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "kernels.cpp", CSRC / "ops.cpp")
HEADERS = (CSRC / "sparse_cpu.h",)
CFLAGS = ["-O3", "-std=c++17", "-fno-strict-aliasing", "-fopenmp", "-Wno-maybe-uninitialized"]
LDFLAGS = ["-fopenmp"]


def cache_dir() -> Path:
    """``$SPARSEKIT_CACHE/kernels`` (default ``~/.cache/sparsekit/kernels``), created if missing."""
    root = Path(os.environ.get("SPARSEKIT_CACHE", Path.home() / ".cache" / "sparsekit"))
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_key() -> str:
    """Hash of the sources, headers, flags and torch version: the build folder's name."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode())
    return digest.hexdigest()[:16]


def _missing_tools() -> list[str]:
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler}; set $CXX)")
    if not is_ninja_available():
        missing.append("ninja (apt-get install ninja-build, or pip install ninja)")
    return missing


@lru_cache(maxsize=1)
def load_extension() -> Path | None:
    """Build (once, cached) and load the kernels; returns the library's path, or ``None`` with a warning.

    ``SPARSEKIT_NO_EXT=1`` skips the build (to use the torch reference ops).
    """
    if os.environ.get("SPARSEKIT_NO_EXT") == "1":
        return None
    missing = _missing_tools()
    if missing:
        warnings.warn(f"sparsekit: cannot build the C++ kernels without {' and '.join(missing)}; the "
                      "sparse ops fall back to torch (decompress + dense F.linear), which is correct but not "
                      "faster than dense", RuntimeWarning, stacklevel=2)
        return None
    from torch.utils.cpp_extension import load

    key = build_key()
    build_dir = cache_dir() / f"ext-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"sparsekit_cpu_{key}"
    try:
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
             extra_include_paths=[str(CSRC)], build_directory=str(build_dir), is_python_module=False,
             verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means the torch fallback
        warnings.warn(f"sparsekit: building the C++ kernels failed; the sparse ops fall back to torch. "
                      f"{type(error).__name__}: {str(error)[-2000:]}", RuntimeWarning, stacklevel=2)
        return None
    return build_dir / f"{name}.so"
