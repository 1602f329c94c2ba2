"""Files written whole or not at all, and read back only when they are what was written.

One rule for every file and folder the project writes (models, teachers, calibration, results JSON):

1. the content goes to a temp entry in the *same* directory as its destination
   (``.<name>.tmp-<pid>@<host>-<rand>``),
2. every file is flushed and ``fsync``-ed,
3. a folder gets its completion record last: ``manifest.json`` with the sha256 and size of every file,
4. the temp entry is renamed onto the destination (``os.replace``, atomic within a file system), and the
   directory is ``fsync``-ed so the rename itself survives a crash.

A reader calls :func:`verify_manifest` and gets :class:`IncompleteOutputError` (a ``ValueError`` that names
the folder and the file) for anything missing, truncated, altered or never completed. A process killed at any
point leaves either the old destination or the new one, plus at most a temp entry, which
:func:`clean_stale_temps` removes on the next run (only entries whose writing process is gone, and only
those written from this machine: a folder shared over a network file system holds other machines' temps).
Permissions follow the umask, as for any file created with ``open``: ``tempfile`` would otherwise leave them
0600 and a cache shared by a group unreadable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import numbers
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TMP_MARK = ".tmp-"


class IncompleteOutputError(ValueError):
    """A folder or file that was not written completely, or was altered after it was written."""


class OutputWriteError(OSError):
    """Writing an output failed (a full disk, a quota, a read-only file system); nothing was left behind.

    Keeps the ``errno`` of the failure; the message names the destination and says that it is untouched.
    """


def _write_failed(final: Path, error: OSError) -> OutputWriteError:
    reason = error.strerror or str(error)
    return OutputWriteError(error.errno, f"writing {str(final)!r} failed: {reason}"
                            f"{f' ({error.filename})' if error.filename else ''}; nothing was written there "
                            "and the temp entry was removed")


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN/Infinity).

    Dicts, lists and tuples are walked; other real numbers (numpy floats) become Python floats. A reader of
    the JSON sees ``null`` where a measurement was not a finite number (e.g. a magnitude pruning's
    ``rel_error`` without calibration data, or a diverged validation loss).
    """
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, (bool, numbers.Integral)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _follow_umask_tree(directory: Path) -> None:
    """Give every file and folder below ``directory`` the umask's mode (safetensors writes 0600 files)."""
    for path in directory.rglob("*"):
        if not path.is_symlink():
            _follow_umask(path, is_dir=path.is_dir())


def _host() -> str:
    """This machine's name, letters and digits only (it marks the temp entries this machine writes)."""
    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def _temp_prefix(final: Path) -> str:
    return f".{final.name}{_TMP_MARK}{os.getpid()}@{_host()}-"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory; the rename stands
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable_parent(path: str | os.PathLike, argument: str = "path") -> Path:
    """Check, before any work, that ``path`` can be created: its parent is (or can be made) a writable folder.

    Raises ``ValueError`` naming ``argument`` when the parent is a file or not writable. Writability is
    tried (a temp file is created in the nearest existing folder and removed at once), since permission
    bits say nothing on a read-only file system or for root.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{argument}={str(path)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{argument}={str(path)!r}: the folder {str(probe)!r} is not writable")
    try:
        fd, trial = tempfile.mkstemp(prefix=_temp_prefix(path), dir=probe)
    except OSError as error:
        raise ValueError(f"{argument}={str(path)!r}: the folder {str(probe)!r} is not writable "
                         f"({error.strerror})") from None
    os.close(fd)
    os.unlink(trial)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a fsynced temp file in the same folder, then rename it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _follow_umask(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise _write_failed(path, error) from error
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1, **kwargs) -> Path:
    """Write ``obj`` as standard JSON (``NaN``/``Infinity`` are refused: they are not JSON) atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, **kwargs)
    return atomic_write_text(path, text + "\n")


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Fsync every file below ``directory``; record its sha256 and size in ``manifest.json``, written last."""
    directory = Path(directory)
    entries = {}
    for file in _files(directory):
        _fsync_file(file)
        rel = file.relative_to(directory).as_posix()
        entries[rel] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    return atomic_write_json(directory / MANIFEST, {"version": MANIFEST_VERSION, "files": entries},
                             sort_keys=True)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a completed folder; ``IncompleteOutputError`` naming the folder when it has none."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IncompleteOutputError(f"{str(directory)!r} is not a folder written by sparsekit")
    if not path.is_file():
        raise IncompleteOutputError(
            f"{str(directory)!r} has no {MANIFEST}: it was never completed (a killed or failed write) "
            "or was not written by sparsekit")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        raise IncompleteOutputError(f"{str(path)!r} is damaged ({err})") from err
    return manifest


def verify_manifest(directory: str | os.PathLike, quick: bool = False) -> dict:
    """Check that every file the manifest lists is present with its recorded size and sha256.

    ``quick=True`` checks sizes only (for large folders read often). Files not in the manifest are ignored.
    Returns the manifest; raises ``IncompleteOutputError`` naming the folder and the first bad file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, entry in manifest["files"].items():
        file = directory / rel
        if not file.is_file():
            raise IncompleteOutputError(f"{str(directory)!r}: {rel!r} is listed in {MANIFEST} but missing")
        if file.stat().st_size != entry.get("bytes"):
            raise IncompleteOutputError(
                f"{str(directory)!r}: {rel!r} has {file.stat().st_size} bytes, {MANIFEST} recorded "
                f"{entry.get('bytes')} (truncated or altered)")
        if not quick and sha256_file(file) != entry.get("sha256"):
            raise IncompleteOutputError(
                f"{str(directory)!r}: {rel!r} does not match its sha256 in {MANIFEST} (altered or damaged)")
    return manifest


def is_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory`` has a manifest and every listed file verifies."""
    try:
        verify_manifest(directory)
    except IncompleteOutputError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temp entries (``.<name>.tmp-<pid>@<host>-…``) in ``directory`` written from this machine by
    a process that no longer runs (the older form ``.<name>.tmp-<pid>-…`` counts as this machine's)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not entry.name.startswith(".") or _TMP_MARK not in entry.name:
            continue
        pid_text, _, host = entry.name.rsplit(_TMP_MARK, 1)[1].split("-", 1)[0].partition("@")
        if host and host != _host():  # written from another machine sharing this folder: its pid is not ours
            continue
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temp sibling, then complete it (manifest last) and rename it onto ``final``.

    ``with staged_directory(out) as tmp: model.save_pretrained(tmp)``. On an exception the temp folder is
    removed and ``final`` is untouched. An existing ``final`` is refused unless ``overwrite=True``; then it is
    replaced only after the new folder is complete (a crash in between leaves the old one or a stale temp).
    Every file and folder inside gets the umask's mode before the manifest is written.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True (or --overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        _follow_umask(tmp, is_dir=True)
        yield tmp
        _follow_umask_tree(tmp)
        write_manifest(tmp)
        _move_into_place(tmp, final, overwrite)
        _fsync_dir(final.parent)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, (OutputWriteError, FileExistsError)):
            raise _write_failed(final, error) from error
        raise


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the completed ``tmp`` onto ``final``; an existing ``final`` is swapped out, then removed.

    Another process may complete the same ``final`` between the check and the rename (two runs building
    the same cache entry): the rename then fails with ``ENOTEMPTY``/``EEXIST`` and the swap is done
    instead (with ``overwrite``), so the last completed folder wins and no reader sees a half-built one.
    """
    raced = FileExistsError(errno.EEXIST, f"{str(final)!r} was created by another process while this one "
                            "wrote it; it is kept: pass overwrite=True (or --overwrite) to replace it")
    if not final.exists():
        try:
            os.replace(tmp, final)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
            if not overwrite:
                raise raced from error
    elif not overwrite:  # it appeared while this folder was written (it was absent at the start)
        raise raced
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    os.rmdir(old)
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)
