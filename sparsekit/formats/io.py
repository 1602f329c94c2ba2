"""Saving and loading compressed weights with safetensors, validated on load.

File layout: every part of a compressed weight ``name`` is the tensor ``"{name}.{part}"``; a plain tensor
(a bias, an embedding) is stored under ``name``. The safetensors metadata entry ``"sparsekit"`` is JSON:

    {"version": 1, "weights": {name: {"format": "bitmask"|"nm"|"csr"|"dense", "format_version": 1,
                                      "shape": [rows, cols], "extra": {...}, "sha256": {part: hex}}},
     "weights_sha256": hex of the "weights" entry}

``extra`` holds ``n``, ``m`` of an N:M weight and ``bits``, ``group_size`` of a quantized one (whose
``scales`` is one more part).

``load_sparse`` refuses (``ValueError`` naming the file and the weight) a file that is not a sparsekit
file, a newer version, a missing or unexpected part, a checksum mismatch (flipped bits) or a structure
that fails the format's validation; a truncated file fails in safetensors and is reported the same way.
``save_sparse`` writes the file whole or not at all (:func:`sparsekit.fileio.atomic_write_bytes`: a temp
file in the same folder, fsynced, renamed into place, mode from the umask).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from sparsekit import fileio
from sparsekit.formats.base import FORMATS, SparseWeight

__all__ = ["save_sparse", "load_sparse", "FILE_VERSION"]

FILE_VERSION = 1
META_KEY = "sparsekit"


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def save_sparse(path, weights: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``{name: SparseWeight | torch.Tensor}`` to a safetensors file at ``path``; returns the path.

    ``metadata`` (str -> str) is stored beside sparsekit's own entry.
    """
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a non-empty dict -> SparseWeight | Tensor, got {type(weights)}")
    if not weights:
        raise ValueError("weights must be a non-empty dict -> SparseWeight | Tensor, got {}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"weight names must be non-empty strings, got {name!r}")
        if isinstance(weight, SparseWeight):
            parts = {f"{name}.{part}": t for part, t in weight.tensors().items()}
            entries[name] = {"format": weight.format, "format_version": weight.version,
                             "shape": list(weight.shape), "extra": weight.extra()}
        elif isinstance(weight, torch.Tensor):
            parts = {name: weight}
            entries[name] = {"format": "dense", "format_version": 1, "shape": list(weight.shape), "extra": {}}
        else:
            kind = type(weight).__name__
            raise TypeError(f"weights[{name!r}] must be a SparseWeight or a Tensor, got {kind}")
        for key, tensor in parts.items():
            if key in tensors:
                raise ValueError(f"tensor name {key!r} is used twice; rename the weights")
            tensors[key] = tensor.detach().contiguous().cpu()
        entries[name]["sha256"] = {key: _digest(t) for key, t in parts.items()}
    meta = dict(metadata or {})
    meta[META_KEY] = json.dumps({"version": FILE_VERSION, "weights": entries,
                                 "weights_sha256": _entries_digest(entries)})
    path = Path(path)
    fileio.atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _entries_digest(entries: dict) -> str:
    """Checksum of the per-weight metadata (shapes, formats, tensor checksums): a flipped digit in a shape
    could otherwise describe a different, still well-formed weight."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _fail(path, message: str) -> ValueError:
    return ValueError(f"{path}: not a valid sparsekit weight file ({message})")


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/garbled files
        raise _fail(path, f"unreadable, truncated or corrupted: {error}") from error
    if META_KEY not in meta:
        raise _fail(path, f"no {META_KEY!r} metadata entry; was it written by save_sparse?")
    try:
        header = json.loads(meta[META_KEY])
        version, entries, digest = header["version"], header["weights"], header["weights_sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise _fail(path, f"the {META_KEY!r} metadata is not valid: {error}") from error
    if version != FILE_VERSION:
        raise _fail(path, f"file version {version!r}, this sparsekit reads version {FILE_VERSION}")
    if not isinstance(entries, dict) or _entries_digest(entries) != digest:
        raise _fail(path, "metadata checksum mismatch: the header is corrupted")
    return entries, tensors


def load_sparse(path, device: str | torch.device = "cpu") -> dict:
    """Read a file written by :func:`save_sparse`: ``{name: SparseWeight | torch.Tensor}``, validated."""
    entries, tensors = _read(path)
    out, used = {}, set()
    for name, entry in entries.items():
        try:
            tag, shape, digests = entry["format"], tuple(entry["shape"]), entry["sha256"]
            extra, version = entry.get("extra", {}), entry["format_version"]
        except (KeyError, TypeError) as error:
            raise _fail(path, f"weight {name!r} has incomplete metadata: {error}") from error
        for key, expected in digests.items():
            if key not in tensors:
                raise _fail(path, f"weight {name!r} misses tensor {key!r}")
            if _digest(tensors[key]) != expected:
                raise _fail(path, f"checksum mismatch in tensor {key!r}: the file is corrupted")
            used.add(key)
        if tag == "dense":
            tensor = tensors.get(name)
            if tensor is None or tuple(tensor.shape) != shape:
                raise _fail(path, f"dense weight {name!r} is missing or not of shape {shape}")
            out[name] = tensor.to(device)
            continue
        cls = FORMATS.get(tag)
        if cls is None:
            raise _fail(path, f"weight {name!r} has unknown format {tag!r}; known: {sorted(FORMATS)}")
        if version != cls.version:
            raise _fail(path, f"weight {name!r} has {tag} format version {version}, expected {cls.version}")
        if not isinstance(extra, dict):
            raise _fail(path, f"weight {name!r} has a malformed 'extra' entry: {extra!r}")
        parts = {part: tensors.get(f"{name}.{part}") for part in cls.part_names(extra)}
        missing = [p for p, t in parts.items() if t is None or f"{name}.{p}" not in digests]
        if missing:
            raise _fail(path, f"weight {name!r} ({tag}) misses part(s) {missing}")
        try:
            weight = cls.from_parts(shape, parts, extra, validate=True)
        except (ValueError, TypeError) as error:
            raise _fail(path, f"weight {name!r} ({tag}) is malformed: {error}") from error
        out[name] = weight.to(device) if torch.device(device).type != "cpu" else weight
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise _fail(path, f"tensors {unexpected[:5]} belong to no weight in the metadata")
    return out
