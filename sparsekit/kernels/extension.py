"""Building and loading the C++ kernels (``csrc/``) as a torch extension, on first use.

``torch.utils.cpp_extension.load`` compiles ``csrc/*.cpp`` with the system C++ compiler and ninja; the
library is published in ``$SPARSEKIT_CACHE/kernels/ext-<key>/`` (default ``~/.cache/sparsekit``), the key
hashing the sources, the flags and the torch version, so an edited kernel rebuilds and a cached one loads
in milliseconds. Loading registers the ops ``torch.ops.sparsekit.*`` (``TORCH_LIBRARY``). The kernels are
compiled without ``-march``: each vector path carries its own ``target`` attribute and is chosen per call
from the CPU's features, so one build runs on every x86-64 CPU. OpenMP comes from torch's own ``libgomp``
(the extension links the same soname, which the loader resolves to the copy torch has already loaded): one
thread pool, sized by ``torch.set_num_threads``.

The cache follows :mod:`sparsekit.fileio`: a build runs in a temp folder beside ``ext-<key>/`` and is
renamed into place with a ``manifest.json`` (size and sha256 of the library) written last, one builder at a
time (an ``flock`` on ``ext-<key>.lock``; the others wait, then load its build). A cached library is loaded
only after its manifest verifies: a truncated or altered one (which ``dlopen`` would map and crash on with
SIGBUS) is rebuilt. A cache folder that cannot be written (``$SPARSEKIT_CACHE`` naming a file, a read-only
folder) is still read; a build then goes to ``<tmp>/sparsekit-<uid>/kernels``. Each of these events, and a
build that fails or cannot start (no compiler or ninja), gives exactly one ``RuntimeWarning`` that names
the file or folder; without a library the ops fall back to the torch reference implementations
(:mod:`sparsekit.kernels.ops`: decompress + ``F.linear``, correct but not faster than dense). Importing
``sparsekit.kernels`` never fails because of the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from sparsekit import fileio

__all__ = ["cache_dir", "load_extension", "SOURCES", "CFLAGS", "build_key", "library_name",
           "fallback_cache_dir"]

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "kernels.cpp", CSRC / "ops.cpp")
HEADERS = (CSRC / "sparse_cpu.h",)
CFLAGS = ("-O3", "-std=c++17", "-fno-strict-aliasing", "-fopenmp", "-Wno-maybe-uninitialized")
LDFLAGS = ("-fopenmp",)
FALLBACK_NOTE = ("the sparse ops fall back to torch (decompress + dense F.linear), which is correct but not "
                 "faster than dense")


def _kernels_dir() -> Path:
    root = Path(os.environ.get("SPARSEKIT_CACHE") or Path.home() / ".cache" / "sparsekit")
    return root / "kernels"


def cache_dir() -> Path:
    """``$SPARSEKIT_CACHE/kernels`` (default ``~/.cache/sparsekit/kernels``), created if missing."""
    path = _kernels_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fallback_cache_dir() -> Path:
    """Where the kernels are built when the cache cannot be written: ``<tmp>/sparsekit-<uid>/kernels``."""
    return Path(tempfile.gettempdir()) / f"sparsekit-{os.getuid()}" / "kernels"


def build_key() -> str:
    """Hash of the sources, headers, flags and torch version: the build folder's name."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    # tuples: torch's load() appends to the flag lists it is given, which would change the key after a build
    digest.update(" ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode())
    return digest.hexdigest()[:16]


def library_name(key: str) -> str:
    """The library's file name (without ``.so``) for a build key."""
    return f"sparsekit_cpu_{key}"


def _missing_tools() -> list[str]:
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler}; set $CXX)")
    if not is_ninja_available():
        missing.append("ninja (apt-get install ninja-build, or pip install ninja)")
    return missing


class BuildFailed(RuntimeError):
    """The compiler or linker failed (not a file-system problem)."""


def _compile(build_dir: Path, name: str) -> Path:
    """Compile the sources in ``build_dir``; torch loads the new library into this process. Its path."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS), extra_include_paths=[str(CSRC)],
                    build_directory=str(build_dir), is_python_module=False, verbose=False)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - a compiler or linker failure
        raise BuildFailed(f"building the C++ kernels failed ({type(error).__name__}: {str(error)[-2000:]})") \
            from error
    return Path(path)


def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


def verified_library(ext_dir: Path, name: str) -> Path:
    """The library in ``ext_dir`` once its manifest verifies (size and sha256); else
    :class:`~sparsekit.fileio.IncompleteOutputError` naming the folder and the file."""
    try:
        manifest = fileio.verify_manifest(ext_dir)
    except (AttributeError, TypeError) as error:  # a manifest whose entries are not {sha256, bytes}
        raise fileio.IncompleteOutputError(f"{str(ext_dir)!r}: its manifest is damaged ({error})") from error
    if f"{name}.so" not in manifest["files"]:
        raise fileio.IncompleteOutputError(f"{str(ext_dir)!r}: {name}.so is not in its manifest")
    return ext_dir / f"{name}.so"


@contextlib.contextmanager
def _build_lock(kernels: Path, key: str) -> Iterator[None]:
    """One builder per key at a time (the lock goes with its process, so a killed builder leaves none)."""
    with open(kernels / f"ext-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(kernels: Path, key: str, notes: list[str]) -> Path:
    """Build into ``kernels/ext-<key>/`` (staged, manifest last) unless another process just did; loaded."""
    name = library_name(key)
    ext_dir = kernels / f"ext-{key}"
    kernels.mkdir(parents=True, exist_ok=True)
    with _build_lock(kernels, key):
        with contextlib.suppress(fileio.IncompleteOutputError):
            library = verified_library(ext_dir, name)  # built while this process waited for the lock
            _load_library(library)
            return library
        missing = _missing_tools()
        if missing:
            raise BuildFailed(f"cannot build the C++ kernels without {' and '.join(missing)}")
        built = None
        try:
            with fileio.staged_directory(ext_dir, overwrite=ext_dir.exists()) as staging:
                built = _compile(staging / "build", name)
                os.replace(built, staging / f"{name}.so")
                shutil.rmtree(staging / "build")
        except OSError as error:
            if built is None:
                raise
            notes.append(f"the C++ kernels were built and loaded but not saved in {ext_dir} ({error})")
            return built
    return ext_dir / f"{name}.so"


def _load_or_build(kernels: Path, key: str, notes: list[str]) -> Path:
    """A verified cached library of ``kernels``, else a new build there (noting a damaged one)."""
    name = library_name(key)
    ext_dir = kernels / f"ext-{key}"
    try:
        library = verified_library(ext_dir, name)
    except fileio.IncompleteOutputError as error:
        if ext_dir.exists():
            notes.append(f"the cached C++ kernels {ext_dir / (name + '.so')} failed verification and were "
                         f"not loaded ({error}); rebuilding them")
    else:
        _load_library(library)
        return library
    return _build(kernels, key, notes)


@lru_cache(maxsize=1)
def load_extension() -> Path | None:
    """Load the kernels (building them once, cached); returns the library's path, or ``None``.

    At most one ``RuntimeWarning`` says what went wrong (naming the file or folder): a cached library that
    failed verification, a cache folder that cannot be written, a failed build. ``SPARSEKIT_NO_EXT=1``
    skips the build (to use the torch reference ops).
    """
    if os.environ.get("SPARSEKIT_NO_EXT") == "1":
        return None
    notes: list[str] = []
    key = build_key()
    library = None
    try:
        for kernels in (_kernels_dir(), fallback_cache_dir()):
            try:
                library = _load_or_build(kernels, key, notes)
                break
            except OSError as error:  # not a folder, read-only, full: try the next place
                notes.append(f"the kernel cache {kernels} cannot be used ({type(error).__name__}: {error})")
    except BuildFailed as error:
        notes.append(str(error))
    except Exception as error:  # noqa: BLE001 - nothing in the cache may break `import sparsekit.kernels`
        notes.append(f"loading the C++ kernels failed ({type(error).__name__}: {error})")
    if library is None:
        notes.append(FALLBACK_NOTE)
    elif notes:
        notes.append(f"using {library}")
    if notes:
        warnings.warn("sparsekit: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
    return library
