"""Measuring the CPU kernels against dense torch and against the memory-bandwidth limit.

Everything here is a plain function returning dicts/lists, used by ``kernels/bench_linear.py``,
``kernels/bench_decode.py``, ``sparsekit bench`` and ``notebooks/06_cpu_inference.ipynb``. Every result
carries :func:`machine_info` (CPU model, cores, instruction-set path the kernels ran, versions) and the read
bandwidth measured in the same rounds.

Baselines: torch dense fp32 / bf16 / fp16 ``F.linear``, torch's int8 dynamic-quantized ``Linear``, and our
own dense kernels (``sparsekit dense bf16`` / ``int8``: the sparse kernels run with an all-ones mask, the
same engineering), so the share of a speedup due to sparsity is separated from the share due to storage.

Method (machines are shared and noisy, so only side-by-side ratios are meaningful):

* **interleaved runs**: each repeat runs every candidate once, in a rotating order, so that a burst of
  load from another process hits all candidates alike; we report the minimum (the best estimate of the
  undisturbed time) and the median;
* **weights from RAM**: each candidate cycles through enough copies of its weight that the copies
  together exceed 3x the last-level cache, so no call finds its weight in cache;
* **bandwidth limit**: a streaming read of a 256 MiB buffer (:func:`read_probe`) is one more interleaved
  candidate, so the read bandwidth ``BW`` is measured under the same conditions; a kernel that must read
  ``nbytes`` cannot take less than ``nbytes / BW`` (its *limit*), and ``limit / time`` is its fraction
  of the limit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit import fileio
from sparsekit.formats import BitmaskWeight, CSRWeight, NMWeight
from sparsekit.kernels import dispatch, ops, reference
from sparsekit.kernels.dispatch import cpu_model
from sparsekit.prune import magnitude_prune

OPS = torch.ops.sparsekit

__all__ = ["machine_info", "last_level_cache_bytes", "read_probe", "measure_bandwidth", "measure_peak_flops",
           "interleaved_times", "parse_pattern", "prune_weight", "bench_linear", "summarize_linear",
           "bytes_on_disk", "arithmetic_intensity", "attainable_gflops", "achieved_points", "goal_table",
           "tiny_mpt", "bench_decode", "teacher_decode", "PATTERNS", "quantize_rtn_parts", "calibrate",
           "rules_from_rows", "write_json"]

PATTERNS = ("50%", "70%", "80%", "90%", "2:4", "4:8", "16:32")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (from sysfs), or ``default``."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as handle:
                text = handle.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else default


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16",
              "avx512_vnni", "amx_bf16")


def machine_info(bandwidth_GBps: float | None = None) -> dict:
    """CPU model, cores, SIMD flags, caches, torch threads, the kernels' backend and instruction-set path,
    versions, load average, and (if given) the read bandwidth measured alongside."""
    flags = _cpu_flags()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "last_level_cache_MiB": last_level_cache_bytes() / 2**20,
        "kernel_backend": ops.backend(),
        "isa_path": ops.active_isa(),
        "isa_paths": ops.isa_paths(),
        "bandwidth_GBps": bandwidth_GBps,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_json(result: dict, path) -> Path:
    """Write a benchmark result (with its machine label) as JSON atomically
    (:func:`sparsekit.fileio.atomic_write_text`); returns the path."""
    return fileio.atomic_write_text(Path(path), json.dumps(fileio.json_safe(result), indent=1, default=str,
                                                           allow_nan=False))


def read_probe(buffer: torch.Tensor) -> float:
    """Stream ``buffer`` (fp32) once with the kernels' threads; returns its sum (so nothing is skipped)."""
    return float(OPS.read_sum(buffer))


TIMERS = {"wall": time.perf_counter, "cpu": time.thread_time}


def interleaved_times(candidates: dict[str, Callable[[int], object]], repeats: int, warmup: int = 1,
                      timer: str = "wall") -> dict[str, list[float]]:
    """Seconds of each candidate over ``repeats`` rounds; ``candidates[name](i)`` runs once in round ``i``.

    ``timer="cpu"`` measures the calling thread's CPU time instead of wall time: on a machine shared with
    other processes it ignores the time the thread waits to be scheduled, so it is only meaningful with
    one thread (``torch.set_num_threads(1)``), where it is the single-core cost of each candidate.
    """
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {sorted(TIMERS)}, got {timer!r}")
    if timer == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(f"timer='cpu' needs torch.set_num_threads(1), got {torch.get_num_threads()} threads")
    clock = TIMERS[timer]
    names = list(candidates)
    for i in range(warmup):
        for name in names:
            candidates[name](i)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            candidates[name](i + warmup)
            times[name].append(clock() - start)
    return times


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Read bandwidth in GB/s (best of ``repeats`` streams of an ``nbytes`` buffer)."""
    buffer = torch.ones(nbytes // 4)
    times = interleaved_times({"read": lambda i: read_probe(buffer)}, repeats)["read"]
    return buffer.numel() * 4 / min(times) / 1e9


def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Dense matrix-multiply throughput in GFLOP/s (``2n³`` per ``n×n`` product, best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    times = interleaved_times({"mm": lambda i: torch.mm(a, b)}, repeats)["mm"]
    return 2 * n**3 / min(times) / 1e9


def parse_pattern(pattern: str) -> dict:
    """``"70%"`` -> ``{"sparsity": 0.7}``; ``"2:4"`` -> ``{"nm": (2, 4)}``."""
    if pattern.endswith("%"):
        return {"sparsity": float(pattern[:-1]) / 100}
    if ":" in pattern:
        n, m = pattern.split(":")
        return {"nm": (int(n), int(m))}
    raise ValueError(f"pattern must look like '70%' or '2:4', got {pattern!r}")


def prune_weight(W: torch.Tensor, pattern: str) -> torch.Tensor:
    """``W`` magnitude-pruned to ``pattern`` (exact per row / per group)."""
    return magnitude_prune(W, **parse_pattern(pattern))[0]


def _copies(make: Callable[[], object], nbytes: int, rotate_bytes: int) -> list:
    return [make() for _ in range(max(2, math.ceil(rotate_bytes / max(nbytes, 1))))]


@dataclass
class Candidate:
    """One kernel in a benchmark: what it reads (``nbytes`` of ``format``), its weight copies and
    ``run(x, weight)`` where ``x`` is fp32 (converted to ``x_dtype`` once, outside the timing)."""

    format: str
    nbytes: int
    dtype: torch.dtype
    copies: list
    run: Callable
    x_dtype: torch.dtype = torch.float32


def _clone_weight(weight):
    return type(weight).from_parts(weight.shape, {k: t.clone() for k, t in weight.tensors().items()},
                                   weight.extra(), validate=False)


def _torch_csr(Wp: torch.Tensor) -> torch.Tensor:
    csr = Wp.to_sparse_csr()
    return torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                   csr.values(), size=Wp.shape)


def _run_bitmask(x, w):
    return OPS.bitmask_linear(x, w.bitmask, w.values, w.row_offsets, w.shape[1])


def _run_nm(x, w):
    return OPS.nm_linear(x, w.bitmask, w.values, w.shape[1])


def _run_csr(x, w):
    return OPS.csr_linear(x, w.indptr, w.indices, w.values, w.shape[1])


def quantize_rtn_parts(Wp: torch.Tensor, bits: int, group_size: int | None = None, nm=None) -> dict:
    """Round-to-nearest symmetric quantization of a pruned ``Wp`` into the quantized format parts (the
    layout of the formats' spec): ``{"bitmask", "values", "row_offsets" (unless N:M), "scales",
    "group_size"}``; ``group_size=None`` = per output channel. Pruned zeros stay out of the values."""
    rows, cols = Wp.shape
    group_size = cols if group_size is None else group_size
    qmax = 127 if bits == 8 else 7
    groups = Wp.reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(-1) / qmax).clamp_min(1e-8).half()
    q = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-qmax, qmax)
    q = q.reshape(rows, cols).to(torch.int8)
    if nm is None:
        weight = BitmaskWeight.from_dense(Wp)
        kept = q[weight.mask()]
        values = kept if bits == 8 else reference.pack_int4(kept)
        return {"bitmask": weight.bitmask, "values": values, "row_offsets": weight.row_offsets,
                "scales": scales, "group_size": group_size}
    weight = NMWeight.from_dense(Wp, nm=nm)
    kept = q[weight.mask()].reshape(rows, -1)
    values = kept if bits == 8 else reference.pack_int4(kept)
    return {"bitmask": weight.bitmask, "values": values.contiguous(), "scales": scales,
            "group_size": group_size}


@dataclass
class _Parts:
    """Tensors of a quantized weight (so that the rotation copies clone them)."""

    tensors: dict
    group_size: int

    def clone(self):
        return _Parts({k: v.clone() for k, v in self.tensors.items()}, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _run_quant_bitmask(x, p, x_int8=False):
    t = p.tensors
    return OPS.bitmask_linear(x, t["bitmask"], t["values"], t["row_offsets"], t["bitmask"].shape[1] * 8,
                              t["scales"], p.group_size, "auto", x_int8)


def _run_quant_nm(x, p, x_int8=False):
    t = p.tensors
    return OPS.nm_linear(x, t["bitmask"], t["values"], t["bitmask"].shape[1] * 8, t["scales"], p.group_size,
                         "auto", x_int8)


def _x_int8(run):
    return lambda x, p: run(x, p, True)


def _run_dense_kernel(x, p):
    t = p.tensors
    return OPS.dense_linear(x, t["weight"], t.get("scales"), p.group_size)


def _quant_parts(Wp, bits, group_size, nm=None) -> _Parts:
    parts = quantize_rtn_parts(Wp, bits, group_size, nm)
    group_size = parts.pop("group_size")
    return _Parts(parts, group_size)


def _dense_int8(Wp) -> _Parts:
    scales = (Wp.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8).half()
    q = torch.round(Wp / scales.float()).clamp(-127, 127).to(torch.int8)
    return _Parts({"weight": q, "scales": scales}, Wp.shape[1])


def _torch_int8_dynamic(Wp):
    """torch's int8 dynamic-quantized Linear (deprecated by torch, still the stock CPU int8 path)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        from torch.ao.quantization import quantize_dynamic

        linear = torch.nn.Linear(Wp.shape[1], Wp.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(Wp)
        return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)


def linear_candidates(Wp: torch.Tensor, pattern: str, rotate_bytes: int, values_dtype: torch.dtype,
                      torch_csr: bool = True, baselines: bool = True, quantized: bool = True,
                      group_size: int | None = 128) -> dict[str, Candidate]:
    """The kernels compared on one pruned weight ``Wp``: torch dense fp32 / bf16 (and CSR int32), and
    sparsekit bitmask, N:M (for N:M patterns) and CSR with ``values_dtype`` values (x in that dtype too,
    as torch dense bf16 gets it; the quantized kernels take fp32 x). ``baselines`` adds
    torch dense fp16, torch's int8 dynamic-quantized Linear and our dense bf16 / int8 kernels;
    ``quantized`` adds our sparse int8 and int4 kernels (bitmask, and N:M for N:M patterns), RTN-quantized
    with ``group_size`` (None: per channel), each with fp32 x and with x rounded to int8 (``... x-int8``)."""
    dense_fp32, dense_bf16 = Wp.numel() * 4, Wp.numel() * 2
    out = {
        "torch dense fp32": Candidate("dense", dense_fp32, torch.float32,
                                      _copies(Wp.clone, dense_fp32, rotate_bytes), F.linear),
        "torch dense bf16": Candidate("dense", dense_bf16, torch.bfloat16,
                                      _copies(Wp.bfloat16, dense_bf16, rotate_bytes), F.linear,
                                      x_dtype=torch.bfloat16),
    }
    if baselines:
        out["torch dense fp16"] = Candidate("dense", dense_bf16, torch.float16,
                                            _copies(Wp.half, dense_bf16, rotate_bytes), F.linear,
                                            x_dtype=torch.float16)
        int8_bytes = Wp.numel() + 4 * Wp.shape[0]
        dynamic = _copies(lambda: _torch_int8_dynamic(Wp), int8_bytes, rotate_bytes)
        out["torch int8 dynamic"] = Candidate("dense", int8_bytes, torch.int8, dynamic, lambda x, m: m(x))
        out["sparsekit dense bf16"] = Candidate(
            "dense", dense_bf16, torch.bfloat16,
            _copies(lambda: _Parts({"weight": Wp.bfloat16()}, 0), dense_bf16, rotate_bytes),
            _run_dense_kernel, x_dtype=torch.bfloat16)
        dense8 = _dense_int8(Wp)
        out["sparsekit dense int8"] = Candidate("dense", dense8.nbytes, torch.int8,
                                                _copies(dense8.clone, dense8.nbytes, rotate_bytes),
                                                _run_dense_kernel)
    if quantized:
        nm = parse_pattern(pattern).get("nm")
        gs = group_size if group_size and Wp.shape[1] % group_size == 0 else None
        quant = {
            "sparsekit bitmask int8": (_quant_parts(Wp, 8, gs), _run_quant_bitmask, "bitmask", torch.int8),
            "sparsekit bitmask int4": (_quant_parts(Wp, 4, gs), _run_quant_bitmask, "bitmask",
                                       torch.quint4x2),
        }
        if nm is not None:
            quant["sparsekit nm int4"] = (_quant_parts(Wp, 4, gs, nm), _run_quant_nm, "nm", torch.quint4x2)
            quant["sparsekit nm int8"] = (_quant_parts(Wp, 8, gs, nm), _run_quant_nm, "nm", torch.int8)
        for name in list(quant):  # the same weights times x rounded to int8 (VNNI on AVX-512)
            parts, run, format, dtype = quant[name]
            quant[f"{name} x-int8"] = (parts, _x_int8(run), format, dtype)
        for name, (parts, run, format, dtype) in quant.items():
            copies = _copies(parts.clone, parts.nbytes, rotate_bytes)
            out[name] = Candidate(format, parts.nbytes, dtype, copies, run)
    if torch_csr:
        nbytes = int((Wp != 0).sum()) * 8 + (Wp.shape[0] + 1) * 4
        out["torch csr int32"] = Candidate("csr", nbytes, torch.float32,
                                           _copies(lambda: _torch_csr(Wp), nbytes, rotate_bytes),
                                           lambda x, w: torch.mm(w, x.T).T)
    weights = {"sparsekit bitmask": (BitmaskWeight.from_dense(Wp, dtype=values_dtype), _run_bitmask)}
    if ":" in pattern:
        nm = NMWeight.from_dense(Wp, nm=parse_pattern(pattern)["nm"], dtype=values_dtype)
        weights["sparsekit nm"] = (nm, _run_nm)
    weights["sparsekit csr"] = (CSRWeight.from_dense(Wp, dtype=values_dtype), _run_csr)
    for name, (weight, run) in weights.items():  # x in the values' dtype, as torch dense bf16 gets it
        copies = _copies(lambda w=weight: _clone_weight(w), weight.nbytes, rotate_bytes)
        out[name] = Candidate(weight.format, weight.nbytes, values_dtype, copies, run, x_dtype=values_dtype)
    return out


def time_candidates(candidates: dict[str, Candidate], x: torch.Tensor, probe: torch.Tensor,
                    repeats: int, timer: str = "wall") -> tuple[dict[str, list[float]], float]:
    """Interleaved times of every candidate on ``x`` (plus the read probe); returns (times, bytes/s)."""
    xs = {dtype: x.to(dtype) for dtype in {c.x_dtype for c in candidates.values()}}

    def runner(candidate):
        xd = xs[candidate.x_dtype]
        return lambda i: candidate.run(xd, candidate.copies[i % len(candidate.copies)])

    timed = {"read probe": lambda i: read_probe(probe)}
    timed.update({name: runner(candidate) for name, candidate in candidates.items()})
    times = interleaved_times(timed, repeats, timer=timer)
    bandwidth = probe.numel() * probe.element_size() / min(times.pop("read probe"))
    return times, bandwidth


def linear_rows(candidates, times, bandwidth, **labels) -> list[dict]:
    """Table rows: min / median ms, the bandwidth limit and the ratios against torch dense."""
    best = {name: min(t) for name, t in times.items()}
    best_dense = min(best["torch dense fp32"], best["torch dense bf16"])
    rows = []
    for name, t in times.items():
        candidate = candidates[name]
        limit = candidate.nbytes / bandwidth
        rows.append({
            **labels, "kernel": name, "format": candidate.format, "dtype": _dtype_name(candidate.dtype),
            "nbytes": candidate.nbytes, "min_ms": 1e3 * min(t), "median_ms": 1e3 * sorted(t)[len(t) // 2],
            "bandwidth_GBps": bandwidth / 1e9, "limit_ms": 1e3 * limit, "frac_of_limit": limit / min(t),
            "speedup_vs_fp32": best["torch dense fp32"] / min(t),
            "speedup_vs_bf16": best["torch dense bf16"] / min(t),
            "speedup_vs_best_dense": best_dense / min(t),
            "speedup_vs_own_dense_bf16": (best["sparsekit dense bf16"] / min(t)
                                          if "sparsekit dense bf16" in best else None),
        })
    return rows


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.quint4x2: "int4"}.get(dtype, str(dtype).replace("torch.", ""))


def bench_linear(shapes=((4096, 4096), (11008, 4096)), patterns=PATTERNS, batches=(1, 4, 16),
                 repeats: int = 10, values_dtype: torch.dtype = torch.bfloat16, torch_csr: bool = True,
                 seed: int = 0, progress: bool = True, rotate_bytes: int | None = None,
                 probe_bytes: int = 256 << 20, timer: str = "wall", baselines: bool = True,
                 quantized: bool = True, group_size: int | None = 128, fallbacks: bool = False) -> dict:
    """Time every kernel for each (shape, pattern, batch); returns ``{"machine", "rows", ...}``.

    A row: ``shape``, ``pattern``, ``sparsity``, ``batch``, ``kernel``, ``format``, ``dtype``, ``nbytes``,
    ``min_ms``, ``median_ms``, ``bandwidth_GBps`` (read probe in the same rounds), ``limit_ms``
    (``nbytes / bandwidth``), ``frac_of_limit`` and ``speedup_vs_fp32`` / ``_bf16`` / ``_best_dense``
    (ratios of minimum times). ``baselines``, ``quantized``, ``group_size`` as in :func:`linear_candidates`;
    ``fallbacks`` adds :func:`fallback_candidates` (what ``SparseLinear`` runs without a kernel).
    ``rotate_bytes`` (default 3x the last-level cache) is the size the copies
    of each weight add up to; ``probe_bytes`` the size of the read-bandwidth probe; ``timer`` as in
    :func:`interleaved_times`.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    rotate_bytes = 3 * last_level_cache_bytes() if rotate_bytes is None else rotate_bytes
    probe = torch.ones(probe_bytes // 4)
    rows = []
    work = [(s, p) for s in shapes for p in patterns]
    for (out_features, in_features), pattern in tqdm(work, desc="bench_linear", disable=not progress):
        W = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        Wp = prune_weight(W, pattern)
        candidates = linear_candidates(Wp, pattern, rotate_bytes, values_dtype, torch_csr, baselines,
                                       quantized, group_size)
        if fallbacks:
            candidates.update(fallback_candidates(candidates, (out_features, in_features)))
        labels = {"shape": f"{out_features}x{in_features}", "pattern": pattern,
                  "sparsity": round(float((Wp == 0).sum()) / Wp.numel(), 4)}
        del W, Wp
        for batch in batches:
            x = torch.randn(batch, in_features, generator=generator)
            times, bandwidth = time_candidates(candidates, x, probe, repeats, timer)
            rows.extend(linear_rows(candidates, times, bandwidth, **labels, batch=batch))
        del candidates
    bandwidth = max((r["bandwidth_GBps"] for r in rows), default=None)
    return {"machine": machine_info(bandwidth), "repeats": repeats, "seed": seed, "timer": timer,
            "group_size": group_size, "rows": rows}


def bytes_on_disk(shape=(11008, 4096), patterns=PATTERNS, values_dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0, directory=None) -> list[dict]:
    """File sizes of one pruned weight saved with ``save_sparse`` in each format, against dense files.

    Rows: ``pattern``, ``format``, ``file_bytes``, ``vs_dense_fp32``, ``vs_dense_bf16`` (ratios of file
    sizes, dense = the same weight in a safetensors file at fp32 / bf16).
    """
    import tempfile
    from pathlib import Path

    from sparsekit.formats import save_sparse

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        def size(name, weight):
            path = save_sparse(Path(tmp) / f"{name}.safetensors", {"weight": weight})
            return path.stat().st_size

        dense = {"fp32": size("fp32", W), "bf16": size("bf16", W.bfloat16())}
        for pattern in patterns:
            Wp = prune_weight(W, pattern)
            formats = {"bitmask": BitmaskWeight.from_dense(Wp, dtype=values_dtype),
                       "csr": CSRWeight.from_dense(Wp, dtype=values_dtype)}
            if ":" in pattern:
                formats["nm"] = NMWeight.from_dense(Wp, nm=parse_pattern(pattern)["nm"], dtype=values_dtype)
            for name, weight in formats.items():
                nbytes = size(f"{pattern.replace(':', '-').replace('%', '')}-{name}", weight)
                rows.append({"pattern": pattern, "format": name, "file_bytes": nbytes,
                             "vs_dense_fp32": nbytes / dense["fp32"],
                             "vs_dense_bf16": nbytes / dense["bf16"]})
    return rows


def summarize_linear(result: dict, kernels=("sparsekit bitmask", "sparsekit nm", "sparsekit csr",
                                           "sparsekit bitmask int8", "sparsekit nm int4")):
    """A ``pandas.DataFrame`` of the sparse kernels' rows with the columns that matter."""
    import pandas as pd

    frame = pd.DataFrame(result["rows"])
    frame = frame[frame["kernel"].isin(kernels)]
    columns = ["shape", "pattern", "batch", "kernel", "min_ms", "median_ms", "limit_ms", "frac_of_limit",
               "speedup_vs_fp32", "speedup_vs_bf16", "speedup_vs_best_dense"]
    return frame[columns].reset_index(drop=True)


def arithmetic_intensity(batch: int, bytes_per_weight: float, density: float = 1.0,
                         counts_all_positions: bool = False) -> float:
    """FLOPs per byte of ``y = x Wᵀ``: ``2·batch·(useful weights)`` over the weight bytes, per weight.

    ``density`` = fraction of weights kept; the expansion kernels multiply every position
    (``counts_all_positions``), so they execute ``2·batch`` FLOPs per position whatever the density.
    """
    flops = 2 * batch * (1.0 if counts_all_positions else density)
    return flops / bytes_per_weight


def attainable_gflops(intensity, bandwidth_GBps: float, peak_gflops: float):
    """The roofline: ``min(peak, intensity · bandwidth)`` GFLOP/s at ``intensity`` FLOP/byte."""
    return [min(peak_gflops, i * bandwidth_GBps) for i in intensity]


def achieved_points(result: dict) -> list[dict]:
    """Each benchmark row as a roofline point: useful FLOP/byte (``2·batch·nnz / nbytes``) and GFLOP/s."""
    points = []
    for row in result["rows"]:
        rows_, cols = (int(v) for v in row["shape"].split("x"))
        useful = 2 * row["batch"] * rows_ * cols * (1 - row["sparsity"] if row["format"] != "dense" else 1)
        points.append({**row, "intensity": useful / row["nbytes"], "gflops": useful / row["min_ms"] / 1e6})
    return points


GOALS = [  # (pattern, kernels (the best one counts), measured column, minimum)
    ("70%", ("sparsekit bitmask",), "speedup_vs_best_dense", 2.5),
    ("70%", ("sparsekit bitmask",), "frac_of_limit", 0.55),
    ("70%", ("sparsekit bitmask int8", "sparsekit bitmask int8 x-int8"), "speedup_vs_fp32", 3.5),
    ("70%", ("sparsekit bitmask int8", "sparsekit bitmask int8 x-int8"), "speedup_vs_bf16", 2.0),
    ("2:4", ("sparsekit nm int4", "sparsekit bitmask int4", "sparsekit nm int4 x-int8",
             "sparsekit bitmask int4 x-int8"), "speedup_vs_bf16", 3.0),
    ("2:4", ("sparsekit nm", "sparsekit bitmask"), "speedup_vs_best_dense", 1.5),
    ("90%", ("sparsekit csr", "sparsekit bitmask"), "speedup_vs_best_dense", 3.0),
]
DECODE_GOALS = [("sparse 70%", 1, "speedup_vs_best_dense", 1.8)]
_COLUMN_WORDS = {"speedup_vs_best_dense": "speedup over the best torch dense", "frac_of_limit":
                 "fraction of the bandwidth limit", "speedup_vs_fp32": "speedup over torch dense fp32",
                 "speedup_vs_bf16": "speedup over torch dense bf16"}


def goal_table(linear: dict, decode: dict | None = None, shape: str | None = None) -> list[dict]:
    """The issue's goals against the measurements (batch 1, ``shape``, default the last one measured):
    one row per goal with ``goal``, ``kernel`` (the best of the kernels it allows), ``measured``, ``met``."""
    rows = [r for r in linear["rows"] if r["batch"] == 1 and (shape is None or r["shape"] == shape)]
    shape = shape or (rows[-1]["shape"] if rows else None)
    out = []
    for pattern, kernels, column, target in GOALS:
        found = {r["kernel"]: r for r in rows if r["pattern"] == pattern and r["shape"] == shape}
        best = max((found[k] for k in kernels if k in found), key=lambda r: r[column], default=None)
        if best is None:
            continue
        out.append({"goal": f"{shape} batch 1, {pattern}: {_COLUMN_WORDS[column]} >= {target}",
                    "kernel": best["kernel"], "measured": best[column], "met": best[column] >= target})
    for model, batch, column, target in DECODE_GOALS:
        for row in (decode or {}).get("rows", []):
            if row["model"] == model and row["batch"] == batch:
                out.append({"goal": f"decode batch {batch}, {model}: tokens/s {_COLUMN_WORDS[column]} >= "
                                    f"{target}", "kernel": "SparseLinear (auto)", "measured": row[column],
                            "met": row[column] >= target})
    return out


def tiny_mpt(d_model: int = 4096, n_layers: int = 2, vocab_size: int = 4096, n_heads: int | None = None,
             seed: int = 0):
    """An ``MptForCausalLM`` with random weights at width ``d_model`` (MPT-7B: 4096, 32 heads, 4x FFN).

    ``use_cache=True``: ``MptConfig`` defaults to no KV cache, which makes ``generate`` recompute the
    whole sequence at every step (a prefill per token) instead of decoding one row at a time.
    """
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    config = MptConfig(d_model=d_model, n_heads=n_heads or max(1, d_model // 128), n_layers=n_layers,
                       expansion_ratio=4, max_seq_len=512, vocab_size=vocab_size, use_cache=True)
    return MptForCausalLM(config).eval()


def _prune_model(model, pattern: str):
    from sparsekit.blocks import prunable_linears

    with torch.no_grad():
        for _, linear in prunable_linears(model):
            linear.weight.copy_(prune_weight(linear.weight, pattern))
    return model


def _generate(model, ids, new_tokens: int):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None, use_cache=True)


def _decoder(model, ids, new_tokens):
    return lambda i: _generate(model, ids, new_tokens)


def decode_rows(models: dict, times: dict[str, list[float]], tokens: int, **labels) -> list[dict]:
    """Rows of tokens/s (best and median round) and ratios against the dense fp32 / bf16 models."""
    rate = {name: tokens / min(t) for name, t in times.items()}
    best_dense = max(rate["dense fp32"], rate["dense bf16"])
    rows = []
    for name, t in times.items():
        tensors = list(models[name].parameters()) + list(models[name].buffers())
        rows.append({
            **labels, "model": name, "pattern": name.split(" ", 1)[1] if name.startswith("sparse") else "",
            "tokens_per_s": rate[name], "median_tokens_per_s": tokens / sorted(t)[len(t) // 2],
            "speedup_vs_fp32": rate[name] / rate["dense fp32"],
            "speedup_vs_bf16": rate[name] / rate["dense bf16"],
            "speedup_vs_best_dense": rate[name] / best_dense,
            "weight_bytes": sum(p.numel() * p.element_size() for p in tensors),
        })
    return rows


def bench_decode(d_model: int = 4096, n_layers: int = 2, vocab_size: int = 4096, patterns=("70%", "2:4"),
                 batches=(1, 8), new_tokens: int = 64, prompt_len: int = 8, repeats: int = 3,
                 values_dtype: torch.dtype = torch.bfloat16, seed: int = 0, progress: bool = True,
                 warmup: int = 1, timer: str = "wall") -> dict:
    """Greedy decoding tokens/s: dense fp32, dense bf16 and sparse (one model per pattern), interleaved.

    The sparse models are the fp32 model with every block Linear replaced by a SparseLinear holding
    ``values_dtype`` values (``sparsify_linears(format="auto")``); embeddings and LM head stay dense.
    A row: ``batch``, ``model``, ``pattern``, ``tokens_per_s`` (best round), ``median_tokens_per_s``,
    ``speedup_vs_fp32`` / ``_bf16`` / ``_best_dense``, ``weight_bytes`` (all parameters and buffers).
    """
    from tqdm.auto import tqdm

    from sparsekit.kernels.sparse_linear import sparsify_linears

    base = tiny_mpt(d_model, n_layers, vocab_size, seed=seed)
    models = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for pattern in patterns:
        sparse = _prune_model(copy.deepcopy(base), pattern)
        sparsify_linears(sparse, format="auto", min_sparsity=0.3, dtype=values_dtype)
        models[f"sparse {pattern}"] = sparse
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch in tqdm(batches, desc="bench_decode", disable=not progress):
        ids = torch.randint(1, vocab_size, (batch, prompt_len), generator=generator)
        times = interleaved_times({name: _decoder(model, ids, new_tokens) for name, model in models.items()},
                                  repeats, warmup=warmup, timer=timer)
        rows.extend(decode_rows(models, times, batch * new_tokens, batch=batch))
    config = {"d_model": d_model, "n_layers": n_layers, "vocab_size": vocab_size, "new_tokens": new_tokens,
              "prompt_len": prompt_len, "values_dtype": str(values_dtype).replace("torch.", "")}
    return {"machine": machine_info(), "config": config, "repeats": repeats, "seed": seed, "timer": timer,
            "rows": rows}


def _teacher_inputs(model, batch: int, length: int, generator) -> dict:
    """Random inputs a teacher's ``generate`` accepts: token ids, or log-mel features for speech models."""
    config = model.config
    if getattr(config, "num_mel_bins", None):
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return {"input_features": torch.randn(batch, config.num_mel_bins, frames, generator=generator)}
    return {"input_ids": torch.randint(1, config.vocab_size, (batch, length), generator=generator)}


def teacher_decode(task, new_tokens: int = 32, repeats: int = 3, pattern: str = "70%", batch: int = 1,
                   scale: str = "book", values_dtype: torch.dtype = torch.bfloat16,
                   seed: int = 0) -> list[dict]:
    """Tokens/s of a task's teacher: dense fp32, dense bf16 and its ``pattern``-pruned sparse copy."""
    from sparsekit.kernels.sparse_linear import sparsify_linears

    base = task.teacher(scale).float().eval()
    models = {"dense fp32": base, "dense bf16": copy.deepcopy(base).to(torch.bfloat16)}
    sparse = _prune_model(copy.deepcopy(base), pattern)
    sparsify_linears(sparse, dtype=values_dtype)
    models[f"sparse {pattern}"] = sparse
    inputs = _teacher_inputs(base, batch, 16, torch.Generator().manual_seed(seed))

    def decoder(model):
        typed = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return lambda i: model.generate(**typed, **kwargs)

    with torch.no_grad():
        times = interleaved_times({name: decoder(model) for name, model in models.items()}, repeats)
    return decode_rows(models, times, batch * new_tokens, teacher=type(base).__name__, batch=batch)


# ---------------------------------------------------------------------------------------------------------
# calibrating SparseLinear's dispatch (sparsekit bench --calibrate)

CALIBRATION_KERNELS = {"expand": "sparsekit bitmask", "expand-int8": "sparsekit bitmask int8",
                       "expand-int4": "sparsekit bitmask int4", "csr": "sparsekit csr"}


def fallback_candidates(candidates: dict[str, Candidate], shape) -> dict[str, Candidate]:
    """What ``SparseLinear`` runs when it does not take a kernel: decompress (dequantize) the stored weight,
    then dense ``F.linear`` in x's dtype. One per calibrated kernel, named ``"<kernel> fallback"``."""
    cols = shape[1]

    def bitmask(x, w):
        dense = OPS.bitmask_to_dense(w.bitmask, w.values, w.row_offsets, cols)
        return F.linear(x, dense.to(x.dtype))

    def quant(x, p):
        t = p.tensors
        dense = reference.bitmask_dense(t["bitmask"], t["values"], t["row_offsets"], cols, t["scales"],
                                        p.group_size)
        return F.linear(x, dense.to(x.dtype))

    def csr(x, w):
        return F.linear(x, w.to_dense().to(x.dtype))

    runs = {"sparsekit bitmask": bitmask, "sparsekit bitmask int8": quant, "sparsekit bitmask int4": quant,
            "sparsekit csr": csr}
    return {f"{name} fallback": Candidate(c.format, c.nbytes, c.dtype, c.copies, runs[name], c.x_dtype)
            for name, c in candidates.items() if name in runs}


def rules_from_rows(rows: list[dict], kernels: dict[str, str] = CALIBRATION_KERNELS) -> dict:
    """Dispatch rules from benchmark rows: for each kind and measured sparsity, the largest batch up to
    which the kernel was faster, at every measured batch, than ``SparseLinear``'s alternative: its dense
    fallback (the ``"<kernel> fallback"`` rows) when measured, else the best torch dense path (0 if not even
    at the first batch). Returns ``{kind: [[sparsity, max_batch], ...]}`` (see
    :mod:`sparsekit.kernels.dispatch`)."""
    by_key = {(r["kernel"], r["pattern"] if "pattern" in r else r["sparsity"], r["batch"]): r for r in rows}
    speedups: dict[tuple[str, float], dict[int, float]] = {}
    for (name, pattern, batch), row in by_key.items():
        for kind, kernel in kernels.items():
            if name != kernel:
                continue
            fallback = by_key.get((f"{kernel} fallback", pattern, batch))
            speedup = (fallback["min_ms"] / row["min_ms"]) if fallback else row["speedup_vs_best_dense"]
            speedups.setdefault((kind, round(row["sparsity"], 2)), {})[batch] = speedup
    rules: dict[str, list] = {}
    for (kind, sparsity), by_batch in sorted(speedups.items()):
        limit = 0
        for batch in sorted(by_batch):
            if by_batch[batch] <= 1.0:
                break
            limit = batch
        rules.setdefault(kind, []).append([sparsity, limit])
    return rules


def calibrate(shape=(4096, 4096), patterns=("50%", "70%", "90%"), batches=(1, 2, 4, 8, 16, 32),
              repeats: int = 5, path=None, progress: bool = True, **bench_kwargs) -> dict:
    """Time the sparse kernels against ``SparseLinear``'s dense fallback (decompress + ``F.linear``) and
    torch dense on this machine, derive the dispatch rules (:func:`rules_from_rows`), write them with the
    machine's key to ``path`` (default :func:`sparsekit.kernels.dispatch.calibration_path`) and make
    ``SparseLinear`` use them."""
    result = bench_linear(shapes=[tuple(shape)], patterns=patterns, batches=batches, repeats=repeats,
                          torch_csr=False, baselines=False, quantized=True, progress=progress, fallbacks=True,
                          **bench_kwargs)
    data = {"machine_key": dispatch.machine_key(), "machine": result["machine"],
            "rules": rules_from_rows(result["rows"]), "shape": list(shape), "repeats": repeats,
            "rows": result["rows"]}
    fileio.atomic_write_json(path or dispatch.calibration_path(), data, default=str)  # whole or not at all
    dispatch.reload_rules()
    return data
