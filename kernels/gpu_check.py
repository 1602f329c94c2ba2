"""GPU check of the Triton kernels: versions, correctness at LLM shapes, timings against cuBLAS and torch 2:4.

Run by ``kernels/gpu_check.sh`` on a machine with a CUDA GPU, within ``--budget-s`` (default 420 s):

1. prints Python, torch, Triton, CUDA, GPU and driver, and stops (exit 3) naming any Triton/torch API the
   kernels need that this machine's versions lack;
2. correctness of every kernel (bitmask and N:M 2:4, 4:8, 16:32; fp16, bf16, int8 and int4 values with
   group scales) at 11008x4096, 4096x4096 and 14336x4096 (out x in), batch 1 and 16, against ``F.linear``
   on the dense (dequantized) weight in fp32;
3. timings for batch 1, 4, 16, 64: torch dense fp16 and bf16 (cuBLAS), the Triton kernels at 50/70/80/90%
   unstructured and 2:4 (fp16, and int4 with group size 128), and torch's ``to_sparse_semi_structured``
   2:4 (cuSPARSELt or CUTLASS). Each is timed with CUDA events over CUDA graphs of back-to-back calls,
   after warm-up and autotuning (the autotuned kernel's output is checked too), with the weight rotated
   among copies that together exceed twice the L2 cache so that every call reads it from HBM; achieved
   bandwidth = (bytes of weight + x + y) / time, against the card's peak;
4. writes ``kernels/results/gpu-<gpu name>.json`` (GPU, driver, torch and Triton versions, date), after
   each phase and shape, so that a run cut short still leaves what it measured.

``--dry-run`` runs on CPU under Triton's interpreter: every tile configuration of both kernels and every
kernel variant on one small shape, the timing code on that shape (perf_counter: not a measurement), and
writes a JSON with ``"device": "cpu-interpreter"`` (default ``kernels/results/dry-run.json``, git-ignored).
``--aot`` compiles every tile configuration for Ampere and Hopper ahead of time (Triton front end, LLVM,
ptxas; no GPU needed). sparsekit is imported only after the interpreter is set, and after inert stand-ins
for safetensors and tqdm (which this check never calls) where the GPU machine lacks them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((11008, 4096), (4096, 4096), (14336, 4096))  # (out, in); the goals' shape first
BATCHES = (1, 4, 16, 64)
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
GROUP_SIZE = 128
DRY_SHAPE, DRY_BATCHES, DRY_SPARSITIES = (64, 256), (1, 4), (0.7,)
TIMING_RESERVE_S = 45  # no new (shape, batch) is timed with less budget left: autotuning takes this long
# Peak HBM bandwidth (GB/s, datasheets) of common cards, for when torch does not report clock and bus width.
KNOWN_PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350,
                  "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10": 600}
REQUIRED_API = {
    "triton": ("jit", "autotune", "Config", "cdiv", "next_power_of_2"),
    "triton.language": ("program_id", "arange", "zeros", "load", "store", "atomic_add", "cumsum", "dot",
                        "trans", "where", "sum", "cdiv", "constexpr", "float32", "int32"),
}
CUDA_API = {"torch.cuda": ("Event", "CUDAGraph", "graph", "Stream", "synchronize", "get_device_properties")}


# ------------------------------------------------------------------------------------------------ set-up
def stub_missing_modules() -> list[str]:
    """Inert stand-ins for safetensors (file I/O) and tqdm (progress bars) where they are not installed:
    sparsekit imports them, this check never calls them."""
    stubbed = []
    if importlib.util.find_spec("tqdm") is None:
        tqdm, auto = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
        auto.tqdm = tqdm.tqdm = lambda iterable=None, *args, **kwargs: iterable
        tqdm.auto = auto
        sys.modules.update({"tqdm": tqdm, "tqdm.auto": auto})
        stubbed.append("tqdm")
    if importlib.util.find_spec("safetensors") is None:
        def unavailable(*args, **kwargs):
            raise RuntimeError("safetensors is not installed on this machine")

        st, st_torch = types.ModuleType("safetensors"), types.ModuleType("safetensors.torch")
        st.safe_open = st_torch.save_file = st_torch.load_file = unavailable
        st.torch = st_torch
        sys.modules.update({"safetensors": st, "safetensors.torch": st_torch})
        stubbed.append("safetensors")
    return stubbed


def missing_api(api: dict) -> list[str]:
    """``module.name`` of every required attribute this machine's libraries lack."""
    missing = []
    for module_name, names in api.items():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]
    return missing


def gpu_info(torch) -> dict:
    """GPU name, driver, memory, SMs, L2 size, peak bandwidth (and where it came from)."""
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": props.L2_cache_size, "driver": "unknown"}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            info["driver"] = out.stdout.strip().splitlines()[0]
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        info["peak_bandwidth_gbs"] = round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)
        info["peak_bandwidth_source"] = "2 x memory clock x bus width (torch device properties)"
    else:
        match = next((name for name in KNOWN_PEAK_GBS if name.lower() in props.name.lower()), None)
        info["peak_bandwidth_gbs"] = KNOWN_PEAK_GBS.get(match)
        info["peak_bandwidth_source"] = f"datasheet value for {match}" if match else "unknown"
    return info


def copy_bandwidth_gbs(torch) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (a practical peak)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return round(2 * 2**30 / (start.elapsed_time(end) / 1e3 / 5) / 1e9, 1)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed


# ------------------------------------------------------------------------------------------- correctness
def dry_run_configs(device) -> list[dict]:
    """Every tile configuration of both kernels, each on the dry-run shape at a batch of its regime."""
    import torch

    from sparsekit.kernels.triton_bitmask import CONFIGS as BITMASK_CONFIGS
    from sparsekit.kernels.triton_nm import CONFIGS as NM_CONFIGS
    from sparsekit.kernels.triton_testing import KernelCase, Variant, make_x, rel_err, tolerance

    batch_of = {1: 1, 16: 5, 32: 20, 64: 40, 128: 70}
    rows = []
    for variant, configs in ((Variant("bitmask-fp16", "bitmask", 0.7), BITMASK_CONFIGS),
                             (Variant("nm2:4-fp16", "nm", nm=(2, 4)), NM_CONFIGS)):
        case = KernelCase(variant, *DRY_SHAPE, device, group_size=GROUP_SIZE)
        for config in configs:
            batch = batch_of[config.kwargs["BLOCK_M"]]
            x = make_x(batch, DRY_SHAPE[1], torch.float16, device)
            err = rel_err(case(x, config=config), torch.nn.functional.linear(x.float(), case.reference))
            rows.append({"kernel": variant.name, "config": str(config), "batch": batch, "max_rel_err": err,
                         "ok": err <= tolerance(torch.float16)})
    return rows


def check_correctness(shapes, batches, device, budget: Budget, skipped: list) -> list[dict]:
    """Every kernel variant at each shape and batch, with a fixed tile configuration per regime (the
    autotuned ones are checked in the timing phase); uses at most 40% of the budget."""
    import torch
    import triton

    from sparsekit.kernels.triton_launch import _config
    from sparsekit.kernels.triton_testing import KernelCase, correctness_variants, make_x, rel_err, tolerance

    configs = {"decode": _config(1, 32, 4, 4, 2), "small": _config(16, 64, 2, 4, 3)}
    rows_out = []
    for rows, cols in shapes:
        for variant in correctness_variants():
            if budget.left() < 0.6 * budget.seconds:
                skipped.append(f"correctness {variant.name} {rows}x{cols}: its share of the budget is spent")
                continue
            try:
                case = KernelCase(variant, rows, cols, device, group_size=GROUP_SIZE)
            except Exception as error:
                rows_out.append(_error_row(variant.name, (rows, cols), None, error))
                continue
            for batch in batches:
                config = configs["decode" if batch == 1 else "small"]
                if variant.format == "nm":
                    config = triton.Config(dict(config.kwargs, BLOCK_K=128), num_warps=config.num_warps,
                                           num_stages=config.num_stages)
                try:
                    x = make_x(batch, cols, case.dtype, device)
                    reference = torch.nn.functional.linear(x.float(), case.reference)
                    err = rel_err(case(x, config=config), reference)
                    row = {"kernel": variant.name, "shape": [rows, cols], "batch": batch, "max_rel_err": err,
                           "tol": tolerance(case.dtype), "ok": err <= tolerance(case.dtype), "error": None}
                    print(f"  {variant.name:14s} {rows:>5}x{cols:<5} batch {batch:>3}: max rel err {err:.2e} "
                          f"{'ok' if row['ok'] else 'FAIL'}")
                except Exception as error:
                    row = _error_row(variant.name, (rows, cols), batch, error)
                    print(f"  {variant.name:14s} {rows:>5}x{cols:<5} batch {batch:>3}: ERROR {row['error']}")
                rows_out.append(row)
            del case
    return rows_out


def _error_row(name, shape, batch, error) -> dict:
    return {"kernel": name, "shape": list(shape), "batch": batch, "max_rel_err": None, "tol": None,
            "ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}


# ------------------------------------------------------------------------------------------------ timing
class Timer:
    """Microseconds per call of a list of calls (one per weight copy), after warm-up.

    On a GPU: CUDA events around replays of a CUDA graph of ``calls_per_graph`` back-to-back calls (no
    launch overhead, as in a captured decoding step), median of three; eager launches where a call cannot
    be captured. On CPU (dry run): perf_counter over one round.
    """

    def __init__(self, device: str, calls_per_graph: int = 60, replays: int = 8):
        self.device, self.calls_per_graph, self.replays = device, calls_per_graph, replays

    def __call__(self, calls) -> tuple[float, str]:
        for call in calls:
            call()
        if self.device != "cuda":
            start = time.perf_counter()
            for call in calls:
                call()
            return (time.perf_counter() - start) / len(calls) * 1e6, "cpu-perf-counter"
        import torch

        try:
            return self._graph(torch, calls), "cuda-graph"
        except Exception as error:
            print(f"    (CUDA graph capture failed: {type(error).__name__}: {error}; timing eager calls)")
            torch.cuda.synchronize()
            return self._eager(torch, calls), "cuda-events-eager"

    def _events(self, torch, run, calls_per_run: int) -> float:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls_per_run)
        return statistics.median(times)

    def _graph(self, torch, calls) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch recommends before capture
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.calls_per_graph):
                calls[i % len(calls)]()
        graph.replay()
        torch.cuda.synchronize()

        def run():
            for _ in range(self.replays):
                graph.replay()

        return self._events(torch, run, self.replays * self.calls_per_graph)

    def _eager(self, torch, calls) -> float:
        count = self.replays * self.calls_per_graph

        def run():
            for i in range(count):
                calls[i % len(calls)]()

        return self._events(torch, run, count)


def timing_variants(sparsities) -> list:
    from sparsekit.kernels.triton_testing import Variant

    return ([Variant(f"bitmask-fp16-{round(s * 100)}%", "bitmask", s) for s in sparsities]
            + [Variant("nm2:4-fp16", "nm", nm=(2, 4)), Variant("nm2:4-int4", "nm", nm=(2, 4), bits=4),
               Variant("bitmask-int4-70%", "bitmask", 0.7, bits=4)])


def time_all(shapes, batches, sparsities, device, budget: Budget, skipped: list, info: dict, entries: list,
             checkpoint) -> None:
    """Time every method on every shape and batch (the goals' shape first) into ``entries``."""
    import torch

    from sparsekit.kernels.triton_testing import KernelCase

    timer = Timer(device)
    for rows, cols in shapes:
        if budget.left() < TIMING_RESERVE_S:
            skipped.append(f"timings {rows}x{cols}: time budget spent")
            continue
        dense = {dt: (torch.randn(rows, cols, device=device) / cols ** 0.5).to(dt)
                 for dt in (torch.float16, torch.bfloat16)}
        cases = {}
        for variant in timing_variants(sparsities):
            try:
                cases[variant.name] = KernelCase(variant, rows, cols, device, group_size=GROUP_SIZE)
            except Exception as error:
                skipped.append(f"{variant.name} {rows}x{cols}: {type(error).__name__}: {error}")
        semi = semi_structured(torch, cases.get("nm2:4-fp16"), info.get("l2_bytes", 0), skipped)
        for batch in batches:
            if budget.left() < TIMING_RESERVE_S:
                skipped.append(f"timings {rows}x{cols} batch {batch}: time budget spent")
                continue
            entries += time_batch(timer, batch, dense, cases, semi, info, skipped)
            checkpoint()
        del cases, dense, semi
        if device == "cuda":
            torch.cuda.empty_cache()


def time_batch(timer, batch, dense, cases, semi, info, skipped) -> list[dict]:
    """One shape and batch: dense fp16/bf16, each Triton kernel (checked after autotuning), torch 2:4 last
    (a library call that fails under graph capture cannot disturb the others)."""
    import torch
    import torch.nn.functional as F

    from sparsekit.kernels.triton_testing import make_x, rel_err

    rows, cols = dense[torch.float16].shape
    device = dense[torch.float16].device
    l2, peak = info.get("l2_bytes", 0), info.get("peak_bandwidth_gbs")
    x = {dt: make_x(batch, cols, dt, device) for dt in dense}
    io_bytes = 2 * batch * (cols + rows)
    entries = []

    def record(method, pattern, sparsity, bits, calls, nbytes, err=None):
        us, how = timer(calls)
        gbs = (nbytes + io_bytes) / (us * 1e-6) / 1e9
        dense_us = entries[0]["us"] if entries else us
        entries.append({"shape": [rows, cols], "batch": batch, "method": method, "pattern": pattern,
                        "sparsity": sparsity, "bits": bits, "us": us, "bytes": nbytes + io_bytes, "gbs": gbs,
                        "bw_frac": gbs / peak if peak else None, "timer": how, "max_rel_err": err,
                        "speedup_vs_dense_fp16": dense_us / us})
        print(f"  {rows:>5}x{cols:<5} b{batch:<3} {method:24s} {us:9.1f} us {gbs:8.1f} GB/s  "
              f"x{dense_us / us:.2f} vs dense fp16")

    for dt, name in ((torch.float16, "dense-fp16"), (torch.bfloat16, "dense-bf16")):
        nbytes = dense[dt].numel() * 2
        weights = [dense[dt]] + [dense[dt].clone() for _ in range(n_copies(nbytes, l2) - 1)]
        record(name, "dense", 0.0, 16, [lambda w=w, xx=x[dt]: F.linear(xx, w) for w in weights], nbytes)
    for name, case in cases.items():
        xx, variant = x[case.dtype], case.variant
        try:
            err = rel_err(case(xx), F.linear(xx.float(), case.reference))  # the first call autotunes
            sparsity = variant.sparsity if variant.nm is None else 1 - variant.nm[0] / variant.nm[1]
            copies = case.copies(n_copies(case.nbytes, l2))
            record(f"triton-{name}", variant.pattern, sparsity, variant.bits or 16,
                   [lambda w=w, case=case, xx=xx: case(xx, w) for w in copies], case.nbytes, err)
        except Exception as error:
            skipped.append(f"{name} {rows}x{cols} batch {batch}: {type(error).__name__}: {error}")
            print(f"  {name}: ERROR {type(error).__name__}: {error}")
    if semi is not None:
        case, packed, nbytes = semi
        xx = x[torch.float16]
        try:
            err = rel_err(F.linear(xx, packed[0]), F.linear(xx.float(), case.reference))
            record("torch-2:4", "2:4", 0.5, 16, [lambda w=w: F.linear(xx, w) for w in packed], nbytes, err)
        except Exception as error:
            skipped.append(f"torch-2:4 {rows}x{cols} batch {batch}: {type(error).__name__}: {error}")
    return entries


def n_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of a weight so that one round through them streams at least twice the L2 cache."""
    return max(1, min(64, math.ceil(2 * l2_bytes / max(nbytes, 1))))


def semi_structured(torch, case, l2_bytes: int, skipped: list):
    """``(case, [torch 2:4 copies of its weight], bytes)`` with ``to_sparse_semi_structured``, or None."""
    if case is None or case.reference.device.type != "cuda":
        skipped.append("torch-2:4: needs a CUDA GPU")
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        W = case.reference.to(torch.float16)
        first = to_sparse_semi_structured(W)
        nbytes = sum(t.numel() * t.element_size() for t in (getattr(first, "packed", None),
                                                             getattr(first, "meta", None))
                     if isinstance(t, torch.Tensor))
        copies = [first] + [to_sparse_semi_structured(W.clone())
                            for _ in range(n_copies(nbytes, l2_bytes) - 1)]
        return case, copies, nbytes
    except Exception as error:
        skipped.append(f"torch-2:4: {type(error).__name__}: {error}")
        return None


def evaluate_goals(timings: list[dict], shape, peak) -> list[dict]:
    """The issue's goals at batch 1 on ``shape`` (fp16), from the recorded timings."""
    def find(method):
        return next((r for r in timings if r["shape"] == list(shape) and r["batch"] == 1
                     and r["method"] == method), {})

    where = f"batch 1, {shape[0]}x{shape[1]}"
    goals = []
    for method, target, what in (("triton-bitmask-fp16-70%", 1.5, "70% unstructured vs cuBLAS fp16"),
                                 ("triton-bitmask-fp16-90%", 2.5, "90% unstructured vs cuBLAS fp16"),
                                 ("triton-nm2:4-fp16", 1.3, "2:4 vs cuBLAS fp16"),
                                 ("triton-nm2:4-int4", 4.0, "2:4 + int4 vs cuBLAS fp16")):
        value = find(method).get("speedup_vs_dense_fp16")
        goals.append({"goal": f"{where}: {what}", "target": f">= {target}x", "measured": value,
                      "met": value is not None and value >= target})
    ours, torch24 = (find(m).get("speedup_vs_dense_fp16") for m in ("triton-nm2:4-fp16", "torch-2:4"))
    goals.append({"goal": f"{where}: 2:4 ahead of torch's 2:4 (speedups vs cuBLAS fp16)",
                  "target": "> torch-2:4", "measured": ours, "reference": torch24,
                  "met": ours is not None and torch24 is not None and ours > torch24})
    frac = find("triton-bitmask-fp16-70%").get("bw_frac")
    goals.append({"goal": f"{where}: bandwidth at 70% sparsity", "target": ">= 0.70 of peak",
                  "measured": frac, "met": frac is not None and frac >= 0.7, "peak_gbs": peak})
    return goals


def compile_every_configuration(capabilities=(80, 90)) -> int:
    """``--aot``: compile every tile configuration of both kernels (fp16 values, and int4) for Ampere and
    Hopper ahead of time, without a GPU; returns the number of failures."""
    from sparsekit.kernels.triton_bitmask import CONFIGS as BITMASK_CONFIGS
    from sparsekit.kernels.triton_nm import CONFIGS as NM_CONFIGS
    from sparsekit.kernels.triton_testing import compile_for_gpu

    done = failed = 0
    for capability in capabilities:
        for kernel, configs in (("bitmask", BITMASK_CONFIGS), ("nm", NM_CONFIGS)):
            for config, bits in [(c, 16) for c in configs] + [(c, 4) for c in configs]:
                try:
                    compile_for_gpu(kernel, capability, config, bits=bits)
                    done += 1
                except Exception as error:
                    failed += 1
                    print(f"  sm_{capability} {kernel} bits={bits} {config}: {type(error).__name__}: {error}")
        print(f"  sm_{capability}: {done} compiled, {failed} failed so far")
    return failed


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, one small shape")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: kernels/results/...)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time budget of the whole check")
    parser.add_argument("--aot", action="store_true",
                        help="only compile every configuration for sm_80 and sm_90 (no GPU needed)")
    args = parser.parse_args(argv)
    if args.aot:
        stub_missing_modules()
        return 1 if compile_every_configuration() else 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported
    budget = Budget(args.budget_s)
    stubbed = stub_missing_modules()
    import torch
    import triton

    print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"cuda {torch.version.cuda}  cuda available: {torch.cuda.is_available()}")
    if stubbed:
        print(f"(not installed here, replaced by inert stand-ins: {', '.join(stubbed)})")
    missing = missing_api(REQUIRED_API | ({} if args.dry_run else CUDA_API))
    if missing:
        print(f"gpu_check: this machine's torch {torch.__version__} / Triton {triton.__version__} lack "
              f"{', '.join(missing)}, which the kernels need; stopping.")
        return 3
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; on a CPU machine run it with --dry-run.")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    info = gpu_info(torch) if device == "cuda" else {
        "gpu": "cpu-interpreter", "driver": None, "peak_bandwidth_gbs": None, "peak_bandwidth_source": None}
    print(f"device: {info['gpu']}  driver {info['driver']}  peak {info['peak_bandwidth_gbs']} GB/s "
          f"({info['peak_bandwidth_source']})")
    if device == "cuda":
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs(torch)
        print(f"device-to-device copy: {info['copy_bandwidth_gbs']} GB/s")
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", info["gpu"]).strip("-")
    out = args.out or ROOT / "kernels" / "results" / (
        "dry-run.json" if args.dry_run else f"gpu-{gpu_slug}.json")
    skipped: list[str] = []
    result = {"device": "cuda" if device == "cuda" else "cpu-interpreter", **info, "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "group_size": GROUP_SIZE,
              "stand_ins": stubbed, "configs": [], "correctness": [], "timings": [], "goals": [],
              "skipped": skipped, "complete": False}

    def checkpoint():
        result["elapsed_s"] = round(budget.elapsed, 1)
        failures = [r for r in result["correctness"] + result["configs"] if not r["ok"]]
        result["all_correct"] = bool(result["correctness"]) and not failures
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        return failures

    torch.manual_seed(0)
    shapes = [DRY_SHAPE] if args.dry_run else list(SHAPES)
    if args.dry_run:
        print("every tile configuration under the interpreter:")
        result["configs"] = dry_run_configs(device)
        print(f"  {sum(r['ok'] for r in result['configs'])}/{len(result['configs'])} configurations ok")
    print("correctness:")
    result["correctness"] = check_correctness(shapes, (1, 5) if args.dry_run else (1, 16), device, budget,
                                              skipped)
    checkpoint()
    print("timings:" + (" (interpreter: exercises the code, not a measurement)" if args.dry_run else ""))
    time_all(shapes, DRY_BATCHES if args.dry_run else BATCHES, DRY_SPARSITIES if args.dry_run else SPARSITIES,
             device, budget, skipped, info, result["timings"], checkpoint)
    result["goals"] = evaluate_goals(result["timings"], shapes[0], info.get("peak_bandwidth_gbs"))
    if args.dry_run:
        result["goals_note"] = "interpreter timings on a small shape: a dry run does not evaluate the goals"
    for goal in result["goals"] if not args.dry_run else []:
        print(f"  goal {goal['goal']}: target {goal['target']}, measured {goal['measured']}, "
              f"{'met' if goal['met'] else 'NOT met'}")
    result["complete"] = True
    failures = checkpoint()
    print(f"wrote {out} ({result['elapsed_s']} s; {len(failures)} correctness failure(s); {len(skipped)} "
          f"skipped)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
