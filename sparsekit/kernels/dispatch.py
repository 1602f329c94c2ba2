"""When a sparse CPU kernel beats dense: the batch limits behind ``SparseLinear``'s dispatch.

A rule set maps a kernel kind to ``[(min_sparsity, max_batch), ...]``: a weight at least ``min_sparsity``
sparse (within 0.005) goes to that kernel for batches up to ``max_batch`` (the first matching entry,
highest sparsity first), and to the dense fallback otherwise. Kinds: ``"expand"`` (bitmask / N:M
kernels, float values), ``"expand-int8"``, ``"expand-int4"`` (quantized values) and ``"csr"``.

The rules come from ``sparsekit bench --calibrate`` (:func:`sparsekit.benchmarking.calibrate`), which
times every kind against what ``SparseLinear`` would run instead (decompress + dense ``F.linear``) on this
machine and writes
``$SPARSEKIT_CACHE/kernels/calibration.json`` (or the file named by ``$SPARSEKIT_CALIBRATION``) atomically
(:func:`sparsekit.fileio.atomic_write_json`). A file made on another CPU (model, cores or instruction set
differ), or one that cannot be read or parsed or holds a bad ``rules`` entry, is ignored with one warning
naming it; without a file, :data:`DEFAULT_RULES` apply: measured on the 2-core AMD EPYC (AVX-512) machine
this project was built on, ``calibration_default.json`` beside this module holds that measurement.
"""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from pathlib import Path

__all__ = ["DEFAULT_RULES", "calibration_path", "load_rules", "reload_rules", "max_batch", "machine_key",
           "cpu_model", "KINDS"]

KINDS = ("expand", "expand-int8", "expand-int4", "csr")
DEFAULT_RULES: dict[str, list[tuple[float, int]]] = json.loads(
    (Path(__file__).with_name("calibration_default.json")).read_text())["rules"]


def calibration_path() -> Path:
    if os.environ.get("SPARSEKIT_CALIBRATION"):
        return Path(os.environ["SPARSEKIT_CALIBRATION"])
    root = Path(os.environ.get("SPARSEKIT_CACHE", Path.home() / ".cache" / "sparsekit"))
    return root / "kernels" / "calibration.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> dict:
    """What a calibration is valid for: CPU model, logical cores and the kernels' instruction set."""
    from sparsekit.kernels.ops import active_isa

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa": active_isa()}


def _entry(kind: str, entry) -> tuple[float, int]:
    """One ``[min_sparsity in [0, 1], max_batch >= 0]`` pair; bools, NaN, inf, fractional batches refused."""
    problem = ValueError(f"calibration entry for {kind!r} must be [min_sparsity in [0, 1], max_batch >= 0], "
                         f"got {entry!r}")
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise problem
    sparsity, batch = entry
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in entry)
    if not numbers or not 0 <= sparsity <= 1 or batch != int(batch) or batch < 0:
        raise problem
    return float(sparsity), int(batch)


def check_rules(rules: dict) -> dict[str, list[tuple[float, int]]]:
    """Rules sorted by decreasing sparsity; ValueError naming the bad entry."""
    if not isinstance(rules, dict):
        raise ValueError(f"calibration rules must be a mapping kind -> [[min_sparsity, max_batch], ...], "
                         f"got {type(rules).__name__}")
    out = {}
    for kind, entries in rules.items():
        if kind not in KINDS:
            raise ValueError(f"calibration kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(entries, list):
            raise ValueError(f"calibration rules for {kind!r} must be a list of [min_sparsity, max_batch], "
                             f"got {entries!r}")
        out[kind] = sorted((_entry(kind, entry) for entry in entries), reverse=True)
    return out


def _calibrated_rules(path: Path) -> dict[str, list[tuple[float, int]]] | None:
    """The checked rules of the calibration file ``path`` for this machine; ``None`` (with one warning
    naming the file) when it is made elsewhere, unreadable, not JSON or holds a bad or no ``rules``."""
    advice = "using the default dispatch rules. Run `sparsekit bench --calibrate`."
    try:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("machine_key") != machine_key():
            warnings.warn(f"sparsekit: {path} was calibrated on {data.get('machine_key')}, not this machine "
                          f"({machine_key()}); {advice}", RuntimeWarning, stacklevel=3)
            return None
        if "rules" not in data:
            raise ValueError("it has no 'rules' entry")
        return check_rules(data["rules"])
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"sparsekit: the calibration file {path} cannot be used ({type(error).__name__}: "
                      f"{error}); {advice}", RuntimeWarning, stacklevel=3)
        return None


def load_rules() -> dict[str, list[tuple[float, int]]]:
    """This machine's calibrated rules if a matching, well-formed file exists, else :data:`DEFAULT_RULES`."""
    rules = _calibrated_rules(calibration_path())
    if rules is not None:
        return {**check_rules(DEFAULT_RULES), **rules}
    return check_rules(DEFAULT_RULES)


_RULES: dict[str, list[tuple[float, int]]] = {}
# A weight pruned to 90% keeps round(0.1·cols) per row, which can leave it a hair under 0.9: it still
# takes the 90% rule.
SPARSITY_SLACK = 0.005


def reload_rules() -> dict[str, list[tuple[float, int]]]:
    """Read the rules again (after a calibration, or a change of ``$SPARSEKIT_CALIBRATION``)."""
    _RULES.clear()
    _RULES.update(load_rules())
    return dict(_RULES)


def max_batch(kind: str, sparsity: float) -> int:
    """The largest batch sent to kernels of ``kind`` for a weight of ``sparsity`` (0: always dense).

    Reads only the rules loaded at import (no file access, so ``torch.compile`` traces through it).
    """
    for min_sparsity, limit in _RULES.get(kind, []):
        if sparsity >= min_sparsity - SPARSITY_SLACK:
            return limit
    return 0


reload_rules()
