"""A damaged or unwritable kernel cache never breaks ``import sparsekit.kernels`` (issue 19).

The compiled library is loaded only after its manifest (size, sha256) verifies; a damaged one is rebuilt, or
the torch reference ops serve, with exactly one warning naming the file. The damage is done to a *copy* of
the library this session built (in a temp ``$SPARSEKIT_CACHE``), and rebuilding is either refused (no
compiler: ``$CXX`` names nothing) or stood in for by copying the good library, so no test compiles. Each
import runs in a fresh interpreter: a library cannot be unloaded, and a bad one would kill the process.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sparsekit import fileio
from sparsekit.kernels import dispatch, extension, ops

ROOT = Path(__file__).resolve().parents[1]
KEY = extension.build_key()
NAME = extension.library_name(KEY)

# Import the kernels, record sparsekit's RuntimeWarnings, and check a product on whatever backend loaded.
IMPORT_AND_CHECK = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from sparsekit.kernels import ops
import torch
from sparsekit.formats import BitmaskWeight
W = torch.randn(6, 20) * (torch.rand(6, 20) < 0.5)
w = BitmaskWeight.from_dense(W)
x = torch.randn(3, 20)
y = torch.ops.sparsekit.bitmask_linear(x, w.bitmask, w.values, w.row_offsets, 20)
torch.testing.assert_close(y, x @ W.T)
print(json.dumps({"backend": ops.backend(), "library": str(ops._EXTENSION),
                  "warnings": [str(w.message) for w in caught if "sparsekit" in str(w.message)]}))
"""


def good_library() -> Path:
    assert ops.backend() == "c++", "these tests damage a copy of the built library"
    library = Path(ops._EXTENSION)
    assert library.is_file() and fileio.is_complete(library.parent), library
    return library


def cached_copy(kernels: Path) -> Path:
    """A copy of the built (verified) library folder at ``kernels/ext-<key>/``; the library's path."""
    target = kernels / f"ext-{KEY}"
    shutil.copytree(good_library().parent, target)
    return target / f"{NAME}.so"


def run_python(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout first on the path, no compiler, and a private
    temp folder (where the loader's fallback cache lives)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    unset = ("SPARSEKIT_NO_EXT", "SPARSEKIT_CALIBRATION")
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.update(PYTHONPATH=str(ROOT), CXX=str(tmp_path / "no-compiler"), TMPDIR=str(tmp))
    full_env.update({k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=300)


def import_kernels(tmp_path: Path, **env) -> dict:
    run = run_python(IMPORT_AND_CHECK, tmp_path, **env)
    assert run.returncode == 0, f"import died with {run.returncode}:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_verified_cached_library_loads_without_a_compiler_or_a_warning(tmp_path):
    library = cached_copy(tmp_path / "cache" / "kernels")
    result = import_kernels(tmp_path, SPARSEKIT_CACHE=tmp_path / "cache")
    assert result == {"backend": "c++", "library": str(library), "warnings": []}


@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "manifest missing"])
def test_a_damaged_library_is_never_loaded_and_named_once(tmp_path, damage):
    library = cached_copy(tmp_path / "cache" / "kernels")
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[: len(data) // 2])  # dlopen of this one dies with SIGBUS
    elif damage == "bit flipped":
        library.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    else:
        (library.parent / fileio.MANIFEST).unlink()
    result = import_kernels(tmp_path, SPARSEKIT_CACHE=tmp_path / "cache")
    # no compiler here: the torch reference ops serve, and the product above was still right
    assert result["backend"] == "torch"
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert str(library) in message and "failed verification" in message and "fall back to torch" in message


# The loader's rebuild path without compiling: `_compile` stands in by copying the good library, which torch's
# build would also have loaded. extension.py is loaded as a file so that sparsekit.kernels (whose import loads
# the kernels) is not imported first.
REBUILD = """
import importlib.util, json, shutil, sys, warnings
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("sk_extension", {source!r})
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)
built = []
def fake_compile(build_dir, name):
    build_dir.mkdir(parents=True)
    shutil.copy({good!r}, build_dir / (name + ".so"))
    torch.ops.load_library(str(build_dir / (name + ".so")))
    built.append(name)
    return build_dir / (name + ".so")
extension._compile = fake_compile
extension._missing_tools = lambda: []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    library = extension.load_extension()
x = torch.randn(2, 8)
dense = torch.ops.sparsekit.dense_linear(x, torch.eye(8))
print(json.dumps({{"library": str(library), "built": built, "same": bool(torch.equal(dense, x)),
                  "warnings": [str(w.message) for w in caught]}}))
"""


def test_a_damaged_library_is_rebuilt_in_place_and_then_verifies(tmp_path):
    good = good_library()
    library = cached_copy(tmp_path / "cache" / "kernels")
    library.write_bytes(library.read_bytes()[:1000])
    code = REBUILD.format(source=str(ROOT / "sparsekit" / "kernels" / "extension.py"), good=str(good))
    run = run_python(code, tmp_path, SPARSEKIT_CACHE=tmp_path / "cache")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["library"] == str(library) and result["built"] == [NAME] and result["same"]
    assert len(result["warnings"]) == 1 and str(library) in result["warnings"][0]
    assert "rebuilding" in result["warnings"][0]
    fileio.verify_manifest(library.parent)  # the rebuilt folder is complete: the next import loads it quietly
    assert library.read_bytes() == good.read_bytes()
    assert not [p for p in library.parent.parent.iterdir() if ".tmp-" in p.name]  # no staging folder left
    assert import_kernels(tmp_path, SPARSEKIT_CACHE=tmp_path / "cache")["warnings"] == []


def test_a_cache_path_that_is_a_file_falls_back_to_the_temp_cache(tmp_path):
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("not a folder")
    # what an earlier fallback build left in <tmp>/sparsekit-<uid>/kernels
    fallback = tmp_path / "tmp" / f"sparsekit-{os.getuid()}" / "kernels"
    library = cached_copy(fallback)
    result = import_kernels(tmp_path, SPARSEKIT_CACHE=not_a_folder)
    assert result["backend"] == "c++" and result["library"] == str(library)
    assert len(result["warnings"]) == 1 and str(not_a_folder) in result["warnings"][0]
    assert "cannot be used" in result["warnings"][0]


@pytest.mark.parametrize("cache", ["file", "unwritable"])
def test_an_unusable_cache_without_a_compiler_still_imports(tmp_path, cache):
    if cache == "file":
        path = tmp_path / "cache-file"
        path.write_text("x")
    else:
        path = Path("/proc/sparsekit-cache")  # no folder can be made there, not even by root
    result = import_kernels(tmp_path, SPARSEKIT_CACHE=path)
    assert result["backend"] == "torch"
    assert len(result["warnings"]) == 1 and str(path) in result["warnings"][0]
    assert "fall back to torch" in result["warnings"][0]


# ---- calibration.json: damaged or malformed files warn once, by name, and the default rules apply


def calibration(tmp_path, monkeypatch, content) -> Path:
    path = tmp_path / "calibration.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setenv("SPARSEKIT_CALIBRATION", str(path))
    return path


def load_rules_warning_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rules = dispatch.load_rules()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return rules, messages


def mine(rules) -> dict:
    return {"machine_key": dispatch.machine_key(), "rules": rules}


GOOD = json.dumps(mine({"csr": [[0.5, 7]]}))
BAD_CALIBRATIONS = {
    "truncated": GOOD[: len(GOOD) // 2],
    "empty": "",
    "not JSON": "calibration: yes",
    "a list": [1, 2],
    "no rules": {"machine_key": "MINE"},
    "rules a list": mine([["csr", 0.5, 7]]),
    "unknown kind": mine({"sparse": [[0.5, 7]]}),
    "entry a string": mine({"csr": "0.5,7"}),
    "entry of three": mine({"csr": [[0.5, 7, 1]]}),
    "sparsity above 1": mine({"csr": [[1.5, 7]]}),
    "negative batch": mine({"csr": [[0.5, -1]]}),
    "fractional batch": mine({"csr": [[0.5, 2.5]]}),
    "NaN sparsity": GOOD.replace("0.5", "NaN"),
    "infinite batch": GOOD.replace("7", "Infinity"),
    "bool batch": mine({"csr": [[0.5, True]]}),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATIONS))
def test_a_bad_calibration_file_warns_once_naming_it_and_the_defaults_apply(tmp_path, monkeypatch, case):
    content = BAD_CALIBRATIONS[case]
    if isinstance(content, dict) and content.get("machine_key") == "MINE":
        content = {"machine_key": dispatch.machine_key()}
    path = calibration(tmp_path, monkeypatch, content)
    rules, messages = load_rules_warning_once()
    assert rules == dispatch.check_rules(dispatch.DEFAULT_RULES)
    assert len(messages) == 1 and str(path) in messages[0], messages


def test_a_good_calibration_file_is_used_silently(tmp_path, monkeypatch):
    calibration(tmp_path, monkeypatch, GOOD)
    rules, messages = load_rules_warning_once()
    assert messages == [] and rules["csr"] == [(0.5, 7)]
    assert rules["expand"] == dispatch.check_rules(dispatch.DEFAULT_RULES)["expand"]


def test_a_calibration_path_that_is_a_folder_warns_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_CALIBRATION", str(tmp_path))
    rules, messages = load_rules_warning_once()
    assert rules == dispatch.check_rules(dispatch.DEFAULT_RULES)
    assert len(messages) == 1 and str(tmp_path) in messages[0]


def test_import_survives_a_truncated_calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(GOOD[:20])
    run = run_python(IMPORT_AND_CHECK, tmp_path, SPARSEKIT_CALIBRATION=path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1 and str(path) in result["warnings"][0], result["warnings"]
    assert result["backend"] == "c++"


def test_calibrate_writes_whole_or_not_at_all(tmp_path, monkeypatch):
    from sparsekit import benchmarking

    path = tmp_path / "calibration.json"
    path.write_text(GOOD)
    kwargs = dict(shape=(32, 64), patterns=("50%",), batches=(1,), repeats=1, path=path, progress=False,
                  probe_bytes=1 << 16, rotate_bytes=1 << 16)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            benchmarking.calibrate(**kwargs)
    assert path.read_text() == GOOD  # the old calibration stands whole
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]  # no temp file left
    data = benchmarking.calibrate(**kwargs)
    assert json.loads(path.read_text())["rules"] == data["rules"]
    monkeypatch.setenv("SPARSEKIT_CALIBRATION", str(path))
    dispatch.reload_rules()  # the file written is one load_rules accepts silently
    try:
        assert load_rules_warning_once()[1] == []
    finally:
        monkeypatch.delenv("SPARSEKIT_CALIBRATION")
        dispatch.reload_rules()
